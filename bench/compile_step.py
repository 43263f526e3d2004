"""CPU time of an F-SAM training step, eager against torch.compile (C++ backend), measured in
interleaved rounds in one process (medians of each candidate; ratios to eager):

* ``eager``: forward, backward, first_step, forward, backward, second_step;
* ``compiled halves``: the same with only ``first_step`` and ``second_step`` compiled
  (``fullgraph=True``; the forward and backward eager);
* ``compiled step``: the whole step under ``torch.compile`` (default mode; it breaks at the
  two ``backward`` calls, torch's own graph breaks).

    python bench/compile_step.py [--width 512] [--depth 4] [--batch 64] [--rounds 7]

Values change every step (tensors changed in place, as ``docs/compile.md`` recommends), so
the compiled candidates show they do not recompile (the count of graphs is printed).
"""

import argparse
import copy
import statistics
import time

import torch
from torch._dynamo.utils import counters

from fsam_fused import FSAM


def _model(width, depth):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def _candidate(net, compiled):
    rho, sigma = torch.tensor(0.05, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    lr = torch.tensor(0.01)
    opt = FSAM(
        net.parameters(),
        torch.optim.SGD,
        rho=rho,
        sigma=sigma,
        lr=lr,
        momentum=0.9,
        backend="cpp",
        fixed_addresses=True,
    )

    def step(x, y):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.second_step(zero_grad=True)

    def halves(x, y):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        f1()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        f2()
        opt.zero_grad()

    f1 = torch.compile(lambda: opt.first_step(), fullgraph=True)
    f2 = torch.compile(lambda: opt.second_step(), fullgraph=True)
    run = {"eager": step, "compiled halves": halves, "compiled step": torch.compile(step)}[compiled]

    def values(k):
        rho.fill_(0.05 + 1e-4 * (k % 7))
        sigma.fill_(0.5 + 1e-3 * (k % 5))
        lr.fill_(0.01 / (1 + 0.01 * k))

    return opt, step, run, values


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    net = _model(a.width, a.depth)
    x = torch.randn(a.batch, a.width)
    y = torch.randint(0, 10, (a.batch,))
    names = ("eager", "compiled halves", "compiled step")
    cands = {}
    for name in names:
        n = copy.deepcopy(net)
        opt, eager_step, run, values = _candidate(n, name)
        for k in range(2):  # eager warm-up: plan and EMAs
            values(k)
            eager_step(x, y)
        t0 = time.perf_counter()
        run(x, y)  # compiles
        print(f"{name:<16} first call (compile) {time.perf_counter() - t0:6.1f} s", flush=True)
        cands[name] = (run, values)
    graphs = counters["stats"]["unique_graphs"]
    times = {name: [] for name in names}
    for _ in range(a.rounds):
        for name in names:
            run, values = cands[name]
            ts = []
            for k in range(a.reps):
                values(k)
                t0 = time.perf_counter()
                run(x, y)
                ts.append(time.perf_counter() - t0)
            times[name].append(statistics.median(ts))
    params = sum(p.numel() for p in net.parameters())
    print(
        f"MLP {a.depth}x{a.width} ({params / 1e6:.2f} M parameters), batch {a.batch}, "
        f"{torch.get_num_threads()} threads; medians of {a.rounds} interleaved rounds of "
        f"{a.reps} steps"
    )
    eager = statistics.median(times["eager"])
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:<16} {med * 1e3:8.2f} ms per step   {med / eager:5.2f}x eager")
    extra = counters["stats"]["unique_graphs"] - graphs
    print(f"graphs compiled during the timed steps (values changing every step): {extra}")


if __name__ == "__main__":
    main()
