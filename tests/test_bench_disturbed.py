"""The benchmark says when its figures cannot be trusted (issue 18): a copy slower than the
step it bounds (over 100% of a ceiling) or a spread above report.SPREAD_LIMIT, in the table
and the summary line. Synthetic records and timings: no machine load is needed."""

from __future__ import annotations

import time

import pytest
import torch

from fsam_fused.bench import report, suite


def rec(backend, ms, pct=80.0, spread=0.02, copy_spread=0.02, peer=False, dtype="float32"):
    nbytes = 40e6
    gbps = nbytes / ms / 1e6
    return {
        "kind": "optimizer", "backend": backend, "peer": peer, "preset": "resnet18",
        "dtype": dtype, "device": "cpu", "ms": ms, "bytes": nbytes, "gbps": gbps,
        "copy_gbps": gbps * 100 / pct, "torch_copy_gbps": 10.0, "copy_kind": "stream",
        "pct_copy": pct, "speedup_vs_reference": None, "speedup_vs": {},
        "spread": spread, "copy_spread": copy_spread, "torch_copy_spread": 0.02,
    }  # fmt: skip


def test_spread_is_the_relative_interquartile_range():
    assert report.spread([10.0] * 7) == 0.0
    assert report.spread([8.0, 9.0, 10.0, 11.0, 12.0]) == pytest.approx(2.0 / 10.0)
    # One outlier of fifteen does not count as disturbed; a quarter of them does.
    assert report.spread([10.0] * 14 + [100.0]) == 0.0
    assert report.spread([10.0] * 10 + [30.0] * 5) > report.SPREAD_LIMIT
    assert report.spread([5.0]) == 0.0


def test_clean_run_has_no_marks():
    records = [rec("cpp", 6.0), rec("po-loop", 30.0, pct=20.0, peer=True)]
    assert all(report.doubts(r) == [] for r in records)
    for text in (report.terminal_table(records), report.markdown_table(records)):
        assert report.MARK not in text
    assert "Not to be trusted" not in report.auto_summary(records)


@pytest.mark.parametrize(
    "bad, why",
    [
        (dict(pct=228.0), "copy slower than the step (228%)"),
        (dict(spread=0.6), "spread 60%"),
        (dict(copy_spread=0.4), "copy spread 40%"),
    ],
)
def test_untrustworthy_figure_is_flagged_in_table_and_summary(bad, why):
    records = [rec("cpp", 6.0, **bad), rec("po-loop", 30.0, pct=20.0, peer=True)]
    assert report.doubts(records[0]) == [why]
    assert report.doubts(records[1]) == []
    term = report.terminal_table(records)
    row = next(line for line in term.splitlines() if line.startswith("resnet18  float32   cpp "))
    assert report.MARK in row
    assert f"- resnet18 float32 cpp: {why}" in term and report.RULE in term
    md = report.markdown_table(records)
    assert md.count(report.MARK) == 2  # the cpp row and the legend; not the peer's
    summary = report.auto_summary(records)
    assert "Not to be trusted" in summary and why in summary
    assert report.auto_summary(records, plain=True) in term


def test_old_records_without_spreads_are_judged_by_the_ceiling_only():
    old = rec("cpp", 6.0, pct=102.0)
    for key in ("spread", "copy_spread", "torch_copy_spread"):
        del old[key]
    assert len(report.doubts(old)) == 1
    old["pct_copy"] = 99.0
    assert report.doubts(old) == []


def test_time_interleaved_measures_each_figures_spread():
    calls = {"n": 0}

    def jittery():  # every other call four times as long: a disturbed figure
        calls["n"] += 1
        time.sleep(0.004 if calls["n"] % 2 else 0.001)

    spreads = {}
    ms = suite.time_interleaved(
        {"steady": (None, lambda: time.sleep(0.002)), "jittery": (None, jittery)},
        torch.device("cpu"), reps=8, warmup=1, spreads=spreads,
    )  # fmt: skip
    assert set(spreads) == set(ms) == {"steady", "jittery"}
    assert spreads["jittery"] > report.SPREAD_LIMIT
