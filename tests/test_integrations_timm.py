"""The timm recipe of docs/integrations.md: a BatchNorm CNN in channels_last, the model under
``torch.compile``, both F-SAM passes, ``bn_frozen`` around the second forward, against the
same loop in eager mode on a copy (several steps, fresh data each).

With timm installed, the model is timm's ``resnet18`` (pretrained=False). timm needs
torchvision, and no torchvision on PyPI runs beside the CPU build of torch 2.13 that CI
installs, so CI runs the same recipe on ``TimmShapedResNet`` (timm's BasicBlock layout,
smaller); the real timm model was run in a separate environment (torch 2.14.1 +
torchvision 0.29.1 + timm 1.0.31, CPU): see docs/integrations.md."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from fsam_fused import FSAM, bn_frozen

HAVE_TIMM = importlib.util.find_spec("timm") is not None
STEPS = 3


class Block(torch.nn.Module):
    """timm's resnet BasicBlock: conv-bn-relu, conv-bn, shortcut (conv-bn when it strides)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        short = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + short)


class TimmShapedResNet(torch.nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.fc = torch.nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


def make_model():
    if HAVE_TIMM:
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=10), 32
    return TimmShapedResNet(), 16


def make_opt(model):
    return FSAM(
        model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0, lmbda=0.9,
        lr=0.05, momentum=0.9, weight_decay=5e-4,
    )  # fmt: skip


def step(model, forward, opt, step, size):
    """One step of the recipe's loop: channels_last input, both passes, bn_frozen on the
    second."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 3, size, size, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()
    loss_fn(forward(x), y).backward()
    opt.first_step(zero_grad=True)
    with bn_frozen(model):
        loss_fn(forward(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.slow
def test_timm_recipe_compiled_channels_last_matches_eager():
    """Step by step from the same weights and optimizer state: the compiled step against the
    eager one. Each comparison sees one step of Inductor's reordered float32 arithmetic; the
    eager run's state is then copied over, so it does not compound over steps (a deep
    BatchNorm net drifts apart over steps at any precision-level difference)."""
    torch.manual_seed(0)
    model, size = make_model()
    model = model.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    compiled = torch.compile(model)
    opt, ref_opt = make_opt(model), make_opt(ref)
    for i in range(STEPS):
        step(model, compiled, opt, i, size)
        step(ref, ref, ref_opt, i, size)
        got, want = model.state_dict(), ref.state_dict()
        for name, w in want.items():
            torch.testing.assert_close(
                got[name], w, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {i}, {name}: {m}"
            )
        # The EMA (first-pass gradients) and the momentum (second-pass gradients) too.
        for p, q in zip(model.parameters(), ref.parameters()):
            for mine, theirs in (
                (opt.state, ref_opt.state),
                (opt.base_optimizer.state, ref_opt.base_optimizer.state),
            ):
                assert mine[p].keys() == theirs[q].keys() != set()
                for key in mine[p]:
                    torch.testing.assert_close(mine[p][key], theirs[q][key], rtol=1e-4, atol=1e-5)
        model.load_state_dict(want)
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # own buffers, not shared
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    counts = {int(t) for n, t in ref.state_dict().items() if n.endswith("num_batches_tracked")}
    assert counts == {STEPS}  # one running-stats update per step: the first pass only
    assert any(not torch.equal(start[n], model.state_dict()[n]) for n in start if "weight" in n)
