"""Issue 14, item 1: DDP replicas never diverge because of a rank-local decision. A NaN in
one rank's first-pass gradient (per-replica mode: under no_sync; and the synced mode) with
every kind of base step (a fused base that skips on the device, a plain one,
``skip_nonfinite=True``, a GradScaler with a plain and with a fused base): after 3 steps
every rank holds the same weights, bit for bit, and the same found flags and scale.

2 processes on gloo over 127.0.0.1, a free port each, every wait bounded
(``tests/test_distributed.launch``)."""

from __future__ import annotations

import pytest
import torch
from test_distributed import launch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

BASES = ["sgd_fused", "adamw_fused", "sgd", "skip", "scaler", "scaler_fused"]


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
    jobs = [
        {"name": f"{b}_{'sync' if sync else 'local'}", "mode": "nan", "base": b, "sync": sync}
        for b in BASES
        for sync in (False, True)
    ]
    jobs += [
        {"name": f"fsdp_{kind}_{base}", "mode": "fsdp", "steps": 3, "base": base}
        | ({"init_state": True} if kind == "init" else {})
        for kind in ("init", "plain")
        for base in ("sgd", "adamw")
    ]
    out = str(tmp_path_factory.mktemp("nan"))
    return launch(jobs, out, 2, "cpu")


@pytest.mark.parametrize("sync", [False, True], ids=["per_replica", "synced"])
@pytest.mark.parametrize("base", BASES)
def test_nan_on_one_rank_keeps_replicas_identical(nan_runs, base, sync):
    r0, r1 = nan_runs[f"{base}_{'sync' if sync else 'local'}"]
    assert len(r0["traj"]) == 3
    for step, (a, b) in enumerate(zip(r0["traj"], r1["traj"])):
        for name in a:
            assert torch.equal(a[name], b[name]), (base, sync, step, name)
    assert r0["scales"] == r1["scales"]
    # Every finding base saw the NaN on both ranks (the flag agreed before the decision).
    if base != "sgd":
        assert r0["flags"][1] >= 1.0 and r1["flags"][1] >= 1.0, (r0["flags"], r1["flags"])
    # The run is not a no-op: the weights moved.
    assert not torch.equal(r0["traj"][0]["fc1.weight"], r0["traj"][2]["fc1.weight"])


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_fsdp2_init_state_without_a_load_changes_nothing(nan_runs, base):
    """Issue 14, item 6 under FSDP2: init_state(opt) with no checkpoint loaded after it,
    then 3 steps: the trajectory of the same run without init_state, bit for bit."""
    for r in range(2):
        a = nan_runs[f"fsdp_init_{base}"][r]["traj"]
        b = nan_runs[f"fsdp_plain_{base}"][r]["traj"]
        assert len(a) == len(b) == 3
        for step, (x, y) in enumerate(zip(a, b)):
            for name in x:
                assert torch.equal(x[name], y[name]), (base, r, step, name)
