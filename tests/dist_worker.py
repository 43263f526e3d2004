"""One rank of the distributed tests (tests/test_distributed.py launches a pair).

Usage: ``python tests/dist_worker.py JOBS.json OUT_DIR`` with RANK, WORLD_SIZE, MASTER_PORT
(and FSAM_DIST_DEVICE=cpu|cuda) in the environment. Runs every job of the JSON list in this
one process group (spawning torch processes is the expensive part) and writes, per job,
``OUT_DIR/<name>.rank<r>.pt``: the full parameters after every step, this rank's squared
norm at every step (what reduce.combine handed the perturb pass), and the collectives the
optimizer's own calls issued.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch

D_IN, D_HID, D_OUT, BATCH = 6, 7, 3, 8


class Net(torch.nn.Module):
    """Uneven shards on 2 ranks (7 and 3 rows), and a 1-element parameter whose shard on
    rank 1 is empty."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(D_IN, D_HID)
        self.fc2 = torch.nn.Linear(D_HID, D_OUT)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def make_net(device, job=None):
    """``job["frozen"]``: two parameters without a gradient (they are not stepped)."""
    torch.manual_seed(1234)
    net = Net().to(device)
    if job and job.get("frozen"):
        net.fc2.bias.requires_grad_(False)
        net.scale.requires_grad_(False)
    return net


def batch(step, device, accum=1):
    """The global batch of a step, as ``accum`` micro-batches of (x, y)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH * accum, D_IN, generator=g)
    y = torch.randn(BATCH * accum, D_OUT, generator=g)
    return x.to(device), y.to(device)


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.2, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.02, weight_decay=1e-2)),
}
HP = dict(rho=0.5, sigma=1.0, lmbda=0.6)


def make_opt(params, job):
    from fsam_fused import FSAM

    base, kw = BASES[job.get("base", "sgd")]
    return FSAM(params, base, backend=job.get("backend", "auto"), **HP, **kw)


class Recorder:
    """The squared norm each rank perturbs by, and the collectives of the optimizer calls
    (the sequence numbers of every process group in use)."""

    def __init__(self, groups):
        import fsam_fused.reduce as reduce

        self.groups = list({id(g): g for g in groups}.values())
        self.norms = []
        self._orig = reduce.combine
        me = self

        def combine(parts, buckets):
            out = me._orig(parts, buckets)
            if out:
                me.norms.append(out[0].sum().item())
            return out

        reduce.combine = combine

    def seq(self):
        return sum(g._get_sequence_number_for_group() for g in self.groups)

    def close(self):
        import fsam_fused.reduce as reduce

        reduce.combine = self._orig


class DTensorOps:
    """Counts aten ops that took a DTensor argument (DTensor dispatch) while active."""

    def __init__(self):
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        me = self
        self.count = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(isinstance(a, DTensor) for a in tree_leaves((args, kwargs or {}))):
                    me.count += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode

    def __call__(self, fn, *a):
        with self.mode():
            return fn(*a)


def full(t):
    from fsam_fused.distributed import is_dtensor

    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().clone()


def run_errors(job, rank, ws, device, out):
    """Clear errors: a gradient with other placements than its DTensor parameter, and a plain
    EMA loaded for a DTensor parameter. Records each message."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (ws,))
    w = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2, device=device), mesh, [Shard(0)]))
    msgs = {}
    opt = make_opt([w], dict(job))
    w.grad = distribute_tensor(torch.ones(4, 2, device=device), mesh, [Replicate()])
    try:
        opt.first_step()
    except RuntimeError as e:
        msgs["grad"] = str(e)
    w.grad = distribute_tensor(torch.ones(4, 2, device=device), mesh, w.placements)
    opt.first_step()
    opt.second_step()
    sd = opt.state_dict()
    sd["state"][0]["ema"] = sd["state"][0]["ema"].full_tensor()
    try:
        opt.load_state_dict(sd)
    except ValueError as e:
        msgs["ema"] = str(e)
    # A DTensor parameter given a new local shard between steps (FSDP2's
    # reset_sharded_param does this): the next step perturbs the new one, not the old.
    v = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2, device=device), mesh, [Shard(0)]))
    opt = make_opt([v], dict(job))
    for i in range(3):
        v.grad = distribute_tensor(torch.full((4, 2), i + 1.0, device=device), mesh, v.placements)
        opt.first_step()
        opt.second_step()
    old = v._local_tensor
    v._local_tensor = old.clone()
    before_old, before_new = old.clone(), v._local_tensor.clone()
    v.grad = distribute_tensor(torch.full((4, 2), 9.0, device=device), mesh, v.placements)
    opt.first_step()
    msgs["moved"] = (torch.equal(old, before_old), torch.equal(v._local_tensor, before_new))
    opt.second_step()
    torch.save({"msgs": msgs}, os.path.join(out, f"{job['name']}.rank{rank}.pt"))


NAN_BASES = {
    # (base class, its kwargs, FSAM kwargs, GradScaler)
    "sgd_fused": (torch.optim.SGD, dict(lr=0.2, momentum=0.9, fused=True), {}, False),
    "adamw_fused": (torch.optim.AdamW, dict(lr=0.02, fused=True), {}, False),
    "sgd": (torch.optim.SGD, dict(lr=0.2, momentum=0.9), {}, False),
    "skip": (torch.optim.SGD, dict(lr=0.2, momentum=0.9), dict(skip_nonfinite=True), False),
    "scaler": (torch.optim.SGD, dict(lr=0.2, momentum=0.9), {}, True),
    "scaler_fused": (torch.optim.AdamW, dict(lr=0.02, fused=True), {}, True),
}


def run_nan(job, rank, ws, device, out):
    """Issue 14: DDP, a NaN in rank 0's first-pass gradient at step 1 only (``job["sync"]``:
    the synced mode, else per-replica under no_sync). Records every rank's parameters after
    each step and its found flags: the replicas must stay identical."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fsam_fused import FSAM

    base, kw, fkw, use_scaler = NAN_BASES[job["base"]]
    net = make_net(device)
    model = DDP(net)
    opt = FSAM(net.parameters(), base, backend=job.get("backend", "auto"), **HP, **fkw, **kw)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if use_scaler else None
    traj, flags, scales = [], [], []
    for step in range(job.get("steps", 3)):
        x, y = batch(step, device)
        xs, ys = x.chunk(ws)[rank], y.chunk(ws)[rank]

        def loss():
            out_ = torch.nn.functional.mse_loss(model(xs), ys)
            return scaler.scale(out_) if scaler is not None else out_

        with _null() if job["sync"] else model.no_sync():
            loss().backward()
        if rank == 0 and step == 1:
            net.fc1.weight.grad[0, 0] = float("nan")
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        loss().backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            opt.zero_grad()
        else:
            opt.second_step(zero_grad=True)
        flags.append(float(opt.found_nonfinite()))
        traj.append({n: full(p) for n, p in net.named_parameters()})
    torch.save(
        {"traj": traj, "flags": flags, "scales": scales},
        os.path.join(out, f"{job['name']}.rank{rank}.pt"),
    )


def run_job(job, rank, ws, device, out):
    if job["mode"] == "errors":
        return run_errors(job, rank, ws, device, out)
    if job["mode"] == "nan":
        return run_nan(job, rank, ws, device, out)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    mode, steps = job["mode"], job.get("steps", 4)
    accum = job.get("accum", 1)
    net = make_net(device, job)
    groups = [dist.group.WORLD]
    model = net
    if mode == "fsdp":
        mesh_shape = tuple(job.get("mesh", (ws,)))
        names = ("shard",) if len(mesh_shape) == 1 else ("replicate", "shard")
        mesh = init_device_mesh(device.type, mesh_shape, mesh_dim_names=names)
        groups = [mesh.get_group(i) for i in range(mesh.ndim)] + groups
        fully_shard(net.fc1, mesh=mesh)
        if not job.get("mixed"):
            fully_shard(net, mesh=mesh)  # fc2 and scale sharded by the root
    elif mode in ("ddp_sync", "ddp_local"):
        model = DDP(net)
    plain = [p for p in net.parameters() if not hasattr(p, "placements")] if mode == "fsdp" else []
    opt = make_opt(net.parameters(), job)
    start = 0
    if job.get("load"):
        start = load_checkpoint(job["load"], net, opt)
    elif job.get("init_state"):  # issue 14: a template no load follows changes nothing
        from fsam_fused.distributed import init_state

        init_state(opt)
    rec = Recorder(groups)
    traj, collectives, dtensor_ops, plans = [], [], [], []
    ops = DTensorOps()
    try:
        for step in range(start, start + steps):
            x, y = batch(step, device, accum)
            xs, ys = x.chunk(ws)[rank], y.chunk(ws)[rank]
            mx, my = xs.chunk(accum), ys.chunk(accum)

            def backward(second):
                for i, (a, b) in enumerate(zip(mx, my)):
                    last = i == accum - 1
                    synced = mode != "ddp_local" or second
                    ctx = (
                        model.no_sync()
                        if isinstance(model, DDP) and not (synced and last)
                        else _null()
                    )
                    if mode == "fsdp" and accum > 1:  # FSDP2: reduce-scatter the last only
                        net.set_requires_gradient_sync(last)
                    with ctx:
                        loss = torch.nn.functional.mse_loss(model(a), b) / accum
                        loss.backward()
                for p in plain:  # mixed: the plain parameters' gradients averaged by hand
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(ws)

            backward(False)
            before = rec.seq()
            n_ops = ops.count
            ops(opt.first_step)  # (zero_grad afterwards: torch's own, on DTensors)
            opt.zero_grad()
            n_first = rec.seq() - before
            plans.append(id(opt.engine.plan))
            backward(True)
            before = rec.seq()
            ops(torch.no_grad()(opt.engine.restore))  # second_step: this restore + base step
            dtensor_ops.append(ops.count - n_ops)
            opt.engine.inflight = []  # restored: let second_step run only the base step
            opt.second_step(zero_grad=True)
            collectives.append((n_first, rec.seq() - before))
            traj.append({n: full(p) for n, p in net.named_parameters()})
            if job.get("save") and step == start + job["save_at"] - 1:
                save_checkpoint(job["save"], net, opt, step + 1)
    finally:
        rec.close()
    ema = {
        n: full(opt.state[p]["ema"])
        for n, p in net.named_parameters()
        if "ema" in opt.state.get(p, {})
    }
    torch.save(
        {
            "traj": traj,
            "norms": rec.norms,
            "collectives": collectives,
            "ema": ema,
            "dtensor_ops": dtensor_ops,
            "plans": plans,
            "summary": [(s.backend, s.tensors) for s in opt.plan_summary()],
        },
        os.path.join(out, f"{job['name']}.rank{rank}.pt"),
    )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def save_checkpoint(path, net, opt, step):
    import torch.distributed.checkpoint as dcp

    dcp.save(
        {"model": net.state_dict(), "optim": opt.state_dict(), "step": step}, checkpoint_id=path
    )


def load_checkpoint(path, net, opt):
    import torch.distributed.checkpoint as dcp

    from fsam_fused.distributed import init_state

    init_state(opt)
    sd = {"model": net.state_dict(), "optim": opt.state_dict(), "step": 0}
    dcp.load(sd, checkpoint_id=path)
    net.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])
    return sd["step"]


def main():
    import torch.distributed as dist

    jobs_file, out = sys.argv[1], sys.argv[2]
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kind = os.environ.get("FSAM_DIST_DEVICE", "cpu")
    torch.set_num_threads(1)
    # As tests/conftest.py does in-process: the C++ backend would double-buffer tensors of
    # any size, so the sharded buckets' forced exact-copy path is what keeps FSDP2 working.
    from fsam_fused.backends import cpp

    cpp.SWAP_MIN_NUMEL = 1
    if kind == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if kind == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=ws,
        timeout=datetime.timedelta(seconds=60),
        **({"device_id": device} if kind == "cuda" else {}),
    )
    try:
        for job in json.load(open(jobs_file)):
            run_job(job, rank, ws, device, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every result is written and the process group is gone: leave without the interpreter's
    # teardown, where a C++ thread of torch.distributed (seen after the checkpoint jobs, about
    # one run in five on 2 loaded cores) may still be joinable and abort the process
    # ("terminate called without an active exception", no Python frame). A job that fails
    # raises before this line and exits non-zero as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
