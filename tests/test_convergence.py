"""Convergence on real data, in the habit of Liger-Kernel's test/convergence: train a small MLP
and a small CNN with BatchNorm on scikit-learn's digits (shipped with the package, no download)
for a few hundred F-SAM steps with each backend, and the authors' published FriendlySAM with the
same seed, init and data order; the loss curves and final weights must agree.

scikit-learn is part of the ``test`` extra: without it this file fails rather than skips.
"""

import functools

import pytest
import torch
from sklearn.datasets import load_digits

from fsam_fused import FSAM
from fsam_fused.published import FriendlySAM
from helpers import backend_available

HP = dict(rho=0.1, sigma=1.0, lmbda=0.6, lr=0.05, momentum=0.9, weight_decay=1e-3)
BATCH = 64
STEPS = 300
TRITON_STEPS = 25  # Triton's interpreter is slow on CPU
BF16_STEPS = 100


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).div_(16.0)  # pixels are 0..16
    return x, torch.tensor(y)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


# Smooth activations and average pooling on purpose: with ReLU and max-pooling a one-ulp
# difference (the published code combines norms of norms, we sum squares) flips a kink or an
# argmax somewhere in the first hundred steps, and the CNN's trajectories then part by 4e-2
# in the weights by step 300 (measured), half as far as sigma=0.99 instead of 1.0 takes them.
# With tanh and average pooling the same runs stay within rounding for all 300 steps.
class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.Tanh(),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.Tanh(),
            torch.nn.AvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(16 * 4 * 4, 10),
        )

    def forward(self, x):
        return self.body(x.view(-1, 1, 8, 8))


MODELS = {"mlp": mlp, "cnn": CNN}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a shared 2-core
    machine they spin against each other (300 CNN steps: 3 s on one thread, 20 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def set_running_stats(net, enabled):
    """As the authors' training script (disable_running_stats / enable_running_stats): the
    second, perturbed forward must not update BatchNorm's running statistics, so its momentum
    is 0. Used identically for our optimizer and the published one."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if not enabled:
                m.backup_momentum, m.momentum = m.momentum, 0
            elif hasattr(m, "backup_momentum"):
                m.momentum = m.backup_momentum


def train(model, make_opt, steps, dtype=torch.float32, seed=0):
    """Train from a seeded init on a seeded data order; return the first-forward loss of every
    step and the final parameters and buffers (BatchNorm's running stats included)."""
    x_all, y_all = digits()
    torch.manual_seed(seed)
    net = MODELS[model]().to(dtype)
    opt = make_opt(net.parameters())
    order = torch.Generator().manual_seed(seed + 1)
    losses, step = [], 0
    while step < steps:
        for idx in torch.randperm(len(y_all), generator=order).split(BATCH):
            if step == steps:
                break
            x, y = x_all[idx].to(dtype), y_all[idx]
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
            loss.backward()
            opt.first_step(zero_grad=True)
            set_running_stats(net, False)
            torch.nn.functional.cross_entropy(net(x).float(), y).backward()
            set_running_stats(net, True)
            opt.second_step(zero_grad=True)
            losses.append(loss.item())
            step += 1
    return torch.tensor(losses), [
        t.detach().float().clone() for t in net.state_dict().values() if t.is_floating_point()
    ]


def ours(backend, **over):
    return lambda params: FSAM(params, torch.optim.SGD, backend=backend, **{**HP, **over})


def published(params):
    return FriendlySAM(params, torch.optim.SGD, **HP)


class PlainSGD:
    """torch.optim.SGD behind the first/second-step API: the yardstick for bfloat16."""

    def __init__(self, params):
        self.opt = torch.optim.SGD(params, **{k: HP[k] for k in ("lr", "momentum", "weight_decay")})

    def first_step(self, zero_grad=False):
        self.opt.zero_grad()

    def second_step(self, zero_grad=False):
        self.opt.step()
        self.opt.zero_grad()


@functools.cache
def published_run(model, steps):
    return train(model, published, steps)


# Float32 tolerance. Measured over 300 steps, every backend against the published code: loss
# curves within 2.4e-7 and weights within 7.2e-7 (weights up to 1.3 in size), i.e. a few ulps;
# the tolerance leaves ~15x headroom for other BLAS builds. It can still fail: sigma=0.99
# instead of 1.0 moves the final weights by 2.7e-4 (MLP) and 1.6e-3 (CNN), sigma=0.9 by 1e-1
# and 2e-2, rho=0.11 instead of 0.1 by 1e-1, lmbda=0.65 instead of 0.6 by 1e-1.
FP32 = dict(rtol=1e-5, atol=1e-5)


def assert_same_run(got, want, what):
    (loss, weights), (loss_w, weights_w) = got, want
    torch.testing.assert_close(loss, loss_w, **FP32, msg=lambda m: f"{what} loss curve: {m}")
    for i, (a, b) in enumerate(zip(weights, weights_w)):
        torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"{what} tensor {i}: {m}")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("backend", ["auto", "foreach", "reference"])
def test_trains_like_published_code(model, backend):
    backend_available(backend, "cpu")
    got = train(model, ours(backend), STEPS)
    want = published_run(model, STEPS)
    assert want[0][-1] < 0.2 * want[0][0], "the runs did not learn: the comparison says little"
    assert_same_run(got, want, f"{model}/{backend}")


def test_triton_interpreter_trains_like_published_code():
    backend_available("triton", "cpu")
    assert_same_run(
        train("mlp", ours("triton"), TRITON_STEPS), published_run("mlp", TRITON_STEPS), "mlp/triton"
    )


def rel_l2(weights, weights32):
    num = sum(((a - b) ** 2).sum() for a, b in zip(weights, weights32))
    return (num / sum((b**2).sum() for b in weights32)).sqrt().item()


@pytest.mark.parametrize("backend", ["auto", "foreach", "reference"])
def test_bf16_weights_drift_no_more_than_plain_sgd(backend):
    """bfloat16 weights against the float32 run of the same optimizer, judged by how far torch's
    own SGD in bfloat16 drifts from its float32 twin (flash-attention's rule: at most twice
    that, plus a floor of one bfloat16 rounding). Measured on the CNN over 100 steps: ours
    4.2e-2 relative L2 in the weights and 2.0e-3 mean loss deviation, plain SGD 4.0e-2 and
    1.8e-3 (the published FriendlySAM in bfloat16: 4.1e-2 and 1.9e-3). bfloat16 keeps 8 bits,
    so this yardstick only catches gross errors (bounds here: 8.8e-2 and 6.4e-3). Applied to
    the bfloat16 run only, sigma=0 (SAM instead of F-SAM) gives 9.2e-2 and fails on the
    weights, sigma=0.5 gives 6.6e-3 and fails on the loss curve, both narrowly; sigma=0.9
    (4.3e-2, 2.7e-3) is within bfloat16's noise and passes. The float32 test is the sharp one."""
    backend_available(backend, "cpu")
    loss, weights = train("cnn", ours(backend), BF16_STEPS, torch.bfloat16)
    loss32, weights32 = train("cnn", ours("reference"), BF16_STEPS)
    sgd_loss, sgd_weights = train("cnn", PlainSGD, BF16_STEPS, torch.bfloat16)
    sgd_loss32, sgd_weights32 = train("cnn", PlainSGD, BF16_STEPS)
    eps = torch.finfo(torch.bfloat16).eps

    err, torch_err = rel_l2(weights, weights32), rel_l2(sgd_weights, sgd_weights32)
    assert err <= 2 * torch_err + eps, f"weights: {err:.3g} > 2 x SGD's {torch_err:.3g} + {eps:.3g}"

    err = (loss - loss32).abs().mean().item()
    torch_err = (sgd_loss - sgd_loss32).abs().mean().item()
    floor = eps * loss32.abs().mean().item()
    assert err <= 2 * torch_err + floor, (
        f"loss curve: {err:.3g} > 2 x SGD's {torch_err:.3g} + {floor:.3g}"
    )
