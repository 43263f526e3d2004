"""torch.distributed: FSDP2 (DTensor parameters, HSDP, mixed with plain tensors), DDP in both
modes (synced; per-replica perturbation under no_sync, with gradient accumulation) and a
distributed checkpoint resumed in fresh processes.

Each backend runs in real process groups: pairs of processes (``tests/dist_worker.py``) on
gloo over 127.0.0.1, a free port each time, every wait bounded. On CUDA (the ``cuda``
marker; bench/gpu_check.sh) the same jobs run on NCCL with one rank per GPU (one GPU: a
single-rank group, which still runs the path). Every run is compared with a single-process
oracle on the full batch, computed here: FSAM's reference backend on plain tensors, which
tests/test_independent.py checks against an independent statement of the math.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import dist_worker as W
import pytest
import torch

from fsam_fused import FSAM
from helpers import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 150  # seconds for one pair of processes, start to finish
STEPS = 4
CPU_BACKENDS = ("auto", "foreach", "reference")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def launch(jobs, out, world_size, kind):
    """Run ``jobs`` in one process group of ``world_size`` fresh processes; load every
    rank's results."""
    os.makedirs(out, exist_ok=True)
    jobs_file = os.path.join(out, "jobs.json")
    with open(jobs_file, "w") as f:
        json.dump(jobs, f)
    port = free_port()
    env = dict(
        os.environ,
        WORLD_SIZE=str(world_size),
        MASTER_PORT=str(port),
        FSAM_DIST_DEVICE=kind,
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
    )
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs, logs = [], []
    for r in range(world_size):
        log = open(os.path.join(out, f"rank{r}.log"), "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.join(HERE, "dist_worker.py"), jobs_file, out],
                env=dict(env, RANK=str(r)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = ""
        for r in failed:
            logs[r].seek(0)
            text += f"--- rank {r} (exit {procs[r].returncode}) ---\n" + logs[r].read()[-4000:]
        pytest.fail(f"distributed ranks {failed} failed:\n{text}")
    for log in logs:
        log.close()
    return {
        j["name"]: [
            torch.load(os.path.join(out, f"{j['name']}.rank{r}.pt")) for r in range(world_size)
        ]
        for j in jobs
    }


# ---------------------------------------------------------------------------- the oracle


class _Norms:
    """The squared norms reduce.combine hands the perturb pass, in this process."""

    def __init__(self, monkeypatch):
        import fsam_fused.reduce as reduce

        self.values = []
        orig = reduce.combine

        def combine(parts, buckets):
            out = orig(parts, buckets)
            self.values.append(out[0].sum().item())
            return out

        monkeypatch.setattr(reduce, "combine", combine)


def oracle(job, ws, monkeypatch, replicas=1):
    """Single process, full batch (``replicas=1``); or, for DDP's per-replica mode, ``ws``
    replicas that each perturb by their own half-batch gradient and step on the averaged
    second gradient. Returns (trajectory, squared norms of replica 0). Runs on one thread, as
    the workers do; the test process's thread count is given back afterwards (later tests,
    Inductor's choice of gradient layouts among them, depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _oracle(job, ws, monkeypatch, replicas)
    finally:
        torch.set_num_threads(threads)


def _oracle(job, ws, monkeypatch, replicas):
    norms = _Norms(monkeypatch)
    nets = [W.make_net("cpu", job) for _ in range(replicas)]
    opts = [W.make_opt(n.parameters(), dict(job, backend="reference")) for n in nets]
    traj = []
    for step in range(job.get("steps", STEPS)):
        x, y = W.batch(step, "cpu", job.get("accum", 1))
        parts = [(x, y)] if replicas == 1 else list(zip(x.chunk(ws), y.chunk(ws)))
        for net, opt, (a, b) in zip(nets, opts, parts):
            torch.nn.functional.mse_loss(net(a), b).backward()
            opt.first_step(zero_grad=True)
        for net, (a, b) in zip(nets, parts):
            torch.nn.functional.mse_loss(net(a), b).backward()
        if replicas > 1:  # DDP's synced second pass: the mean of the replicas' gradients
            for ps in zip(*(n.parameters() for n in nets)):
                mean = torch.stack([p.grad for p in ps]).mean(0)
                for p in ps:
                    p.grad = mean.clone()
        for opt in opts:
            opt.second_step(zero_grad=True)
        traj.append({n: p.detach().clone() for n, p in nets[0].named_parameters()})
    return traj, norms.values[::replicas] if replicas > 1 else norms.values


# Float tolerance: a distributed run sums the batch and the norm in another order.
RTOL, ATOL = 1e-5, 1e-6


def assert_trajectory(got, want, what):
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want)):
        for name in w:
            torch.testing.assert_close(
                g[name],
                w[name],
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m: f"{what}, step {step}, {name}: {m}",
            )


def max_diff(got, want):
    return max((g[n] - w[n]).abs().max().item() for g, w in zip(got, want) for n in w)


# ---------------------------------------------------------------------------- the jobs


def fsdp_jobs(backends):
    jobs = [
        dict(name=f"fsdp_{be}_{base}", mode="fsdp", backend=be, base=base)
        for be in backends
        for base in ("sgd", "adamw")
    ]
    return jobs


def jobs_for(kind, ws):
    backends = CPU_BACKENDS
    jobs = fsdp_jobs(backends)
    jobs += [
        dict(name="hsdp_rep", mode="fsdp", backend="auto", mesh=[ws, 1]),
        dict(name="hsdp_shard", mode="fsdp", backend="auto", mesh=[1, ws]),
        dict(name="mixed", mode="fsdp", backend="auto", mixed=True),
        dict(name="frozen", mode="fsdp", backend="auto", frozen=True),
        dict(name="fsdp_accum", mode="fsdp", backend="auto", accum=2, base="adamw"),
        dict(name="mixed_adamw", mode="fsdp", backend="foreach", mixed=True, base="adamw"),
    ]
    for be in backends:
        jobs += [
            dict(name=f"ddp_sync_{be}", mode="ddp_sync", backend=be),
            dict(name=f"ddp_local_{be}", mode="ddp_local", backend=be),
        ]
    jobs += [
        dict(name="ddp_sync_accum", mode="ddp_sync", backend="auto", accum=2),
        dict(name="ddp_local_accum", mode="ddp_local", backend="auto", accum=2),
    ]
    jobs.append(dict(name="errors", mode="errors", backend="auto"))
    return jobs


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _world(kind):
    return 2 if kind == "cpu" else min(2, max(1, torch.cuda.device_count()))


@pytest.fixture(scope="module", params=DEVICES)
def runs(request, tmp_path_factory):
    """One pair of processes runs every job (and saves the checkpoint the resume test
    loads)."""
    kind = request.param
    ws = _world(kind)
    out = str(tmp_path_factory.mktemp(f"dist_{kind}"))
    jobs = jobs_for(kind, ws)
    jobs.append(
        dict(
            name="ckpt_full",
            mode="fsdp",
            backend="auto",
            base="adamw",
            steps=STEPS,
            save=os.path.join(out, "ckpt"),
            save_at=2,
        )
    )
    return kind, ws, out, launch(jobs, out, ws, kind)


@pytest.fixture(scope="module")
def oracles():
    cache = {}

    def get(job, ws, replicas=1):
        key = (json.dumps(job, sort_keys=True), ws, replicas)
        if key not in cache:
            with pytest.MonkeyPatch.context() as mp:
                cache[key] = oracle(job, ws, mp, replicas)
        return cache[key]

    return get


def _job(name, kind, ws):
    return next(j for j in jobs_for(kind, ws) if j["name"] == name)


def _check_against_oracle(runs, oracles, name, replicas=1, backend=None):
    kind, ws, _, res = runs
    job = _job(name, kind, ws)
    want, want_norms = oracles(
        {k: v for k, v in job.items() if k in ("base", "accum", "frozen")}, ws, replicas
    )
    for r, got in enumerate(res[name]):
        assert_trajectory(got["traj"], want, f"{name} rank {r}")
        if backend is not None and kind == "cpu":
            assert {b for b, _ in got["summary"]} == {backend}, got["summary"]
    return res[name], want, want_norms


# ---------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fsdp2_matches_single_process(runs, oracles, backend, base):
    got, want, want_norms = _check_against_oracle(
        runs, oracles, f"fsdp_{backend}_{base}", backend={"auto": "cpp"}.get(backend, backend)
    )
    for r, g in enumerate(got):
        torch.testing.assert_close(
            torch.tensor(g["norms"]),
            torch.tensor(want_norms),
            rtol=1e-5,
            atol=0,
            msg=lambda m: f"rank {r} norm: {m}",
        )


@pytest.mark.parametrize(
    "name",
    [
        "fsdp_auto_sgd",
        "fsdp_foreach_adamw",
        "fsdp_reference_sgd",
        "hsdp_rep",
        "hsdp_shard",
        "mixed",
    ],
)
def test_every_rank_sees_the_same_norm_and_one_all_reduce(runs, name):
    kind, ws, _, res = runs
    norms = [r["norms"] for r in res[name]]
    assert len(norms[0]) == STEPS
    assert all(n == norms[0] for n in norms), norms  # bit for bit
    for r in res[name]:
        # first_step: one all-reduce of one float; second_step: none.
        assert r["collectives"] == [(1, 0)] * STEPS, r["collectives"]


@pytest.mark.parametrize(
    "name", ["fsdp_auto_sgd", "fsdp_foreach_adamw", "fsdp_reference_sgd", "hsdp_rep", "mixed"]
)
def test_fsdp2_step_runs_on_local_shards_with_a_reused_plan(runs, name):
    """first_step and the restore dispatch no op on a DTensor (the backends take the local
    shards), and the plan built at the second step (the first has new EMAs) is reused."""
    kind, ws, _, res = runs
    for r in res[name]:
        assert r["dtensor_ops"] == [0] * STEPS, r["dtensor_ops"]
        assert len(set(r["plans"][1:])) == 1, r["plans"]


@pytest.mark.parametrize("name", ["hsdp_rep", "hsdp_shard"])
def test_hsdp_sums_over_shards_not_replicas(runs, oracles, name):
    got, want, want_norms = _check_against_oracle(runs, oracles, name)
    for g in got:
        torch.testing.assert_close(
            torch.tensor(g["norms"]), torch.tensor(want_norms), rtol=1e-5, atol=0
        )


def test_fsdp2_parameters_without_gradients(runs, oracles):
    """Frozen DTensor parameters take no part (and are not mistaken for aliases: a DTensor's
    own data_ptr() is 0)."""
    got, _, want_norms = _check_against_oracle(runs, oracles, "frozen")
    for g in got:
        torch.testing.assert_close(
            torch.tensor(g["norms"]), torch.tensor(want_norms), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("name", ["mixed", "mixed_adamw"])
def test_fsdp2_mixed_with_plain_parameters(runs, oracles, name):
    got, _, want_norms = _check_against_oracle(runs, oracles, name)
    for g in got:
        assert len(g["summary"]) == 2  # one sharded bucket, one plain
        torch.testing.assert_close(
            torch.tensor(g["norms"]), torch.tensor(want_norms), rtol=1e-5, atol=0
        )


def test_sharded_ema_matches_single_process(runs, oracles):
    """The EMA is sharded like its parameter and, gathered, is the single-process EMA."""
    kind, ws, _, res = runs
    net = W.make_net("cpu")
    opt = W.make_opt(net.parameters(), dict(backend="reference"))
    for step in range(STEPS):
        x, y = W.batch(step, "cpu")
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.second_step(zero_grad=True)
    for r in res["fsdp_foreach_sgd"]:
        for n, p in net.named_parameters():
            torch.testing.assert_close(r["ema"][n], opt.state[p]["ema"], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- DDP


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ddp_synced_is_single_process_large_batch(runs, oracles, backend):
    got, _, want_norms = _check_against_oracle(
        runs, oracles, f"ddp_sync_{backend}", backend={"auto": "cpp"}.get(backend, backend)
    )
    for g in got:
        assert g["collectives"] == [(0, 0)] * STEPS  # DDP's own all-reduces only
        torch.testing.assert_close(
            torch.tensor(g["norms"]), torch.tensor(want_norms), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ddp_per_replica_perturbation(runs, oracles, backend):
    """First pass under no_sync(): each rank perturbs by its own gradient's norm (so the
    norms differ) and keeps its own EMA; the weights stay identical on every rank."""
    kind, ws, _, res = runs
    got, _, _ = _check_against_oracle(runs, oracles, f"ddp_local_{backend}", replicas=ws)
    for a, b in zip(got[0]["traj"], got[-1]["traj"]):
        for n in a:
            assert torch.equal(a[n], b[n]), n  # bit for bit
    for g in got:
        assert g["collectives"] == [(0, 0)] * STEPS
    if ws > 1:
        assert got[0]["norms"] != got[1]["norms"]
        assert any(not torch.equal(got[0]["ema"][n], got[1]["ema"][n]) for n in got[0]["ema"])


def test_fsdp2_gradient_accumulation(runs, oracles):
    """Two micro-batches per pass, set_requires_gradient_sync(False) on the first."""
    _check_against_oracle(runs, oracles, "fsdp_accum")


@pytest.mark.parametrize("mode", ["sync", "local"])
def test_ddp_gradient_accumulation(runs, oracles, mode):
    """Two micro-batches per pass, only the last one of a synced pass all-reduced."""
    kind, ws, _, res = runs
    _check_against_oracle(runs, oracles, f"ddp_{mode}_accum", replicas=1 if mode == "sync" else ws)


# ---------------------------------------------------------------------------- checkpoint


def test_distributed_checkpoint_resumes_bit_exactly(runs, tmp_path):
    """Saved by torch.distributed.checkpoint after 2 of 4 steps in one process group,
    loaded by fresh processes that run the last 2: the same bits as the uninterrupted run."""
    kind, ws, out, res = runs
    job = dict(
        name="ckpt_resumed",
        mode="fsdp",
        backend="auto",
        base="adamw",
        steps=STEPS - 2,
        load=os.path.join(out, "ckpt"),
    )
    resumed = launch([job], str(tmp_path), ws, kind)["ckpt_resumed"]
    for full, again in zip(res["ckpt_full"], resumed):
        for step, (a, b) in enumerate(zip(full["traj"][2:], again["traj"])):
            for n in a:
                assert torch.equal(a[n], b[n]), (step, n)
        for n in full["ema"]:
            assert torch.equal(full["ema"][n], again["ema"][n]), n


def test_clear_errors_for_mismatched_dtensors(runs):
    kind, ws, _, res = runs
    for r in res["errors"]:
        assert (
            "placements (Replicate(),)" in r["msgs"]["grad"]
            and "param group 0, parameter 0" in r["msgs"]["grad"]
        ), r["msgs"]
        assert "must be a DTensor with the parameter's placements" in r["msgs"]["ema"], r["msgs"]
        # a new local shard: the old one untouched, the new one perturbed
        assert r["msgs"]["moved"] == (True, False), r["msgs"]


# ---------------------------------------------------------------------------- in-process


def test_init_state_and_plain_load_checks():
    """init_state makes the template a checkpoint loads into; a DTensor EMA for a plain
    parameter is refused with an error naming it (checked in-process, no group needed)."""
    from fsam_fused.distributed import init_state

    w = torch.nn.Parameter(torch.ones(3))
    opt = FSAM([w], torch.optim.AdamW, lr=0.1)
    init_state(opt)
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == {"ema"} and set(sd["base_optimizer"]["state"][0]) == {
        "step",
        "exp_avg",
        "exp_avg_sq",
    }
    with pytest.raises(RuntimeError, match="without state"):
        init_state(opt)


def test_example_under_torchrun(tmp_path):
    """examples/train_distributed.py as docs/distributed.md launches it: FSDP2 with a
    checkpoint, resumed by new processes; the optimizer issues one collective per step."""
    script = os.path.join(os.path.dirname(HERE), "examples", "train_distributed.py")
    ckpt = str(tmp_path / "ckpt")

    def torchrun(*args):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            script,
            "--mode",
            "fsdp",
            "--steps",
            "3",
            "--width",
            "16",
            "--accum",
            "2",
            "--checkpoint",
            ckpt,
            *args,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    out = torchrun()
    assert "collectives issued by FSAM per step: [1]" in out, out
    out = torchrun("--resume")
    assert "step    5" in out and "step    0" not in out, out  # steps 3 to 5
