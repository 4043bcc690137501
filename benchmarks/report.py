"""Turn a pytest-benchmark JSON file into a markdown table (and, with --png, a chart of mplus's speed-ups).

    python benchmarks/report.py bench-results/quick.json [--png bench-results/speedups-quick.png]

Per group: every provider's median time, peak extra memory and metrics, and "mplus speed-up" = the provider's
median / mplus's median (so > 1 means mplus is faster). "ISA" is the level the C++ CPU kernels ran at
(``mplus@<level>`` rows: the same call at another level); a provider's ``variant`` (its setting, e.g. a buffer reused
or allocated per call) follows its name. "of peak" gives the provider's FLOP rate as a fraction of the machine's
measured fp32 peak (``fp32_peak_gflops``, a dense fp32 matmul; bf16 kernels on ``vdpbf16ps`` can pass 100%) and its
``gbps`` (bytes read + written once / median) as a fraction of the machine's measured read bandwidth
(``read_bw_gbps``, an fp32 sum streamed from memory; above 100%: the data stayed in the caches between rounds); see
benchmarks/conftest.py.

Before the table: the machine, M+'s overhead over a plain Llama of the same widths (``llama_sdpa``: the median of
``mplus`` / the median of ``llama_sdpa`` in each model-level group: the number the project exists to shrink), the
same for the official computation (``official_sdpa``), and both of mplus's variants where a group has two
(``mplus`` and ``mplus_<variant>``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

METRICS = ("tflops", "gflops", "gbps", "tokens_per_s", "rank_step_ms")  # rank_step_ms: bench_distributed.py


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
    """The FLOP rate as a fraction of the fp32 peak, else the bandwidth as a fraction of the read bandwidth."""
    gflops = info["tflops"] * 1e3 if "tflops" in info else info.get("gflops")
    peak, read_bw = info.get("fp32_peak_gflops"), info.get("read_bw_gbps")
    if gflops is not None and peak:
        return f"{gflops / peak:.0%} fp32"
    if info.get("gbps") is not None and read_bw:
        return f"{info['gbps'] / read_bw:.0%} read"
    return "–"


def _label(row: dict) -> str:
    variant = row["info"].get("variant")
    return f"{row['provider']} ({variant})" if variant else row["provider"]


def _phase(group: str) -> str:
    """A model-level group's phase in words: model/prefill2048 -> prefill, training_step/.../fp32 -> training step
    fp32, serving/decode4 B4 -> serving decode4 B4."""
    head, _, rest = group.partition("/")
    if head == "model":
        return rest.rstrip("0123456789")
    if head == "training_step":
        return "training step " + rest.rpartition("/")[2]
    return f"{head} {rest}"


def _ratios(groups: dict[str, list[dict]], num: str, den: str) -> list[str]:
    """``<phase> <median of num / median of den>×`` for every group holding both providers, model-level first."""
    out = []
    order = ("model/prefill", "model/decode", "model/inject")  # the headline phases first, in this order
    for group in sorted(groups, key=lambda g: (next((i for i, o in enumerate(order) if g.startswith(o)), 3), g)):
        rows = {r["provider"]: r for r in groups[group]}
        if num in rows and den in rows:
            out.append(f"{_phase(group)} {rows[num]['median'] / rows[den]['median']:.2f}×")
    return out


def summary(groups: dict[str, list[dict]]) -> str:
    """The lines printed before the table: machine, M+'s overheads, both variants of a group's mplus."""
    lines = []
    info = next((r["info"] for rows in groups.values() for r in rows if "machine" in r["info"]), None)
    if info is not None:
        lines.append(
            f"Machine: {info['machine']}; CPU {info.get('cpu', '?')}; C++ kernels at ISA level "
            f"{info.get('cpu_isa', '?')}; measured fp32 peak {info.get('fp32_peak_gflops', 0):.0f} GFLOP/s, read "
            f"bandwidth {info.get('read_bw_gbps', 0):.1f} GB/s; run: {info.get('bench_mode', '?')}."
        )
    for num, den, what in [
        ("mplus", "llama_sdpa", "M+ overhead over a plain Llama (time of mplus / of a transformers Llama, same widths "
         "and base weights, SDPA, its own KV cache)"),
        ("official_sdpa", "llama_sdpa", "The official M+ computation's overhead over it (official_sdpa / llama_sdpa)"),
        ("official_sdpa", "mplus", "mplus over the official M+ computation (official_sdpa / mplus)"),
    ]:  # fmt: skip
        ratios = _ratios(groups, num, den)
        if ratios:
            lines.append(f"{what}: {', '.join(ratios)}.")
    parts = []
    for group in sorted(groups):
        rows = groups[group]
        variants = sorted(
            (r for r in rows if r["provider"] == "mplus" or r["provider"].startswith("mplus_")),
            key=lambda r: r["provider"] != "mplus",
        )
        peers = [r for r in rows if not r["provider"].startswith("mplus")]
        if any(r["provider"].startswith("mplus_") for r in variants) and peers:
            ratios = [
                f"{p['provider']} / {_label(v)} {p['median'] / v['median']:.1f}×" for p in peers for v in variants
            ]
            parts.append(f"{group}: {'; '.join(ratios)}")
    if parts:
        lines.append(
            "Both variants of mplus where a group has two (mplus: what a model does): " + ". ".join(parts) + "."
        )
    return "\n\n".join(lines)


def markdown(groups: dict[str, list[dict]]) -> str:
    lines = [
        "| group | shape | dtype | provider | ISA | median | rounds | mplus speed-up | peak extra | metric | of peak |",
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
                f"| {group} | {info.get('shape', '')} | {info.get('dtype', '')} | {_label(r)} | "
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
    head = summary(groups)
    if head:
        print(head + "\n")
    print(markdown(groups))
    if args.png:
        chart(groups, args.png)
        print(f"\nchart: {args.png}")


if __name__ == "__main__":
    main()
