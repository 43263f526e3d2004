"""The C++ backend before and after a change, interleaved in one process (a development
tool, not a test): the C++ source of an older revision is built under another op namespace
(``fsam_old``) and run through a backend that calls it with that revision's float-argument
schema (the one before values became tensors), beside the current ``cpp`` backend, on the
benchmark's presets:

    python bench/cpu_old_vs_new.py [--rev b263fab] [--presets resnet18 tiny2000 ...]
        [--dtypes float32 bfloat16] [--reps 15]

Prints, per preset and dtype, the median step of each and new/old (below 1: faster now).
Only the op calls differ between the two: both run through the same engine and plan.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsam_fused import backends, hparams  # noqa: E402
from fsam_fused.backends.cpp import CppBackend  # noqa: E402
from fsam_fused.bench import suite  # noqa: E402
from fsam_fused.bench.candidates import FSAMBackend  # noqa: E402
from fsam_fused.bench.presets import PRESETS  # noqa: E402
from fsam_fused.ops import cpp_build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_old(rev: str) -> None:
    """Compile ``csrc/fsam_cpu.cpp`` of ``rev`` as the ``fsam_old`` op library and load it."""
    from torch.utils import cpp_extension

    src = subprocess.run(
        ["git", "show", f"{rev}:csrc/fsam_cpu.cpp"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    src = src.replace("TORCH_LIBRARY(fsam_fused,", "TORCH_LIBRARY(fsam_old,").replace(
        "TORCH_LIBRARY_IMPL(fsam_fused,", "TORCH_LIBRARY_IMPL(fsam_old,"
    )
    d = os.path.join(tempfile.gettempdir(), f"fsam_old_{rev}_{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "fsam_old.cpp")
    with open(path, "w") as f:
        f.write(src)
    cpp_extension.load(
        name="fsam_old",
        sources=[path],
        build_directory=d,
        extra_cflags=list(cpp_build._cflags()),
        extra_ldflags=list(cpp_build._LDFLAGS),
        is_python_module=False,
        verbose=False,
    )


class OldCpp(CppBackend):
    """The current adapter, calling the old ops with the old float-argument schema (the
    values read from the bucket's CPU rows whenever they changed)."""

    def _old(self, b):
        dv = b.device_values
        if getattr(b.prep, "_old_version", None) != dv.version:
            rows, scalars = (a.tolist() for a in dv.host())
            b.prep._old = (
                [int(r[1]) for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                [r[0] for r in rows],
                scalars[0],
                scalars[1],
            )
            b.prep._old_version = dv.version
        return b.prep._old

    def prepare(self, b):
        super().prepare(b)
        b.prep = _OldStatic(b.prep)

    def norm(self, b, inputs):
        st, (ad, dec, gain, _, sigma, _) = b.prep, self._old(b)
        return torch.ops.fsam_old.norm_sq(
            st.weights, inputs.grads, st.emas, ad, dec, gain, sigma, b.paper, inputs.inv
        ), None

    def perturb(self, b, inputs, sq, carry):
        st, (ad, dec, gain, rho, sigma, eps) = b.prep, self._old(b)
        torch.ops.fsam_old.perturb_(
            st.weights,
            inputs.grads,
            st.emas,
            b.saved,
            sq,
            rho,
            ad,
            dec,
            gain,
            st.swap,
            sigma,
            eps,
            b.paper,
            inputs.inv,
            inputs.found,
        )
        for p, _, spare in st.swapped:
            p.data = spare

    def restore(self, b):
        st = b.prep
        for p, own, _ in st.swapped:
            p.data = own
        if st.copied[0]:
            torch.ops.fsam_old.restore_(*st.copied)


class _OldStatic:
    """The current per-plan arguments, with room for the old schema's float lists."""

    def __init__(self, st):
        self.__dict__.update({k: getattr(st, k) for k in st.__slots__})
        self._old, self._old_version = None, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="b263fab")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    build_old(args.rev)
    backends.CLASSES["cpp_old"] = OldCpp
    hparams.BACKENDS = (*hparams.BACKENDS, "cpp_old")
    pair = [FSAMBackend("old", "old ops", "cpp_old"), FSAMBackend("new", "new ops", "cpp")]
    for preset in args.presets:
        shapes = PRESETS[preset]()
        for dname in args.dtypes:
            params = suite.make_params(shapes, getattr(torch, dname), torch.device("cpu"))
            built = {c.name: c.build(params) for c in pair}
            steps = {name: (b.prepare, b.step) for name, b in built.items()}
            rounds = []
            for _ in range(3):  # three interleaved runs: medians of medians, and the spread
                rounds.append(suite.time_interleaved(steps, torch.device("cpu"), args.reps, 2))
            old = statistics.median(r["old"] for r in rounds)
            new = statistics.median(r["new"] for r in rounds)
            ratios = sorted(r["new"] / r["old"] for r in rounds)
            print(
                f"{preset:9s} {dname:8s} old {old:9.3f} ms  new {new:9.3f} ms  new/old "
                f"{new / old:.3f} [{ratios[0]:.3f}-{ratios[-1]:.3f}]",
                flush=True,
            )
            del built, params, steps


if __name__ == "__main__":
    main()
