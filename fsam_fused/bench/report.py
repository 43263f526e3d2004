"""Tables (terminal and README markdown) and the comparison plot, from benchmark records."""

from __future__ import annotations

import statistics

PEER_ORDER = ("po-foreach", "po-loop", "compiled-foreach")

# A figure is not trusted when its repetitions spread more than this: the interquartile
# range over the median (an undisturbed CPU run stays well under it; a neighbour's
# burst during the run goes over). The copy it is compared with is judged the same way.
SPREAD_LIMIT = 0.25
MARK = "(!)"


def spread(times) -> float:
    """Interquartile range / median of one figure's repetitions (0.0 for fewer than 2)."""
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(times)


def doubts(r) -> list[str]:
    """Why record ``r``'s figures cannot be trusted (empty when they can): its copy was
    slower than the step it bounds (over 100% of a ceiling: the copy was disturbed), or its
    time, or its copy's, spread over :data:`SPREAD_LIMIT`. Records written before the spreads
    were measured are judged by the first rule only."""
    out = []
    if r["pct_copy"] > 100:
        out.append(f"copy slower than the step ({r['pct_copy']:.0f}%)")
    for key, what in (
        ("spread", "spread"),
        ("copy_spread", "copy spread"),
        ("torch_copy_spread", "torch copy_ spread"),
    ):
        if r.get(key) is not None and r[key] > SPREAD_LIMIT:
            out.append(f"{what} {r[key]:.0%}")
    return out


RULE = (
    f"{MARK} cannot be trusted: a copy slower than the step it bounds (over 100%), or a "
    f"spread (interquartile range / median of the rounds) over {SPREAD_LIMIT:.0%}; the "
    "machine was busy: rerun it quiet, compare ratios within a run"
)


def _doubt_lines(records) -> list[str]:
    rows = [r for r in records if r.get("kind", "optimizer") == "optimizer" and doubts(r)]
    if not rows:
        return []
    return [RULE + ":"] + [
        f"- {r['preset']} {r['dtype']} {r['backend']}: " + ", ".join(doubts(r)) for r in rows
    ]


def _pct(r) -> str:
    return f"{r['pct_copy']:.0f}%" + (f" {MARK}" if doubts(r) else "")


def _peers(records):
    seen = {r["backend"] for r in records if r.get("peer")}
    return [p for p in PEER_ORDER if p in seen]


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _adamw(r):
    """The step's time in fused AdamW steps timed beside it (below 1: cheaper than the step
    a user already pays), or "-" for records without one."""
    v = r.get("x_adamw")
    return "-" if v is None else f"{v:.2f}"


def terminal_table(records) -> str:
    """Median ms, GB/s against counted bytes, % of the copy bandwidth measured beside it, and
    the speed-up over the reference and over each peer."""
    peers = _peers(records)
    head = (
        f"{'preset':<10}{'dtype':<10}{'candidate':<18}{'ms':>10}{'GB/s':>8}{'% copy':>12}"
        f"{'x AdamW':>8}{'x ref':>8}" + "".join(f"{'x ' + p:>19}" for p in peers)
    )
    lines = [head, "-" * len(head)]
    for r in records:
        if r.get("kind", "optimizer") != "optimizer":
            continue
        lines.append(
            f"{r['preset']:<10}{r['dtype']:<10}{r['backend']:<18}{r['ms']:>10.3f}"
            f"{r['gbps']:>8.1f}{_pct(r):>12}{_adamw(r):>8}"
            f"{_x(r['speedup_vs_reference']):>8}"
            + "".join(f"{_x(r['speedup_vs'].get(p)):>19}" for p in peers)
        )
    copies = {}
    for r in records:
        if r.get("kind", "optimizer") == "optimizer":
            copies[(r["preset"], r["dtype"])] = (
                r["copy_gbps"],
                r.get("torch_copy_gbps"),
                r.get("copy_kind", "torch"),
            )
    lines.append("")
    lines.append("x AdamW: the step's time in torch.optim.AdamW(fused=True) steps on the same list")
    lines.append(
        "copy bandwidth measured beside each group (read + write; streaming copy, "
        "then torch's copy_): "
        + ", ".join(
            f"{p} {d} {g:.1f}" + (f" / {t:.1f}" if k == "stream" else "") + " GB/s"
            for (p, d), (g, t, k) in copies.items()
        )
    )
    lines += _doubt_lines(records)
    summary = auto_summary(records, plain=True)
    if summary:
        lines.append("summary: " + summary)
    return "\n".join(lines)


def markdown_table(records) -> str:
    """The README's table for one result file's optimizer records."""
    peers = _peers(records)
    stream = any(r.get("copy_kind") == "stream" for r in records)
    adamw = any(r.get("x_adamw") is not None for r in records)
    head = "| preset | dtype | candidate | ms | GB/s | copy GB/s | % of copy | "
    if stream:
        head = (
            "| preset | dtype | candidate | ms | GB/s | stream copy GB/s | % of stream copy "
            "| torch copy_ GB/s | "
        )
    if adamw:
        head += "x AdamW(fused) step | "
    out = [
        head + "x reference | " + " | ".join(f"x {p}" for p in peers) + " |",
        "|---|---|---|---:|---:|---:|---:|---:|"
        + ("---:|" if stream else "")
        + ("---:|" if adamw else "")
        + "---:|" * len(peers),
    ]
    for r in records:
        if r.get("kind", "optimizer") != "optimizer":
            continue
        torch_copy = f" | {r['torch_copy_gbps']:.1f}" if stream else ""
        out.append(
            f"| {r['preset']} | {r['dtype']} | {r['backend']} | {r['ms']:.2f} "
            f"| {r['gbps']:.1f} | {r['copy_gbps']:.1f} | {_pct(r)}{torch_copy} "
            + (f"| {_adamw(r)} " if adamw else "")
            + f"| {_x(r['speedup_vs_reference'])} | "
            + " | ".join(_x(r["speedup_vs"].get(p)) for p in peers)
            + " |"
        )
    doubt = _doubt_lines(records)
    return "\n".join(out + ([""] + doubt if doubt else []))


def auto_summary(records, preset="resnet18", dtype="float32", plain=False) -> str:
    """One sentence: what backend="auto" picks on this device against the best peer (for a
    newcomer, without the README: ``plain`` drops the markdown)."""
    opt = [r for r in records if r.get("kind", "optimizer") == "optimizer"]
    if opt and not any(r["preset"] == preset and r["dtype"] == dtype for r in opt):
        preset, dtype = opt[0]["preset"], opt[0]["dtype"]  # a run without the default group
    rows = {r["backend"]: r for r in opt if r["preset"] == preset and r["dtype"] == dtype}
    auto = rows.get("triton" if opt and opt[0]["device"] == "cuda" else "cpp")
    peers = [r for r in rows.values() if r.get("peer")]
    if auto is None or not peers:
        return ""
    best = min(peers, key=lambda r: r["ms"])
    q = "" if plain else "`"
    kind = "streaming copy" if auto.get("copy_kind") == "stream" else "copy"
    return (
        f'{preset} {dtype}: {q}backend="auto"{q} ({auto["backend"]}) takes '
        f"{auto['ms']:.2f} ms per F-SAM step, {best['ms'] / auto['ms']:.2f}x faster than "
        f"the best peer ({best['backend']}, {best['ms']:.2f} ms); its {auto['gbps']:.1f} "
        f"GB/s of counted traffic is {auto['pct_copy']:.0f}% of the "
        f"{auto['copy_gbps']:.1f} GB/s {kind} measured beside it."
    ) + _summary_doubts(auto, best)


def _summary_doubts(auto, best) -> str:
    said = [f"{r['backend']}: " + ", ".join(doubts(r)) for r in (auto, best) if doubts(r)]
    if not said:
        return ""
    return (
        f" Not to be trusted, the machine was busy ({'; '.join(said)}; limit: spread "
        f"{SPREAD_LIMIT:.0%}, copy not slower than the step)."
    )


def markdown_e2e(records) -> str:
    rows = [r for r in records if r.get("kind") == "e2e"]
    if not rows:
        return ""
    pub = next((r for r in rows if r["backend"] == "published-loop"), None)
    out = [
        "| training step | ms per step | x published | optimizer ms | optimizer share "
        "| optimizer x published |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        opt_x = _x(pub["optimizer_ms"] / r["optimizer_ms"]) if pub else "-"
        out.append(
            f"| {r['backend']} | {r['ms']:.1f} | {_x(r['speedup_vs_published'])} "
            f"| {r['optimizer_ms']:.2f} | {r['optimizer_share'] * 100:.1f}% | {opt_x} |"
        )
    return "\n".join(out)


def plot(records, path) -> None:
    """Horizontal bars of median ms per candidate, one panel per (preset, dtype)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]' (from a clone)") from e
    groups = {}
    for r in records:
        if r.get("kind", "optimizer") == "optimizer":
            groups.setdefault((r["preset"], r["dtype"]), []).append(r)
    fig, axes = plt.subplots(
        len(groups),
        1,
        figsize=(8, 1.2 + 0.45 * max(len(g) for g in groups.values()) * len(groups)),
        squeeze=False,
    )
    for ax, ((preset, dtype), rows) in zip(axes[:, 0], groups.items()):
        names = [r["backend"] for r in rows]
        ms = [r["ms"] for r in rows]
        colors = [
            "tab:gray"
            if r.get("peer")
            else ("tab:blue" if r["backend"] in ("reference", "foreach") else "tab:green")
            for r in rows
        ]
        ax.barh(names, ms, color=colors)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for i, v in enumerate(ms):
            ax.text(v, i, f" {v:.2f} ms", va="center", fontsize=8)
        ax.set_title(
            f"{preset} {dtype}: optimizer-only step (first_step + second_step)", fontsize=9
        )
        ax.set_xlabel("median ms per step (log scale; shorter is faster)", fontsize=8)
        ax.set_ylabel("candidate", fontsize=8)
        ax.tick_params(labelsize=8)
    from matplotlib.patches import Patch

    handles = [
        Patch(color="tab:green", label="FSAM fused (Triton / C++)"),
        Patch(color="tab:blue", label="FSAM unfused (reference / foreach)"),
        Patch(color="tab:gray", label="peers (pytorch_optimizer, compiled foreach)"),
    ]
    first = records[0]
    fig.suptitle(f"{first['device_name']} - torch {first['torch']}", fontsize=9, y=0.995)
    # Above the panels, where no bar can hide under it.
    fig.legend(
        handles=handles,
        fontsize=7,
        loc="upper center",
        ncol=3,
        bbox_to_anchor=(0.5, 0.975),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    fig.savefig(path, dpi=110)
