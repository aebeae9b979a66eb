"""Hardware-aware conversion: keep a layer whose compact form is not faster than its dense conv on this machine.

``convert(model, method, hardware_aware=True, input_size=(N, C, H, W))`` times, for every layer it would
convert, the dense conv and the compact replacement on random inputs of the shapes that layer sees at
``input_size`` (one per call of the layer in one forward; batch ``N`` as given), in eval mode under
``torch.no_grad``, with torch's current thread count, on the model's device and in its dtype and memory
format (``model.to(memory_format=torch.channels_last)`` is timed on channels_last inputs, its compact layers
in channels_last too; see :func:`model_memory_format`). Move the model where and as it will run first; a
model on the ``meta`` device has nothing to run and is refused. A layer whose compact form takes at least
as long as the dense conv is kept, and the report says so with both timings::

    kept (hardware_aware): compact X ms >= dense Y ms

so the converted model is never slower than its source, layer by layer, at that input size on that machine
(within the timer's noise). The compact form is timed as ``convert`` returns it (not deployed).

The timer is a callable ``timer(name, module, x) -> seconds per call`` (``name`` is the layer's dotted name,
``module`` the dense conv or its compact form, ``x`` the input); :func:`benchmark_timer` (the default) uses
``torch.utils.benchmark.Timer.blocked_autorange`` and reports the median of its blocks. Tests pass a stub.
A timer that raises is reported with the layer's name and this signature; one that returns anything but a
finite number ``>= 0`` is refused (``ValueError`` naming the layer).
:func:`time_module` times one module the same way (``compconv.compress``'s latency budget uses it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["LayerTimer", "benchmark_timer", "judge", "judge_timed", "model_memory_format", "time_module", "time_pair",
           "whole_model_guard"]

LayerTimer = Callable[[str, nn.Module, torch.Tensor], float]
MIN_RUN_TIME = 0.05  # seconds of calls per measurement (blocked_autorange runs at least this long)


def benchmark_timer(name: str, module: nn.Module, x: torch.Tensor) -> float:
    """Median seconds per ``module(x)`` (``torch.utils.benchmark``: blocks of calls for ``MIN_RUN_TIME`` s).

    ``name`` is unused (a stub timer may key on it). Uses ``torch.get_num_threads()`` threads, as the model
    will run (``Timer`` would otherwise pin one thread).
    """
    from compconv._quiet import silence_cuda_home_probe

    silence_cuda_home_probe()  # torch.utils.benchmark imports cpp_extension, whose CUDA probe is noise here
    from torch.utils import benchmark

    for _ in range(2):  # warm-up: first calls allocate and pick kernels
        module(x)
    t = benchmark.Timer(stmt="m(x)", globals={"m": module, "x": x}, num_threads=torch.get_num_threads())
    return float(t.blocked_autorange(min_run_time=MIN_RUN_TIME).median)


def _who(name: str) -> str:
    return f"layer {name!r}" if name else "the whole model"


def _seconds(t: object, name: str) -> float:
    """``t`` as float seconds; ``ValueError`` naming the layer unless it is a finite number ``>= 0``."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
        raise ValueError(f"timer returned {t!r} for {_who(name)}: it must return seconds "
                         "per call (a finite number >= 0)")
    return float(t)


_SIGNATURE = "timer(name, module, x) -> seconds per call"


def _time(timer: LayerTimer, name: str, module: nn.Module, x: torch.Tensor) -> float:
    """``timer(name, module, x)`` as checked seconds; an exception it raises is re-raised naming the layer."""
    try:
        t = timer(name, module, x)
    except Exception as e:
        err = TypeError if isinstance(e, TypeError) else RuntimeError
        raise err(f"timer raised {type(e).__name__} for {_who(name)} ({type(module).__name__} on input "
                  f"{tuple(x.shape)}): {e}; the timer is called as {_SIGNATURE}") from e
    return _seconds(t, name)


def _strict_format(t: torch.Tensor) -> torch.memory_format | None:
    """The layout of a 4-D tensor when its strides say (a 1x1 kernel or 1x1 map fits both: None)."""
    if t.dim() != 4:
        return None
    nchw, nhwc = t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)
    if nchw == nhwc:
        return None
    return torch.contiguous_format if nchw else torch.channels_last


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` when most of ``model``'s 4-D weights are in channels_last, else NCHW.

    Only weights whose strides tell the layouts apart count (a 1x1 conv's weight is both); a model with none
    is NCHW. ``model.to(memory_format=torch.channels_last)`` gives channels_last.
    """
    counts = {torch.contiguous_format: 0, torch.channels_last: 0}
    for p in model.parameters():
        if is_lazy(p):  # an uninitialised lazy parameter has no layout yet
            continue
        fmt = _strict_format(p)
        if fmt is not None:
            counts[fmt] += 1
    return torch.channels_last if counts[torch.channels_last] > counts[torch.contiguous_format] else (
        torch.contiguous_format)


def _random_input(shape: tuple[int, ...], kw: dict[str, object], fmt: torch.memory_format) -> torch.Tensor:
    x = torch.randn(shape, **kw)  # type: ignore[arg-type]
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x


def _by_shape(name: str, input_shapes: Sequence[Sequence[int]]) -> dict[tuple[int, ...], int]:
    """``{shape: calls}``: a layer called twice at one shape is timed once and counted twice."""
    if not input_shapes:
        raise ValueError(f"{_who(name)}: no input shapes to time it on")
    by_shape: dict[tuple[int, ...], int] = {}
    for s in input_shapes:
        by_shape[tuple(s)] = by_shape.get(tuple(s), 0) + 1
    return by_shape


def _input_kw(module: nn.Module) -> dict[str, object]:
    p = next((p for p in module.parameters() if not is_lazy(p)), None)
    if p is not None and p.is_meta:
        raise ValueError(f"cannot time {type(module).__name__} on the meta device (its weights hold no data, so "
                         "nothing runs): move the model to a real device with its weights first")
    return {"device": p.device, "dtype": p.dtype} if p is not None and p.is_floating_point() else {}


def time_module(name: str, module: nn.Module, input_shapes: Sequence[Sequence[int]],
                timer: LayerTimer | None = None, *, memory_format: torch.memory_format | None = None) -> float:
    """Seconds per forward of the model spent in ``module``: its calls at ``input_shapes`` summed.

    As :func:`time_pair` for one module: timed in eval mode (its mode is restored) under ``torch.no_grad`` on
    random inputs of its parameters' dtype and device, in ``memory_format`` (default: the layout of its
    weights, :func:`model_memory_format`). ``name`` is the module's dotted name, passed to ``timer``; ``""``
    is the whole model (``input_shapes=[input_size]``; errors then say "the whole model").

    Raises:
        ValueError: ``input_shapes`` is empty, or the timer returned something other than a finite
            non-negative number (naming the layer).
        TypeError, RuntimeError: the timer raised (naming the layer and the timer's signature).
    """
    by_shape = _by_shape(name, input_shapes)
    timer = timer or benchmark_timer
    kw = _input_kw(module)
    fmt = memory_format if memory_format is not None else model_memory_format(module)
    mode = module.training
    module.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for shape, count in by_shape.items():
                total += count * _time(timer, name, module, _random_input(shape, kw, fmt))
    finally:
        module.train(mode)
    return total


def time_pair(name: str, dense: nn.Module, compact: nn.Module, input_shapes: Sequence[Sequence[int]],
              timer: LayerTimer | None = None, *,
              memory_format: torch.memory_format | None = None) -> tuple[float, float]:
    """``(dense seconds, compact seconds)`` per forward of the model: the layer's calls summed.

    Args:
        name: the layer's name (passed to ``timer``).
        dense, compact: the conv and its replacement; both are timed in eval mode (their modes are restored),
            as they are (their weights' layout included), on random inputs of the dense conv's dtype and
            device.
        input_shapes: the input shape of each call of the layer in one forward, e.g. ``[(1, 64, 56, 56)]``.
        timer: ``timer(name, module, x) -> seconds``; default :func:`benchmark_timer`.
        memory_format: the inputs' layout (``convert`` passes the model's, :func:`model_memory_format`);
            default: the dense conv's weight layout.

    Raises:
        ValueError: ``input_shapes`` is empty (the layer was not reached: nothing to time), or the timer
            returned something other than a finite non-negative number.
        TypeError, RuntimeError: the timer raised (naming the layer and the timer's signature).
    """
    by_shape = _by_shape(name, input_shapes)
    timer = timer or benchmark_timer
    kw = _input_kw(dense)
    fmt = memory_format if memory_format is not None else model_memory_format(dense)
    modes = (dense.training, compact.training)
    dense.eval()
    compact.eval()
    totals = [0.0, 0.0]
    try:
        with torch.no_grad():
            for shape, count in by_shape.items():
                x = _random_input(shape, kw, fmt)
                for i, m in enumerate((dense, compact)):
                    totals[i] += count * _time(timer, name, m, x)
    finally:
        dense.train(modes[0])
        compact.train(modes[1])
    return totals[0], totals[1]


def _ms(t: float) -> str:
    return f"{1e3 * t:.3g} ms"


def judge(name: str, dense: nn.Module, compact: nn.Module, input_shapes: Sequence[Sequence[int]],
          timer: LayerTimer | None = None, *,
          memory_format: torch.memory_format | None = None) -> tuple[bool, str]:
    """``(keep, text)``: keep the dense conv when its compact form is not faster; ``text`` gives both timings.

    A layer the forward did not reach (no input shapes) is not timed: ``(False, note)``; it costs nothing at
    this input size. ``memory_format``: as :func:`time_pair`.
    """
    keep, text, _ = judge_timed(name, dense, compact, input_shapes, timer, memory_format=memory_format)
    return keep, text


def judge_timed(name: str, dense: nn.Module, compact: nn.Module, input_shapes: Sequence[Sequence[int]],
                timer: LayerTimer | None = None, *,
                memory_format: torch.memory_format | None = None) -> tuple[bool, str, tuple[float, float] | None]:
    """:func:`judge` and its timings ``(dense seconds, compact seconds)`` (None: not reached, not timed)."""
    if not input_shapes:
        return False, "hardware_aware: not reached at input_size, not timed", None
    t_dense, t_compact = time_pair(name, dense, compact, input_shapes, timer, memory_format=memory_format)
    if t_compact >= t_dense:
        return True, f"kept (hardware_aware): compact {_ms(t_compact)} >= dense {_ms(t_dense)}", (t_dense, t_compact)
    return False, f"hardware_aware: compact {_ms(t_compact)} < dense {_ms(t_dense)}", (t_dense, t_compact)


def whole_model_guard(
    model: nn.Module, input_size: Sequence[int], layers: Sequence[tuple[str, float]],
    set_converted: Callable[[int], None], t_source: float, timer: LayerTimer | None = None, *,
    memory_format: torch.memory_format | None = None,
) -> tuple[int, float, float]:
    """``(k, converted seconds, final seconds)``: revert the ``k`` least-gaining layers until the whole model
    is not slower than its source.

    Layer-by-layer decisions miss what happens between layers (a dense conv that a compiler fuses with its
    BN and activation, a memory-bound neighbour), so the converted model is timed whole against the source's
    ``t_source`` (seconds per forward at ``input_size``). When it is slower, layers are reverted to their
    dense convs, the least-gaining first (``layers``: ``(name, relative gain)`` in that order), and the
    smallest ``k`` whose model is not slower is found by bisection (``set_converted(k)`` puts the model in
    the state "the first ``k`` of ``layers`` reverted"; ``k = len(layers)`` is the source model). Bisection
    assumes reverting more layers does not make the model slower, which the layer timings suggest; a noisy
    machine can still cost a few layers.
    """
    n = len(layers)
    t_conv = time_module("", model, [tuple(input_size)], timer, memory_format=memory_format)
    if t_conv <= t_source or n == 0:
        return 0, t_conv, t_conv
    lo, hi, t_hi = 1, n, t_source  # k = n: the source itself
    while lo < hi:
        mid = (lo + hi) // 2
        set_converted(mid)
        t = time_module("", model, [tuple(input_size)], timer, memory_format=memory_format)
        if t <= t_source:
            hi, t_hi = mid, t
        else:
            lo = mid + 1
    set_converted(hi)
    return hi, t_conv, t_hi
