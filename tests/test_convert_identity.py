"""convert() works on module identity, not module names: aliases, tied convs, calls per forward, unreached convs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compconv
from compconv import CompConv2d, convert


class Aliased(nn.Module):
    """The conv the Sequential runs is also an attribute (``self.conv2``), registered *first*."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = body[0]  # the alias comes before the path that runs it
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


class Tied(nn.Module):
    """One conv shared by two parents (tied weights), run by both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        shared = nn.Conv2d(16, 16, 3, padding=1)
        self.a = nn.Sequential(shared, nn.ReLU())
        self.b = nn.Sequential(shared, nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.stem(x)))


def _dense_convs_run(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the plain nn.Conv2d modules (not a compact conv's parts) that the forward executes."""
    parts = {id(p) for m in model.modules() if isinstance(m, compconv.CompactConv2d) for p in m.modules()}
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: ran.append(n))
             for n, m in model.named_modules() if type(m) is nn.Conv2d and id(m) not in parts]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return ran


def test_an_aliased_conv_is_replaced_at_every_name_and_the_executed_path_is_converted() -> None:
    model = Aliased()
    _, rep = convert(model, "compconv", depth=1, input_size=(1, 3, 8, 8), return_report=True)
    assert model.conv2 is model.body[0] and isinstance(model.body[0], CompConv2d)
    assert _dense_convs_run(model, torch.randn(1, 3, 8, 8)) == ["stem"]  # only the kept stem is dense
    fired: list[int] = []
    model.conv2.register_forward_hook(lambda m, i, o: fired.append(1))  # hook on the alias: it runs
    model(torch.randn(1, 3, 8, 8))
    assert fired == [1]
    # One row for the one module, listing its other name; MACs of one call: 8*8*16*16*9 = 147,456.
    assert [(r.name, r.aliases, r.action) for r in rep.layers] == [
        ("stem", [], "kept"), ("conv2", ["body.0"], "converted")]
    assert rep.layers[1].macs_before == 8 * 8 * 16 * 16 * 9 and "(= body.0)" in str(rep)


def test_tied_convs_stay_tied_with_one_replacement() -> None:
    model = Tied()
    _, rep = convert(model, "ghost", input_size=(1, 3, 8, 8), return_report=True)
    assert isinstance(model.a[0], compconv.get_method("ghost")) and model.a[0] is model.b[0]
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))  # no duplicated copy
    assert _dense_convs_run(model, torch.randn(1, 3, 8, 8)) == ["stem"]
    shared = rep.layers[1]
    assert (shared.name, shared.aliases, shared.calls) == ("a.0", ["b.0"], 2)
    # Two calls of a 16 -> 16 3x3 conv on 8x8: 2 * 8*8*16*16*9 = 294,912 MACs before.
    assert shared.macs_before == 2 * 8 * 8 * 16 * 16 * 9
    assert shared.macs_after == 2 * compconv.profile(model.a[0], (1, 16, 8, 8)).total_macs


class SharedHead(nn.Module):
    """A detection-style head: one conv shared over two pyramid levels (32x32 and 16x16)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.head = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.stem(x)
        p4 = self.down(p3)
        return [self.head(p3), self.head(p4)]


def test_a_module_called_on_every_pyramid_level_sums_every_call() -> None:
    _, rep = convert(SharedHead(), "compconv", depth=1, input_size=(1, 3, 32, 32), return_report=True)
    head = next(r for r in rep.layers if r.name == "head")
    # By hand, H W C_out C_in k^2 per level: 32*32*32*32*9 = 9,437,184 and 16*16*32*32*9 = 2,359,296.
    assert head.calls == 2 and head.macs_before == 32 * 32 * 32 * 32 * 9 + 16 * 16 * 32 * 32 * 9 == 11_796_480
    conv = SharedHead()
    assert rep.totals()["macs_before"] == compconv.profile(conv, (1, 3, 32, 32)).total_macs


@pytest.mark.slow
def test_retinanet_report_macs_equal_profile() -> None:
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    before = compconv.profile(model, (1, 3, 128, 128))
    conv_macs = sum(r.macs for r in before.rows if r.type == "Conv2d")
    # XSepConv takes depthwise convs only and RetinaNet has none: a report with one traced forward.
    with pytest.warns(UserWarning, match="converted 0 of"):
        _, rep = convert(model, "xsepconv", input_size=(1, 3, 128, 128), return_report=True)
    assert rep.totals()["macs_before"] == conv_macs == before.total_macs  # RetinaNet has no Linear
    # The shared head convs run on 5 levels (P3..P7: 16, 8, 4, 2, 1 px a side at 128 input): 256 -> 256 3x3
    # gives (256 + 64 + 16 + 4 + 1) * 256 * 256 * 9 = 201,129,984 MACs.
    row = next(r for r in rep.layers if r.name == "head.classification_head.conv.0.0")
    assert row.calls == 5 and row.macs_before == 341 * 256 * 256 * 9


class TrainOnlyBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.main = nn.Conv2d(16, 16, 3, padding=1)
        self.aux = nn.Conv2d(16, 16, 3, padding=1)  # used in training only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.main(self.stem(x))
        return y + self.aux(y) if self.training else y


def test_convs_the_forward_never_reaches_show_a_dash_and_the_totals_say_so(capsys: pytest.CaptureFixture) -> None:
    model = TrainOnlyBranch()
    _, rep = convert(model, "compconv", depth=1, input_size=(1, 3, 8, 8), return_report=True, verbose=True)
    printed = capsys.readouterr().out
    aux = next(r for r in rep.layers if r.name == "aux")
    assert aux.action == "converted" and aux.calls == 0 and aux.macs_before is None
    assert [r.name for r in rep.not_run] == ["aux"]
    # Totals over the layers that ran: stem 8*8*16*3*9 = 27,648 and main 8*8*16*16*9 = 147,456.
    assert rep.totals()["macs_before"] == 8 * 8 * 16 * 3 * 9 + 8 * 8 * 16 * 16 * 9 == 175_104
    assert rep.totals()["not_run"] == 1
    assert "1 conv(s) not reached by the forward" in printed and "175,104" in printed
    aux_line = next(line for line in printed.splitlines() if line.startswith("aux "))
    assert " - " in aux_line
    model.train()
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 16, 8, 8)  # the converted branch works in training


@pytest.mark.slow
def test_googlenet_aux_heads_do_not_crash_the_report() -> None:
    import torchvision

    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    _, rep = convert(model, "compconv", c0=64, input_size=(1, 3, 64, 64), return_report=True, verbose=True)
    aux = [r for r in rep.layers if r.name.startswith("aux")]
    assert aux and all(r.calls == 0 and r.macs_before is None for r in aux)
    assert rep.totals()["not_run"] == len(aux) and f"{len(aux)} conv(s) not reached" in str(rep)
