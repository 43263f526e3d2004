"""F-SAM under torch.distributed: DDP (synced or per-replica perturbation) or FSDP2, on CPUs
(gloo) or GPUs (nccl), launched with torchrun. See docs/distributed.md.

    torchrun --nproc-per-node 2 examples/train_distributed.py --mode fsdp
    torchrun --nproc-per-node 2 examples/train_distributed.py --mode ddp
    torchrun --nproc-per-node 2 examples/train_distributed.py --mode ddp-local --accum 2
    torchrun --nproc-per-node 2 examples/train_distributed.py --mode fsdp --steps 20 \\
        --checkpoint /tmp/ckpt          # saves at the end; run again with --resume to go on

The task: a small MLP learning a fixed random "teacher" MLP's classes on synthetic inputs
(deterministic, no download). Each rank takes its slice of the global batch. Rank 0 prints
the loss and, per step, the collectives the optimizer itself issued (FSDP2: one all-reduce
of one float, for the global norm; DDP: none), beside those DDP/FSDP issue in the passes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

from fsam_fused import FSAM


def make_model(width):
    return torch.nn.Sequential(
        torch.nn.Linear(32, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, 10),
    )


def global_batch(step, batch_size, device):
    """The same global batch on every rank: inputs and the teacher's labels."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(batch_size, 32, generator=g)
    t = torch.Generator().manual_seed(12345)
    teacher = torch.randn(32, 10, generator=t)
    y = (torch.tanh(x) @ teacher).argmax(1)
    return x.to(device), y.to(device)


def seq(groups):
    return sum(g._get_sequence_number_for_group() for g in groups)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--mode",
        choices=["ddp", "ddp-local", "fsdp"],
        default="fsdp",
        help="ddp: both passes all-reduced; ddp-local: first pass under no_sync() "
        "(per-replica perturbation); fsdp: FSDP2 fully_shard",
    )
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch per step")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per pass")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--backend", default="auto", help="FSAM backend")
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument(
        "--checkpoint", default=None, help="directory: save a DCP checkpoint at the end"
    )
    ap.add_argument("--resume", action="store_true", help="load --checkpoint first")
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available()
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)  # the same initial weights on every rank
    net = make_model(args.width).to(device)
    model, groups = net, [dist.group.WORLD]
    if args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(net)
        groups += [next(net.parameters()).device_mesh.get_group(0)]
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net, device_ids=[device.index] if use_cuda else None)
    groups = list({id(g): g for g in groups}.values())
    opt = FSAM(
        net.parameters(),
        torch.optim.SGD,
        rho=args.rho,
        sigma=1.0,
        lmbda=0.9,
        backend=args.backend,
        lr=args.lr,
        momentum=0.9,
        weight_decay=5e-4,
    )

    start = 0
    if args.resume:
        import torch.distributed.checkpoint as dcp

        from fsam_fused.distributed import init_state

        init_state(opt)  # the template the checkpoint is loaded into
        sd = {"model": net.state_dict(), "optim": opt.state_dict(), "step": 0}
        dcp.load(sd, checkpoint_id=args.checkpoint)
        net.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        start = sd["step"]
        dist.barrier()

    def passes(x, y, second):
        """One forward/backward over the micro-batches; returns the mean loss."""
        total = 0.0
        mx, my = x.chunk(args.accum), y.chunk(args.accum)
        for i, (a, b) in enumerate(zip(mx, my)):
            # DDP syncs only the last micro-batch of a synced pass; ddp-local's first pass
            # is never synced (each rank perturbs by its own gradient).
            sync = i == args.accum - 1 and (second or args.mode != "ddp-local")
            ctx = model.no_sync() if args.mode != "fsdp" and not sync else _nullcontext()
            with ctx:
                loss = torch.nn.functional.cross_entropy(model(a), b) / args.accum
                loss.backward()
            total += loss.detach()
        return total

    t0, ours, every = time.perf_counter(), [], []
    for step in range(start, start + args.steps):
        x, y = global_batch(step, args.batch_size, device)
        x, y = x.chunk(ws)[rank], y.chunk(ws)[rank]
        at_start = seq(groups)
        loss = passes(x, y, second=False)
        before = seq(groups)
        opt.first_step(zero_grad=True)
        ours.append(seq(groups) - before)
        passes(x, y, second=True)
        before = seq(groups)
        opt.second_step(zero_grad=True)
        ours[-1] += seq(groups) - before
        every.append(seq(groups) - at_start)
        if rank == 0 and (step % 10 == 0 or step == start + args.steps - 1):
            print(
                f"step {step:4d}  loss {loss.item():.4f}  optimizer collectives this step: "
                f"{ours[-1]}",
                flush=True,
            )
    if rank == 0:
        print(
            f"{args.mode}, {ws} ranks, backend {[s.backend for s in opt.plan_summary()]}: "
            f"{args.steps} steps in {time.perf_counter() - t0:.2f} s; collectives issued by "
            f"FSAM per step: {sorted(set(ours))}, by everything (DDP/FSDP included): "
            f"{sorted(set(every))}"
        )
    if args.checkpoint:
        import torch.distributed.checkpoint as dcp

        dcp.save(
            {"model": net.state_dict(), "optim": opt.state_dict(), "step": start + args.steps},
            checkpoint_id=args.checkpoint,
        )
    dist.barrier()  # every rank done (gloo: no rank may leave while a peer still sends)
    dist.destroy_process_group()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
