"""HetConv's training step in its two forms, beside the vanilla model: what ``train_form`` buys.

    python benchmarks/hetconv_train_form.py --models cifar_resnet20 cifar_resnet56 cifar_vgg16_li \
        --batch 128 --threads 2 --json docs/results/hetconv_train_form.json

Each zoo model is converted with ``convert(model, "hetconv", part=P)`` twice, ``train_form="grouped"`` (the
grouped ops of Eq. 4's architecture) and ``"dense"`` (one dense conv on ``dense_weight()``, the default),
from the same weights. One SGD step (forward, cross-entropy, backward, step: the bench's ``train_eager``) of
the vanilla model and of both forms is timed round-robin (``compconv.bench.timing.interleaved_median``,
median of ``--repeats``). Before timing, one step of each form from the same weights and batch is checked to
give the same parameters (the two forms compute the same function and gradients). Prints a Markdown table
and writes JSON with the machine named. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import compconv
from compconv.bench.suites import make_runner
from compconv.bench.timing import hardware_info, interleaved_median, loadavg

FORMS = ("grouped", "dense")


def one_step_agrees(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Max abs difference of the parameters after one SGD step of each form from the same weights (float64)."""
    after = []
    for form in FORMS:
        m = copy.deepcopy(model).double().train()
        for mod in m.modules():
            if isinstance(mod, compconv.HetConv2d):
                mod.train_form = form
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(m(x.double()), y).backward()
        opt.step()
        after.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    return float((after[0] - after[1]).abs().max())


def measure(name: str, part: int, batch: int, repeats: int, size: int) -> dict:
    torch.manual_seed(0)
    vanilla = compconv.get_model(name)
    with torch.no_grad():  # eval: a BatchNorm1d head cannot train on one image
        num_classes = vanilla.eval()(torch.zeros(1, 3, size, size)).shape[1]
    vanilla.train()
    het = compconv.convert(copy.deepcopy(vanilla), "hetconv", part=part, verbose=False)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch,))
    diff = one_step_agrees(het, x[:8], y[:8])
    if diff > 1e-9:
        raise AssertionError(f"{name}: the two training forms disagree after one step (max |diff| {diff:.3g})")
    models = {"vanilla": vanilla}
    for form in FORMS:
        m = copy.deepcopy(het)
        for mod in m.modules():
            if isinstance(mod, compconv.HetConv2d):
                mod.train_form = form
        models[f"hetconv_{form}"] = m
    runners = {k: make_runner(m, "train_eager", x, num_classes=num_classes) for k, m in models.items()}
    res = interleaved_median(runners, repeats=repeats, warmup=2, min_time=0.5)
    ms = {k: 1e3 * r.median for k, r in res.items()}
    macs = {k: compconv.profile(m, (1, 3, size, size)).total_macs for k, m in models.items()}
    return {"model": name, "part": part, "batch": batch, "size": size, "step_ms": ms,
            "samples_ms": {k: [1e3 * t for t in r.times] for k, r in res.items()}, "macs": macs,
            "one_step_max_param_diff_float64": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56", "cifar_vgg16_li"],
                   help="zoo names of vanilla models (compconv.list_models())")
    p.add_argument("--part", type=int, default=4, help="HetConv's P (default 4)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="input height = width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    a = p.parse_args(argv)
    for n in a.models:
        if n not in compconv.list_models():
            p.error(f"--models: {n!r} is not a zoo model; choose from compconv.list_models()")
    if a.batch < 1 or a.repeats < 1 or a.part < 1:
        p.error("--batch, --repeats and --part must be >= 1")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    out = {"hardware": hardware_info("cpu"), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "loadavg_start": loadavg(), "rows": []}
    print("| model | P | batch | vanilla step (ms) | HetConv grouped (ms) | HetConv dense form (ms) | "
          "grouped / vanilla | dense / vanilla | grouped / dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        r = measure(name, a.part, a.batch, a.repeats, a.size)
        out["rows"].append(r)
        v, g, d = (r["step_ms"][k] for k in ("vanilla", "hetconv_grouped", "hetconv_dense"))
        print(f"| {name} | {a.part} | {a.batch} | {v:.1f} | {g:.1f} | {d:.1f} | {g / v:.2f} | {d / v:.2f} | "
              f"{g / d:.2f} |", flush=True)
    out["loadavg_end"] = loadavg()
    if a.json:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(a.json)) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, a.json)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
