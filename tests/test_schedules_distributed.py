"""DDP and FSDP2 with a perturbation schedule, 2 processes on gloo (127.0.0.1, a free port,
bounded steps and time): every rank takes the same decisions and the replicas stay
identical, in both DDP modes; synced DDP and FSDP2 (the adaptive statistic over the shards)
equal one process on the full batch."""

import os
import socket
import subprocess
import sys

import pytest
import schedule_dist_worker as W
import torch

from fsam_fused import FSAM

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode, name, out):
    port = _free_port()
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "schedule_dist_worker.py"), mode, name, out],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]


def _single_process(name):
    """The same schedule on the full batch in one process: what synced DDP computes."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = FSAM(
        net.parameters(),
        torch.optim.SGD,
        rho=0.3,
        lmbda=0.7,
        lr=0.1,
        schedule=W.schedule(name),
        backend="reference",
    )
    taken = []
    for step in range(W.STEPS):
        _, _, x, y = W.data(step, 0, 2)
        loss_fn = lambda: torch.nn.functional.mse_loss(net(x), y)  # noqa: B023, E731
        loss_fn().backward()
        took = opt.first_step(zero_grad=True)
        if took:
            loss_fn().backward()
        opt.second_step(zero_grad=True)
        taken.append(took)
    return [p.detach() for p in net.parameters()], taken


@pytest.mark.parametrize(
    "mode, name",
    [
        ("synced", "every2"),
        ("synced", "adaptive"),
        ("per_replica", "bernoulli"),
        ("per_replica", "adaptive_lagged"),
        ("fsdp", "adaptive"),
        ("fsdp", "every2"),
    ],
)
def test_ddp_with_a_schedule(mode, name, tmp_path):
    r0, r1 = _launch(mode, name, str(tmp_path))
    assert r0["taken"] == r1["taken"]
    assert True in r0["taken"] and False in r0["taken"], r0["taken"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # the replicas are identical, bit for bit
    # The EMA too when synced; per replica each rank's EMA follows its own first gradients
    # on the perturbing steps (as without a schedule: docs/training-loops.md).
    same_emas = [torch.equal(a, b) for a, b in zip(r0["emas"], r1["emas"])]
    assert all(same_emas) if mode != "per_replica" else not any(same_emas)
    if mode != "per_replica":
        want, taken = _single_process(name)
        assert taken == r0["taken"]
        for a, b in zip(r0["params"], want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
