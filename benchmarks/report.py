"""Turn a pytest-benchmark JSON file into a markdown table (and, with --png, a chart of mplus's speed-ups).

    python benchmarks/report.py bench-results/latest.json [--png bench-results/speedups.png]

Per group: every provider's median time, peak extra memory and metrics, and "mplus speed-up" = the provider's
median / mplus's median (so > 1 means mplus is faster). "ISA" is the level the C++ CPU kernels ran at
(``mplus@<level>`` rows: the same call at another level), "of fp32 peak" the provider's FLOP rate as a fraction of the
machine's measured fp32 peak (``fp32_peak_gflops``, a dense fp32 matmul; see benchmarks/conftest.py).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

METRICS = ("tflops", "gflops", "gbps", "tokens_per_s")


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def load(path: str) -> dict[str, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        groups[b.get("group") or b["name"]].append(
            {
                "provider": info.get("provider", b["name"]),
                "median": b["stats"]["median"],
                "rounds": b["stats"]["rounds"],
                "info": info,
            }
        )
    return groups


def speedups(groups: dict[str, list[dict]]) -> list[tuple[str, str, float]]:
    """(group, provider, provider median / mplus median) for every non-mplus provider of a group with mplus."""
    out = []
    for group, rows in groups.items():
        mplus = [r for r in rows if r["provider"] == "mplus"]
        if not mplus:
            continue
        for r in rows:
            if r["provider"] != "mplus":
                out.append((group, r["provider"], r["median"] / mplus[0]["median"]))
    return out


def _peak_fraction(info: dict) -> str:
    gflops = info["tflops"] * 1e3 if "tflops" in info else info.get("gflops")
    peak = info.get("fp32_peak_gflops")
    return "–" if gflops is None or not peak else f"{gflops / peak:.0%}"


def markdown(groups: dict[str, list[dict]]) -> str:
    lines = [
        "| group | shape | dtype | provider | ISA | median | rounds | mplus speed-up | peak extra | metric "
        "| of fp32 peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda r: (r["provider"] != "mplus", r["provider"]))
        mplus = next((r for r in rows if r["provider"] == "mplus"), None)
        for r in rows:
            info = r["info"]
            ratio = "–" if mplus is None or r is mplus else f"{r['median'] / mplus['median']:.1f}×"
            metric = ", ".join(f"{m} {info[m]:.3g}" for m in METRICS if m in info) or "–"
            lines.append(
                f"| {group} | {info.get('shape', '')} | {info.get('dtype', '')} | {r['provider']} | "
                f"{info.get('cpu_isa', '–')} | {_fmt_time(r['median'])} | {r['rounds']} | {ratio} | "
                f"{_fmt_bytes(info.get('peak_extra_bytes'))} | {metric} | {_peak_fraction(info)} |"
            )
    return "\n".join(lines)


def chart(groups: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speedups(groups)
    if not rows:
        return
    labels = [f"{g}\nvs {p}" for g, p, _ in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [s for _, _, s in rows], color="#3b7dd8")
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("mplus speed-up (provider median / mplus median, log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--png", help="also write a bar chart of mplus's speed-ups")
    args = parser.parse_args()
    groups = load(args.json_file)
    print(markdown(groups))
    if args.png:
        chart(groups, args.png)
        print(f"\nchart: {args.png}")


if __name__ == "__main__":
    main()
