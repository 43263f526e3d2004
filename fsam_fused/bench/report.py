"""Tables (terminal and README markdown) and the comparison plot, from benchmark records."""

from __future__ import annotations

PEER_ORDER = ("po-foreach", "po-loop", "compiled-foreach")


def _peers(records):
    seen = {r["backend"] for r in records if r.get("peer")}
    return [p for p in PEER_ORDER if p in seen]


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def terminal_table(records) -> str:
    """Median ms, GB/s against counted bytes, % of the copy bandwidth measured beside it, and
    the speed-up over the reference and over each peer."""
    peers = _peers(records)
    head = (f"{'preset':<10}{'dtype':<10}{'candidate':<18}{'ms':>10}{'GB/s':>8}{'% copy':>8}"
            f"{'x ref':>8}" + "".join(f"{'x ' + p:>19}" for p in peers))
    lines = [head, "-" * len(head)]
    for r in records:
        if r.get("kind", "optimizer") != "optimizer":
            continue
        lines.append(f"{r['preset']:<10}{r['dtype']:<10}{r['backend']:<18}{r['ms']:>10.3f}"
                     f"{r['gbps']:>8.1f}{r['pct_copy']:>7.0f}%{_x(r['speedup_vs_reference']):>8}"
                     + "".join(f"{_x(r['speedup_vs'].get(p)):>19}" for p in peers))
    copies = {}
    for r in records:
        if r.get("kind", "optimizer") == "optimizer":
            copies[(r["preset"], r["dtype"])] = r["copy_gbps"]
    lines.append("")
    lines.append("copy bandwidth measured beside each group (read + write): " + ", ".join(
        f"{p} {d} {g:.1f} GB/s" for (p, d), g in copies.items()))
    return "\n".join(lines)


def markdown_table(records) -> str:
    """The README's table for one result file's optimizer records."""
    peers = _peers(records)
    out = ["| preset | dtype | candidate | ms | GB/s | copy GB/s | % of copy | x reference | "
           + " | ".join(f"x {p}" for p in peers) + " |",
           "|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(peers)]
    for r in records:
        if r.get("kind", "optimizer") != "optimizer":
            continue
        out.append(f"| {r['preset']} | {r['dtype']} | {r['backend']} | {r['ms']:.2f} "
                   f"| {r['gbps']:.1f} | {r['copy_gbps']:.1f} | {r['pct_copy']:.0f}% "
                   f"| {_x(r['speedup_vs_reference'])} | "
                   + " | ".join(_x(r["speedup_vs"].get(p)) for p in peers) + " |")
    return "\n".join(out)


def auto_summary(records, preset="resnet18", dtype="float32") -> str:
    """One sentence: what backend="auto" picks on this device against the best peer."""
    rows = {r["backend"]: r for r in records if r.get("kind", "optimizer") == "optimizer"
            and r["preset"] == preset and r["dtype"] == dtype}
    auto = rows.get("triton" if records[0]["device"] == "cuda" else "cpp")
    peers = [r for r in rows.values() if r.get("peer")]
    if auto is None or not peers:
        return ""
    best = min(peers, key=lambda r: r["ms"])
    return (f"{preset} {dtype}: `backend=\"auto\"` ({auto['backend']}) takes "
            f"{auto['ms']:.2f} ms, {best['ms'] / auto['ms']:.2f}x faster than the best peer "
            f"({best['backend']}, {best['ms']:.2f} ms); its {auto['gbps']:.1f} GB/s of counted "
            f"traffic is {auto['pct_copy']:.0f}% of the {auto['copy_gbps']:.1f} GB/s copy "
            "measured beside it.")


def markdown_e2e(records) -> str:
    rows = [r for r in records if r.get("kind") == "e2e"]
    if not rows:
        return ""
    pub = next((r for r in rows if r["backend"] == "published-loop"), None)
    out = ["| training step | ms per step | x published | optimizer ms | optimizer share "
           "| optimizer x published |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        opt_x = _x(pub["optimizer_ms"] / r["optimizer_ms"]) if pub else "-"
        out.append(f"| {r['backend']} | {r['ms']:.1f} | {_x(r['speedup_vs_published'])} "
                   f"| {r['optimizer_ms']:.2f} | {r['optimizer_share'] * 100:.1f}% | {opt_x} |")
    return "\n".join(out)


def plot(records, path) -> None:
    """Horizontal bars of median ms per candidate, one panel per (preset, dtype)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'fsam-fused[bench]'") from e
    groups = {}
    for r in records:
        if r.get("kind", "optimizer") == "optimizer":
            groups.setdefault((r["preset"], r["dtype"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.45 * max(
        len(g) for g in groups.values()) * len(groups)), squeeze=False)
    for ax, ((preset, dtype), rows) in zip(axes[:, 0], groups.items()):
        names = [r["backend"] for r in rows]
        ms = [r["ms"] for r in rows]
        colors = ["tab:gray" if r.get("peer") else ("tab:blue" if r["backend"] in
                  ("reference", "foreach") else "tab:green") for r in rows]
        ax.barh(names, ms, color=colors)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for i, v in enumerate(ms):
            ax.text(v, i, f" {v:.2f} ms", va="center", fontsize=8)
        ax.set_title(f"{preset} {dtype}: optimizer-only step (first + second), median ms; "
                     "green fused, gray peers", fontsize=9)
    first = records[0]
    fig.suptitle(f"{first['device_name']} - torch {first['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
