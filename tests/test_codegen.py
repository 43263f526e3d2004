"""Every kernel compiles for sm_80 and sm_90 without a GPU, with 128-bit hot loads and
stores and no spills. Runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest for
the numerical tests) kernels cannot be compiled."""

import json
import os
import subprocess
import sys

import pytest

from helpers import require_triton

require_triton()

pytestmark = pytest.mark.codegen

KEYS = {"kernel", "target", "dtype", "hot_load_bits", "hot_store_bits", "registers", "spills"}


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "fsam_fused.kernels.inspect", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_kernel_target_and_dtype_compiles(records):
    assert all(set(r) == KEYS for r in records)
    got = {(r["kernel"], r["target"], r["dtype"]) for r in records}
    want = {
        (k, t, d)
        for k in ("norm", "perturb", "restore")
        for t in ("sm_80", "sm_90")
        for d in ("float32", "bfloat16", "float16")
    }
    assert got == want


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hot_path_is_128_bit_with_no_spills_on_sm90(records, dtype):
    for r in records:
        if r["target"] != "sm_90" or r["dtype"] != dtype:
            continue
        assert r["hot_load_bits"] == 128, r
        if r["kernel"] == "norm":
            assert r["hot_store_bits"] is None, r  # writes one partial sum per program
        else:
            assert r["hot_store_bits"] == 128, r
        assert r["spills"] == 0, r
        assert 0 < r["registers"] <= 255, r


def test_widest_access_parser():
    from fsam_fused.kernels.inspect import widest

    ptx = """
        ld.global.b64 { %rd7 }, [ %rd8 + 0 ];
        @%p1 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        st.global.v2.b32 [ %rd2 + 0 ], { %r1, %r2 };
        @%p4 st.global.b16 [ %rd27 + 0 ], { %rs1 };
    """
    assert widest(ptx, "ld", 16) == 128
    assert widest(ptx, "st", 16) == 64
    assert widest("ld.global.b32 {%r1}, [%rd1];", "ld", 32) == 32
    assert widest("ld.global.b32 {%r1}, [%rd1];", "st", 32) is None
