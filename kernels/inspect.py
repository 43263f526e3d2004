"""Compile every F-SAM kernel for sm_80 and sm_90 without a GPU and report its code.

``python -m fsam_fused.kernels.inspect --json`` prints a JSON list of records::

    {"kernel", "target", "dtype", "hot_load_bits", "hot_store_bits", "registers", "spills"}

``hot_load_bits`` / ``hot_store_bits``: the widest global access to parameter-sized data in
the PTX. Table reads (pointers, sizes, per-tensor scalars) and the masked tail are scalar;
the full blocks are the only code that can be vectorised, so the widest *vector* access is the
unmasked hot path. Where a kernel has no vector access the weight's element width is reported
(the data path is scalar), and ``null`` where the kernel stores no parameter-sized data (the
norm pass writes one float per program). ``registers`` and ``spills`` (bytes of local memory
per thread, which in these kernels only spilling creates) come from the cubin via the
``cuobjdump`` that Triton ships.

This must run without ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` yields
objects that ``triton.compile`` cannot take.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import fsam as K

TARGETS = {"sm_80": 80, "sm_90": 90}
DTYPES = {"float32": tl.float32, "bfloat16": tl.bfloat16, "float16": tl.float16}
_ELEM_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}

_TABLES = {"ptr_tab": "*i64", "grad_tab": "*i64", "numel_tab": "*i64", "chunk_tab": "*i32"}
# (kernel function, runtime signature, stores parameter-sized data)
KERNELS = {
    "norm": (
        K._norm_kernel,
        {
            **_TABLES,
            "scal_tab": "*fp32",
            "part_ptr": "*fp32",
            "n_chunks": "i32",
            "val_ptr": "*fp32",
            "inv_ptr": "*fp32",
        },
        False,
    ),
    "perturb": (
        K._perturb_kernel,
        {
            **_TABLES,
            "scal_tab": "*fp32",
            "sq_ptr": "*fp32",
            "n_sq": "i32",
            "n_chunks": "i32",
            "val_ptr": "*fp32",
            "inv_ptr": "*fp32",
            "found_ptr": "*fp32",
        },
        True,
    ),
    "restore": (K._restore_kernel, {**_TABLES, "scal_tab": "*fp32", "n_chunks": "i32"}, True),
}


def _constexprs(kernel: str, dtype) -> dict:
    """The configuration a default FSAM step launches: official order, EMA in float32,
    non-adaptive, 16-byte-aligned tensors."""
    c = dict(W_DTYPE=dtype, ALIGNED=True, BLOCK=K.BLOCK, CHUNK=K.CHUNK)
    if kernel != "restore":
        c.update(M_DTYPE=tl.float32, HAS_EMA=True, PAPER=False, ADAPTIVE=False)
        # No GradScaler: FSAM_INSPECT_UNSCALE=1 inspects the variant that multiplies by 1/scale.
        c["UNSCALE"] = os.environ.get("FSAM_INSPECT_UNSCALE", "0") == "1"
    if kernel == "perturb":
        c["RBLOCK"] = K.RBLOCK
    return c


def compile_kernel(kernel: str, dtype_name: str, target: str):
    fn, sig, _ = KERNELS[kernel]
    constexprs = _constexprs(kernel, DTYPES[dtype_name])
    signature = {**sig, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn, signature=signature, constexprs=constexprs)
    return triton.compile(
        src, target=GPUTarget("cuda", TARGETS[target], 32), options=K.MultiTensorFSAM._launch_opts()
    )


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")


def widest(ptx: str, op: str, elem_bits: int):
    """Widest vector ``op`` ('ld' or 'st') in bits; the element width if all are scalar;
    None if the PTX has no such access at all."""
    found = False
    best = 0
    for m in _ACCESS.finditer(ptx):
        if m.group(1) != op:
            continue
        found = True
        if m.group(2):
            best = max(best, int(m.group(2)) * int(m.group(3)))
    if not found:
        return None
    return best or elem_bits


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"cuobjdump not found at {path}: Triton's NVIDIA backend binaries are missing"
        )
    return path


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread) of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def inspect_all() -> list[dict]:
    records = []
    for kernel, (_, _, stores) in KERNELS.items():
        for target in TARGETS:
            for dtype_name in DTYPES:
                c = compile_kernel(kernel, dtype_name, target)
                ptx = c.asm["ptx"]
                regs, spills = resources(c.asm["cubin"])
                records.append(
                    {
                        "kernel": kernel,
                        "target": target,
                        "dtype": dtype_name,
                        "hot_load_bits": widest(ptx, "ld", _ELEM_BITS[dtype_name]),
                        "hot_store_bits": widest(ptx, "st", _ELEM_BITS[dtype_name])
                        if stores
                        else None,
                        "registers": regs,
                        "spills": spills,
                    }
                )
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fsam_fused.kernels.inspect", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", action="store_true", help="print JSON records (default: a table)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print(
            "inspect: unset TRITON_INTERPRET; the interpreter cannot compile kernels",
            file=sys.stderr,
        )
        return 2
    records = inspect_all()
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        cols = list(records[0])
        print("  ".join(f"{c:>14}" for c in cols))
        for r in records:
            print("  ".join(f"{str(r[c]):>14}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
