"""End-to-end: F-SAM training steps of a CIFAR ResNet-18 on a synthetic batch.

The authors' published per-parameter F-SAM loop (:mod:`fsam_fused.published`) against
``FSAM`` with ``backend="auto"``, both with the F-SAM recipe's SGD base (lr 0.05, momentum
0.9, weight decay 1e-3, rho 0.1, sigma 1, lmbda 0.6). Reports the whole step (two forward and
backward passes plus the optimizer) and the optimizer's share of it.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..optimizer import FSAM
from ..published import FriendlySAM
from .suite import device_name, sync, versions

RECIPE = dict(rho=0.1, sigma=1.0, lmbda=0.6, lr=0.05, momentum=0.9, weight_decay=1e-3)


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 of the F-SAM recipes (3x3 stem, no max-pool): 62 parameter
    tensors, 11,173,962 parameters, the ``resnet18`` preset's shapes in the same order."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c_in = [], 64
        for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(c_in, c, stride), BasicBlock(c, c, 1)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _optimizer(kind, params):
    kw = dict(RECIPE)
    if kind == "published":
        return FriendlySAM(params, torch.optim.SGD, **kw)
    return FSAM(params, torch.optim.SGD, **kw)  # backend="auto"


def run(device, batch=128, steps=None, warmup=1, log=print, channels_last=False):
    """One record per optimizer: median step ms and optimizer ms over ``steps`` steps. The
    two optimizers (each with its own model from the same initial weights) take turns step
    by step, so a slow spell of a shared machine hits both alike."""
    cuda = device.type == "cuda"
    steps = steps or (20 if cuda else 3)
    meta = {"device": device.type, "device_name": device_name(device), **versions()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def clock():  # seconds, once the device has finished what was queued
        sync(device)
        return time.perf_counter()

    runs = {}
    for kind, name in (("published", "published-loop"), ("fsam", "fsam-auto")):
        torch.manual_seed(0)
        model = ResNet18().to(device, memory_format=fmt)
        runs[name] = (model, _optimizer(kind, model.parameters()), [], [])
    log(f"e2e ResNet-18 batch {batch} on {device.type}, {', '.join(runs)} taking turns: ", end="")
    for i in range(warmup + steps):
        for model, opt, step_ms, opt_ms in runs.values():
            t0 = clock()
            F.cross_entropy(model(x), y).backward()
            t1 = clock()
            opt.first_step(zero_grad=True)
            t2 = clock()
            F.cross_entropy(model(x), y).backward()
            t3 = clock()
            opt.second_step(zero_grad=True)
            t4 = clock()
            if i >= warmup:
                step_ms.append((t4 - t0) * 1e3)
                opt_ms.append(((t2 - t1) + (t4 - t3)) * 1e3)
        log(".", end="")
    log("")
    records = []
    for name, (_model, opt, step_ms, opt_ms) in runs.items():
        backend = None
        if isinstance(opt, FSAM):  # the backends "auto" chose
            backend = ",".join(sorted({s.backend for s in opt.plan_summary()}))
        ms, oms = statistics.median(step_ms), statistics.median(opt_ms)
        records.append(
            {
                "kind": "e2e",
                "backend": name,
                "fsam_backend": backend,
                "preset": f"resnet18-cifar-train-b{batch}",
                "dtype": "float32",
                **meta,
                "ms": ms,
                "optimizer_ms": oms,
                "optimizer_share": oms / ms,
                "steps": steps,
            }
        )
    pub = records[0]["ms"]
    for r in records:
        r["speedup_vs_published"] = pub / r["ms"]
    return records
