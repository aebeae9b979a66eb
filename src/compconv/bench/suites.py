"""The two benchmark suites: per layer (a compact conv against the ``nn.Conv2d`` it replaces) and whole models
(a converted model against its vanilla base, each under every treatment).

Treatments (cumulative, each one row; the same for vanilla and converted models, so the baseline is fair):

* ``eager``: the model as built, eval mode, NCHW;
* ``deploy``: :func:`compconv.deploy` (BN folded; for converted models also the fused CompConv write and
  the shuffle folded into consumers); for a vanilla model this is "BN folded";
* ``deploy_cl``: the same in ``channels_last``;
* ``deploy_compile`` / ``deploy_cl_compile``: the same under ``torch.compile`` (inductor, freezing on for
  inference);
* ``deploy_dense1x1[_cl][_compile]`` (optional): ``deploy(collapse_1x1=True)``, 1x1 CompConvs collapsed
  into the dense 1x1 conv they equal (a no-op for vanilla models);
* ``deploy_lowrank1x1[_cl][_compile]`` (optional): ``deploy(collapse_1x1="lowrank")``, 1x1 CompConvs as
  two dense GEMMs (:class:`compconv.deploy.LowRankPointwise`);
* ``deploy_auto1x1[_cl][_compile]`` (optional): each 1x1 CompConv in whichever exact form (split, dense,
  lowrank) is timed fastest on the benchmark's own input (:func:`compconv.deploy.tune_pointwise`, eager);
* training step (batch of ``train_batch``, SGD, cross-entropy): ``train_eager``, ``train_cl``,
  ``train_compile`` (deploy does not apply: it is eval-only).

Beside vanilla and converted, each model case has its **dense alternatives at equal MACs**
(``compconv.bench.baselines``: the host uniformly width-scaled, kind ``dense_width``, and the host pruned by
Torch-Pruning's magnitude pruning, kind ``dense_prune``, each within 3% of the converted model's MACs),
given the same treatments and timed interleaved in the same group.

For each row: MACs per image (``compconv.profile``), median latency, the MAC ratio (vanilla / this), the
latency ratio (best vanilla / this), their quotient (the share of the theoretical speed-up that is real),
``vs_dense_width`` / ``vs_dense_prune`` (the best latency of that dense alternative among the treatments of
the same ``regime`` / this latency: above 1 this row is faster than the dense model with its MACs; regime
``compiled`` = the ``torch.compile`` treatments, ``eager`` = the others) and the achieved GMAC/s (a
training step counts 3x the forward MACs: forward, input and weight gradients).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compconv._quiet import silence_cuda_home_probe
from compconv.bench.timing import Measurement, interleaved_median, loadavg

__all__ = [
    "INFER_TREATMENTS",
    "LayerCase",
    "ModelCase",
    "TRAIN_TREATMENTS",
    "converted_layers",
    "default_layer_cases",
    "is_infer_treatment",
    "default_model_cases",
    "regime",
    "make_runner",
    "prepare_model",
    "run_layer_suite",
    "run_model_suite",
    "treatment_format",
]

INFER_TREATMENTS = ("eager", "deploy", "deploy_cl", "deploy_compile", "deploy_cl_compile")
DENSE_KINDS = ("dense_width", "dense_prune")  # row kinds of the dense alternatives (baselines.BASELINE_KINDS)
TRAIN_TREATMENTS = ("train_eager", "train_cl", "train_compile")
# Every inference treatment prepare_model knows: eager or deploy (optionally with a 1x1 form), then optionally
# channels_last, then optionally torch.compile ("cl", "compile", "cl_compile": eager with those).
_INFER_RE = re.compile(
    r"(?:eager|deploy(?:_dense1x1|_lowrank1x1|_auto1x1)?(?:_densehet|_autohet)?)(?:_cl)?(?:_compile)?"
    r"|cl(?:_compile)?|compile"
)
INFER_TREATMENTS_TEXT = (
    f"{', '.join(INFER_TREATMENTS)}, or deploy followed by any of, in this order: _dense1x1 / _lowrank1x1 / "
    "_auto1x1 (1x1 CompConvs as dense convs, two GEMMs, or the fastest form), _densehet / _autohet (HetConv "
    "layers as dense convs or the faster form), _cl, _compile (e.g. deploy_auto1x1_cl, deploy_densehet_cl_compile)"
)


def is_infer_treatment(treatment: object) -> bool:
    """Whether ``treatment`` names an inference treatment (``INFER_TREATMENTS_TEXT``) ``prepare_model`` knows."""
    return isinstance(treatment, str) and _INFER_RE.fullmatch(treatment) is not None


@dataclass(frozen=True)
class ModelCase:
    """A converted model and its vanilla base: ``base`` is a zoo name, ``"torchvision:NAME"`` or ``"timm:NAME"``
    (``compconv.serialization.build_base``), converted by ``convert(base, method, **options)``."""

    label: str
    base: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    size: int = 224
    num_classes: int = 1000


@dataclass(frozen=True)
class LayerCase:
    """One ``nn.Conv2d(c_in, c_out, k, stride, padding=k//2)`` at ``h x h`` input and ``batch``."""

    c_in: int
    c_out: int
    h: int
    k: int
    stride: int
    batch: int

    @property
    def label(self) -> str:
        return f"C{self.c_in}->{self.c_out} {self.h}x{self.h} k{self.k} s{self.stride} b{self.batch}"


def default_model_cases(methods: Sequence[str]) -> list[ModelCase]:
    """The issues' models: CompConv128 on CIFAR VGG-16 and ResNet-20, torchvision ResNet-50 (also C0 = 512) and
    MobileNetV2, and timm MobileNetV3-Large and EfficientNet-B0 when timm is installed; each peer's
    conversions (VGG-16 and ResNet-50; XSepConv, which only replaces depthwise convs, on MobileNetV3-small)."""
    import importlib.util

    timm = importlib.util.find_spec("timm") is not None
    cases: list[ModelCase] = []
    for m in methods:
        if m == "compconv":
            cases += [
                ModelCase("Comp-VGG16", "cifar_vgg16", "compconv", {"c0": 128}, 32, 10),
                ModelCase("Comp128-ResNet50", "resnet50", "compconv", {"c0": 128}, 224),
                ModelCase("Comp512-ResNet50", "resnet50", "compconv", {"c0": 512}, 224),
                # the model of the CIFAR-10 training evidence (docs/training.md)
                ModelCase("Comp128-ResNet20", "cifar_resnet20", "compconv", {"c0": 128}, 32, 10),
                ModelCase("Comp128-MobileNetV2", "mobilenet_v2", "compconv", {"c0": 128}, 224),
            ]
            if timm:
                cases += [
                    ModelCase("Comp128-MobileNetV3L", "timm:mobilenetv3_large_100", "compconv", {"c0": 128}, 224),
                    ModelCase("Comp128-EfficientNetB0", "timm:efficientnet_b0", "compconv", {"c0": 128}, 224),
                ]
        elif m == "xsepconv":
            # XSepConv replaces large-kernel depthwise convs: VGG-16 and ResNet-50 have none, so it is timed
            # on the model of its paper (MobileNetV3-small, 5x5 depthwise convs).
            cases.append(ModelCase("xsepconv-MobileNetV3S", "mobilenet_v3_small", m, {}, 224))
        else:
            cases += [
                ModelCase(f"{m}-VGG16", "cifar_vgg16", m, {}, 32, 10),
                ModelCase(f"{m}-ResNet50", "resnet50", m, {}, 224),
            ]
    return cases


def default_layer_cases(batches: Sequence[int] = (1, 32)) -> list[LayerCase]:
    """ResNet-like shapes: C = 64..512 at H = W = 56..7, k = 3 and 1, stride 1 and 2, the given batches."""
    cases = []
    for c, h in ((64, 56), (128, 28), (256, 14), (512, 7)):
        for k in (3, 1):
            for s in (1, 2):
                for b in batches:
                    cases.append(LayerCase(c, c, h, k, s, b))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Preparing a model under a treatment
# ---------------------------------------------------------------------------------------------------------
def prepare_model(
    model: nn.Module | str,
    treatment: str,
    *,
    num_classes: int = 1000,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    example_input: torch.Tensor | None = None,
) -> tuple[nn.Module, torch.memory_format]:
    """``model`` (or a zoo name) under an inference ``treatment``; returns it and the input memory format.

    ``example_input`` (the benchmark's input) is needed by the ``auto1x1`` / ``autohet`` treatments, which time
    layers on it.
    """
    from compconv import deploy, get_model
    from compconv.deploy import tune_pointwise

    if isinstance(model, str):
        model = get_model(model, num_classes=num_classes)
    if not is_infer_treatment(treatment):
        raise ValueError(f"treatment must be one of {INFER_TREATMENTS_TEXT}, but got {treatment!r}")
    tokens = treatment.split("_")
    if ("auto1x1" in tokens or "autohet" in tokens) and example_input is None:
        raise ValueError(f"treatment {treatment!r} times layers on example_input, which is missing")
    fmt = torch.channels_last if "cl" in tokens else torch.contiguous_format
    model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    if treatment.startswith("deploy"):
        het: bool | str = "auto" if "autohet" in tokens else "densehet" in tokens
        x = None
        if het == "auto":  # timed as it will run: in the treatment's memory format
            assert example_input is not None
            model = model.to(memory_format=fmt)  # type: ignore[call-overload]
            x = example_input.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        model = deploy(model, collapse_1x1="lowrank" if "lowrank1x1" in tokens else "dense1x1" in tokens,
                       collapse_hetconv=het, example_input=x)  # type: ignore[assignment]
    model = model.to(memory_format=fmt)  # type: ignore[call-overload]
    if "auto1x1" in tokens:
        assert example_input is not None
        tune_pointwise(model, example_input.to(device=device, dtype=dtype).contiguous(memory_format=fmt))
    if "compile" in treatment:
        silence_cuda_home_probe()  # inductor imports cpp_extension, whose CUDA probe is noise on CPU
        model = torch.compile(model)  # type: ignore[assignment]
    return model, fmt


def make_runner(
    model: nn.Module,
    treatment: str,
    x: torch.Tensor,
    *,
    num_classes: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Callable[[], Any]:
    """A zero-argument callable running one forward pass (inference) or one SGD step (``train_*``)."""
    if treatment.startswith("train_"):
        if treatment not in TRAIN_TREATMENTS:
            raise ValueError(f"training treatment must be one of {TRAIN_TREATMENTS}, but got {treatment!r}")
        t = treatment[len("train_") :]
        fmt = torch.channels_last if t == "cl" else torch.contiguous_format
        m = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=fmt).train()  # type: ignore[call-overload]
        if t == "compile":
            silence_cuda_home_probe()
        step_model = torch.compile(m) if t == "compile" else m
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
        xx = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        y = torch.randint(0, num_classes, (x.shape[0],), device=device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(step_model(xx).float(), y)
            loss.backward()
            opt.step()

        return step
    m, fmt = prepare_model(model, treatment, num_classes=num_classes, device=device, dtype=dtype, example_input=x)
    xx = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    freezing = "compile" in treatment and device == "cpu"

    def infer() -> Any:
        # Inductor's freezing (weight prepacking, constant folding) needs inference mode; the config is
        # read when the first call compiles.
        cfg = torch._inductor.config.patch(freezing=True) if freezing else contextlib.nullcontext()
        with torch.inference_mode(), cfg:
            return m(xx)

    return infer


# ---------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------
def _row(**kw: Any) -> dict[str, Any]:
    return kw


def converted_layers(model: nn.Module) -> int:
    """How many compact convs (``CompactConv2d`` modules) ``model`` holds: 0 means nothing was converted."""
    from compconv.layers.base import CompactConv2d

    return sum(isinstance(m, CompactConv2d) for m in model.modules())


def regime(treatment: str) -> str:
    """``"compiled"`` for the ``torch.compile`` treatments, else ``"eager"`` (reported separately)."""
    return "compiled" if "compile" in treatment else "eager"


def build_case(case: ModelCase) -> tuple[nn.Module, nn.Module]:
    """``(vanilla, converted)`` for ``case`` (``base`` built by ``compconv.serialization.build_base``)."""
    from compconv import convert
    from compconv.serialization import build_base

    vanilla = build_base(case.base, num_classes=case.num_classes)
    converted = convert(build_base(case.base, num_classes=case.num_classes), case.method, **dict(case.options))
    return vanilla, converted  # type: ignore[return-value]


def _macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    from compconv import profile

    return int(profile(copy.deepcopy(model).eval(), shape).total_macs)


def _finish_rows(rows: list[dict[str, Any]]) -> None:
    """Add the ratios to one interleaved group's rows: against the best vanilla, the same treatment, and the
    best of each dense alternative in the same regime (``vs_dense_width``, ``vs_dense_prune``)."""
    vanilla_by_treat = {r["treatment"]: r["latency_s"] for r in rows if r["kind"] == "vanilla"}
    finite = [v for v in vanilla_by_treat.values() if v == v]  # not nan (failed configurations)
    best_vanilla = min(finite) if finite else float("nan")
    best_dense: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (r["kind"], regime(r["treatment"]))
        if r["kind"] in DENSE_KINDS and r["latency_s"] == r["latency_s"]:
            best_dense[key] = min(best_dense.get(key, math.inf), r["latency_s"])
    for r in rows:
        lat = r["latency_s"]
        ok = lat == lat and best_vanilla == best_vanilla  # not nan
        r["latency_ratio"] = best_vanilla / lat if ok else float("nan")
        same = vanilla_by_treat.get(r["treatment"], float("nan"))
        r["latency_ratio_same_treatment"] = same / lat if ok and same == same else float("nan")
        r["real_share"] = r["latency_ratio"] / r["mac_ratio"] if ok else float("nan")
        r["regime"] = regime(r["treatment"])
        for kind in DENSE_KINDS:
            d = best_dense.get((kind, r["regime"]))
            r[f"vs_{kind}"] = d / lat if d is not None and lat == lat else float("nan")


def _measure_group(
    cands: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int,
    min_time: float,
    device: str,
    log: Callable[[str], None],
) -> tuple[dict[str, Measurement], list[float] | None, list[float] | None, float]:
    load0 = loadavg()
    t0 = time.time()
    # Each compiled model of a group is a new recompilation of the same forward code (the models share their
    # classes): past dynamo's recompile_limit (8) torch silently runs the rest eagerly, which would time eager
    # code as "compiled". So every group starts from a clean dynamo cache with room for all its models.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=max(64, 2 * len(cands))):
        res = interleaved_median(cands, repeats=repeats, warmup=warmup, min_time=min_time, device=device)
    for n, m in res.items():
        if m.error:
            log(f"    {n}: FAILED {m.error}")
    return res, load0, loadavg(), time.time() - t0


def run_model_suite(
    cases: Sequence[ModelCase],
    *,
    batches: Sequence[int] = (1, 32),
    train_batch: int | None = 32,
    treatments: Sequence[str] = INFER_TREATMENTS,
    train_treatments: Sequence[str] = TRAIN_TREATMENTS,
    repeats: int = 5,
    warmup: int = 2,
    min_time: float = 0.05,
    size_override: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    ceiling_gmacs: float | None = None,
    dense_baselines: Sequence[str] = ("width", "prune"),
    hardware_aware: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time every case's vanilla, converted and dense-alternative models under every treatment, interleaved
    per (case, batch).

    ``hardware_aware``: also time, at each inference batch ``B``, the case converted with
    ``convert(..., hardware_aware=True, input_size=(B, 3, H, W))`` (kind ``converted_hw``; its ``hw_kept``
    lists the layers it kept dense because their compact form was not faster), so the report can say
    whether the hardware-aware model is ever slower than its vanilla source. Its layers are timed on
    ``device`` in ``dtype``, in NCHW for the NCHW treatments and in ``channels_last`` for the ``_cl`` ones:
    one conversion per (batch, memory format), each timed under the treatments of its format.

    ``dense_baselines``: which dense alternatives at the converted model's MACs to add (``"width"``,
    ``"prune"``: ``compconv.bench.baselines``; ``()`` for none). One that cannot be built (Torch-Pruning not
    installed, a target out of reach) is logged and reported as an error row; the others are timed.

    Returns one row per (case, batch or train, model kind, treatment); dense rows carry their ``dense``
    record (method, width factor or pruning ratio, MACs and error against the target).
    """
    rows: list[dict[str, Any]] = []
    for case in cases:
        size = size_override or case.size
        torch.manual_seed(0)
        try:
            vanilla, converted = build_case(case)
        except Exception as e:  # noqa: BLE001 - a peer that cannot convert this model is reported, not fatal
            log(f"  {case.label}: cannot build ({type(e).__name__}: {e})")
            rows.append(_row(model=case.label, base=case.base, method=case.method, error=str(e)))
            continue
        n_converted = converted_layers(converted)
        if n_converted == 0:  # the vanilla model under another name: timing it would be no result at all
            log(f"  {case.label}: {case.method} converted 0 layers of {case.base}; skipped (not a result)")
            rows.append(_row(model=case.label, base=case.base, method=case.method, converted_layers=0,
                             error=f"{case.method} converted 0 layers of {case.base}: skipped, not a result"))
            continue
        shape = (1, 3, size, size)
        macs = {"vanilla": _macs(vanilla, shape), "converted": _macs(converted, shape)}
        models = {"vanilla": vanilla, "converted": converted}
        records: dict[str, dict[str, Any]] = {}
        for kind, (model, rec) in _dense_models(case, macs["converted"], shape, dense_baselines, rows, log).items():
            models[kind], macs[kind], records[kind] = model, rec["macs"], rec
        settings: list[tuple[str, int, Sequence[str]]] = [("infer", b, treatments) for b in batches]
        if train_batch and train_treatments:
            settings.append(("train", train_batch, train_treatments))
        for mode, batch, treats in settings:
            x = torch.randn(batch, 3, size, size)
            group_models = dict(models)
            # converted_hw: one hardware-aware conversion per treatment, its layers timed on this run's device
            # and dtype in the treatment's memory format, the whole model as the treatment runs it (deployed,
            # compiled): {treatment: (model, kept layers, MACs)}
            hw: dict[str, tuple[nn.Module, list[str], int]] = {}
            if hardware_aware and mode == "infer":
                for t in treats:
                    hw_model, kept = _hardware_aware_model(case, (batch, 3, size, size), log, device=device,
                                                           dtype=dtype, treatment=t)
                    hw[t] = (hw_model, kept, _macs(hw_model, shape))
            cands: dict[str, Callable[[], Any]] = {}
            for kind in [*group_models, *(["converted_hw"] if hw else [])]:
                for t in treats:
                    model = hw[t][0] if kind == "converted_hw" else group_models[kind]
                    try:
                        cands[f"{kind}/{t}"] = make_runner(
                            model, t, x, num_classes=case.num_classes, device=device, dtype=dtype
                        )
                    except Exception as e:  # noqa: BLE001
                        log(f"    {kind}/{t}: cannot prepare ({type(e).__name__}: {e})")
            log(f"  {case.label} {mode} batch {batch}: timing {len(cands)} configurations")
            res, load0, load1, wall = _measure_group(
                cands, repeats=repeats, warmup=warmup, min_time=min_time, device=device, log=log
            )
            group: list[dict[str, Any]] = []
            for name, m in res.items():
                kind, t = name.split("/")
                converted_kind = kind in ("converted", "converted_hw")
                flops_factor = 3 if mode == "train" else 1
                lat = m.median
                hw_model, hw_kept, hw_macs = hw[t] if kind == "converted_hw" else (None, [], 0)
                kind_macs = hw_macs if kind == "converted_hw" else macs[kind]
                gmacs = flops_factor * kind_macs * batch / lat / 1e9 if lat == lat else float("nan")
                rec = records.get(kind)
                group.append(
                    _row(
                        model=case.label,
                        base=case.base,
                        method=case.method if converted_kind else (rec["method"] if rec else "vanilla"),
                        options=case.options if converted_kind else ({rec["knob"]: rec["value"]} if rec else {}),
                        converted_layers=(converted_layers(hw_model if hw_model is not None else group_models[kind])
                                          if converted_kind else 0),
                        kind=kind,
                        mode=mode,
                        batch=batch,
                        size=size,
                        treatment=t,
                        macs=kind_macs,
                        mac_ratio=macs["vanilla"] / kind_macs,
                        latency_s=lat,
                        iqr_s=m.iqr,
                        inner=m.inner,
                        gmacs_per_s=gmacs,
                        ceiling_share=gmacs / ceiling_gmacs if ceiling_gmacs else None,
                        error=m.error,
                        loadavg_before=load0,
                        loadavg_after=load1,
                        group_wall_s=wall,
                        **({"dense": rec} if rec else {}),
                        **({"hw_kept": hw_kept} if kind == "converted_hw" else {}),
                    )
                )
            _finish_rows(group)
            for r in group:
                log(
                    f"    {r['kind']:11s} {r['treatment']:18s} {1e3 * r['latency_s']:9.2f} ms  "
                    f"MACx{r['mac_ratio']:.2f} speedx{r['latency_ratio']:.2f} share {r['real_share']:.2f} "
                    + "".join(f"vs dense {k} x{r[f'vs_dense_{k}']:.2f} " for k in ("width", "prune")
                              if r[f"vs_dense_{k}"] == r[f"vs_dense_{k}"])  # not timed (NaN): not shown
                    + f"{r['gmacs_per_s']:.1f} GMAC/s"
                )
            rows += group
    return rows


def treatment_format(treatment: str) -> torch.memory_format:
    """The memory format a treatment runs in: ``channels_last`` for the ``_cl`` ones, else NCHW."""
    return torch.channels_last if "cl" in treatment.split("_") else torch.contiguous_format


def _hardware_aware_model(case: ModelCase, input_size: tuple[int, int, int, int], log: Callable[[str], None],
                          *, device: str = "cpu", dtype: torch.dtype = torch.float32, treatment: str = "eager",
                          ) -> tuple[nn.Module, list[str]]:
    """``case`` converted with ``hardware_aware=True`` at ``input_size`` for ``treatment``, and the names of the
    layers it kept dense. The host is first moved to ``device``, ``dtype`` and the treatment's memory format,
    so every layer is timed where and as the benchmark runs it (``convert`` times in the model's own device,
    dtype and layout); the whole-model check (source against converted, ``hardware_aware.whole_model_guard``)
    times the model as ``treatment`` runs it (``make_runner``: deployed, channels_last, compiled), which is
    where fusions a layer timing cannot see show up."""
    from compconv import convert
    from compconv.hardware_aware import benchmark_timer
    from compconv.serialization import build_base

    t0 = time.time()
    host = build_base(case.base, num_classes=case.num_classes).to(  # type: ignore[call-overload]
        device=device, dtype=dtype, memory_format=treatment_format(treatment))

    def timer(name: str, module: nn.Module, x: torch.Tensor) -> float:
        if name:
            return benchmark_timer(name, module, x)
        torch._dynamo.reset()  # each state of the model compiles afresh (no recompile limit reached)
        run = make_runner(module, treatment, x, num_classes=case.num_classes, device=device, dtype=dtype)
        # a whole-model decision reverts layers: the median of 5 rounds, not one block (a 0.5 s model would
        # otherwise be judged on a single call, and noise would revert layers that pay)
        return interleaved_median({"m": run}, repeats=5, warmup=2, min_time=0.2, device=device)["m"].median

    model, rep = convert(host, case.method, hardware_aware=True, input_size=input_size, return_report=True,
                         timer=timer, **dict(case.options))
    kept = [r.name for r in rep.kept if "hardware_aware" in r.reason]
    whole = sum("whole model" in r.reason for r in rep.kept)
    log(f"  {case.label}: hardware_aware at {tuple(input_size)} ({device}, {str(dtype).replace('torch.', '')}, "
        f"{treatment}) kept {len(kept)} layer(s) dense, {whole} of them by the whole-model check "
        f"({time.time() - t0:.0f} s of timing)")
    return model, kept


def _dense_models(case: ModelCase, target: int, shape: tuple[int, ...], kinds: Sequence[str],
                  rows: list[dict[str, Any]], log: Callable[[str], None]) -> dict[str, tuple[nn.Module, dict]]:
    """``{"dense_width": (model, record), ...}`` at ``target`` MACs; failures become error rows in ``rows``."""
    from compconv.bench.baselines import BASELINE_KINDS, dense_baselines

    bad = [k for k in kinds if k not in BASELINE_KINDS]
    if bad:
        raise ValueError(f"dense_baselines must be among {BASELINE_KINDS}, but got {list(kinds)}")
    out: dict[str, tuple[nn.Module, dict]] = {}
    for k in kinds:
        try:
            ((model, rec),) = dense_baselines(case.base, target, shape, kinds=(k,),
                                              host_kwargs={"num_classes": case.num_classes}).values()
        except Exception as e:  # noqa: BLE001 - a missing baseline is reported; the others are still timed
            log(f"  {case.label}: no dense_{k} baseline ({type(e).__name__}: {e})")
            rows.append(_row(model=case.label, base=case.base, method=f"dense_{k}", kind=f"dense_{k}",
                             error=f"no dense_{k} baseline: {type(e).__name__}: {e}"))
            continue
        log(f"  {case.label}: dense_{k} = {rec.method}, {rec.knob} {rec.value:.3f}, {rec.macs / 1e6:.1f}M MACs "
            f"({100 * rec.rel_error:+.1f}% vs the converted model's)")
        out[f"dense_{k}"] = (model, rec.as_dict())
    return out


def _layer_modules(
    case: LayerCase, methods: Sequence[str], log: Callable[[str], None], width_multiples: Sequence[int] = ()
) -> dict[str, nn.Module]:
    from compconv.layers.base import get_method

    conv = nn.Conv2d(case.c_in, case.c_out, case.k, case.stride, case.k // 2, bias=False)
    mods: dict[str, nn.Module] = {"vanilla": conv}
    variants: list[tuple[str, str, dict[str, Any]]] = [(m, m, {}) for m in methods]
    if "compconv" in methods:
        variants += [(f"compconv_w{w}", "compconv", {"width_multiple": w}) for w in width_multiples]
    for label, m, hp in variants:
        cls = get_method(m)
        hp, _ = cls.resolve_hparams(conv, **hp)
        reason = cls.ineligible_reason(conv, **hp)
        if reason:
            log(f"    {label}: skipped ({reason})")
            continue
        mods[label] = cls.from_conv(conv, **hp).eval()
    return mods


def run_layer_suite(
    cases: Sequence[LayerCase],
    methods: Sequence[str],
    *,
    treatments: Sequence[str] = ("eager", "deploy", "deploy_cl"),
    width_multiples: Sequence[int] = (),
    repeats: int = 5,
    warmup: int = 2,
    min_time: float = 0.05,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    ceiling_gmacs: float | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Each method's module against the ``nn.Conv2d`` it replaces, per shape, interleaved per shape."""
    rows: list[dict[str, Any]] = []
    for case in cases:
        torch.manual_seed(0)
        mods = _layer_modules(case, methods, log, width_multiples)
        x = torch.randn(case.batch, case.c_in, case.h, case.h)
        shape = (1, case.c_in, case.h, case.h)
        macs = {k: _macs(m, shape) for k, m in mods.items()}
        cands: dict[str, Callable[[], Any]] = {}
        for kind, mod in mods.items():
            for t in treatments:
                cands[f"{kind}/{t}"] = make_runner(mod, t, x, num_classes=1, device=device, dtype=dtype)
        res, load0, load1, wall = _measure_group(
            cands, repeats=repeats, warmup=warmup, min_time=min_time, device=device, log=log
        )
        group = []
        for name, m in res.items():
            kind, t = name.split("/")
            lat = m.median
            gmacs = macs[kind] * case.batch / lat / 1e9 if lat == lat else float("nan")
            group.append(
                _row(
                    layer=case.label,
                    **asdict(case),
                    method=kind,
                    kind="vanilla" if kind == "vanilla" else "converted",
                    treatment=t,
                    macs=macs[kind],
                    mac_ratio=macs["vanilla"] / macs[kind] if macs[kind] else math.inf,
                    latency_s=lat,
                    iqr_s=m.iqr,
                    gmacs_per_s=gmacs,
                    ceiling_share=gmacs / ceiling_gmacs if ceiling_gmacs else None,
                    error=m.error,
                    loadavg_before=load0,
                    loadavg_after=load1,
                    group_wall_s=wall,
                )
            )
        _finish_rows(group)
        best = {}
        for r in group:
            if r["latency_s"] == r["latency_s"] and (
                r["method"] not in best or r["latency_s"] < best[r["method"]]["latency_s"]
            ):
                best[r["method"]] = r
        log(
            f"  {case.label}: "
            + ", ".join(
                f"{k} {1e3 * r['latency_s']:.2f}ms (share {r['real_share']:.2f})" for k, r in best.items()
            )
        )
        rows += group
    return rows
