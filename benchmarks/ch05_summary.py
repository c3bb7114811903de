"""Summary of the committed chapter 5 results: ``docs/benchmark-summary.md`` and a plot next to the CSV.

Runs anywhere (no GPU): it only reads ``results/<device>/ch05_fused_moe.csv`` (written by
``benchmarks/ch05_fused_moe.py`` on a GPU) and ``ch04_fused_gate_up.csv``.

    python benchmarks/ch05_summary.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

from triton_moe.shapes import MODELS  # noqa: E402
from triton_moe.timing import RESULTS, load_rows, plot_times, slug, summary_line  # noqa: E402

IMPLS = ["ch01 loop", "torch._grouped_mm", "ch03 unfused", "fused_moe", "fused_moe deterministic"]
SHORT = {"ch01 loop": "ch01 loop", "torch._grouped_mm": "grouped_mm", "ch03 unfused": "ch03+04 unfused",
         "fused_moe": "fused_moe", "fused_moe deterministic": "fused_moe det."}


def bar(rows):
    """The first performance bar: fused_moe >= 0.90 of the floor for Mixtral at M = 16..256 (uniform), and
    faster than torch._grouped_mm at every measured point."""
    lines = []
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["routing"], r["M"]), {})[r["impl"]] = r
    low = [(k, d["fused_moe"]["floor_fraction"]) for k, d in by.items()
           if k[0] == MODELS["mixtral"].name and k[1] == "uniform" and 16 <= k[2] <= 256 and "fused_moe" in d]
    miss = [f"M={k[2]}: {f:.2f}" for k, f in low if f < 0.90]
    lines.append(f"- Mixtral, uniform, M = 16..256, fused_moe at >= 0.90 of the floor: "
                 + ("**met** (" + ", ".join(f"{f:.2f}" for _, f in low) + ")" if not miss else "**missed** at " + ", ".join(miss)))
    slower = [f"{k[0]} {k[1]} M={k[2]} ({d['torch._grouped_mm']['median_ms'] / d['fused_moe']['median_ms']:.2f}x)"
              for k, d in by.items() if "fused_moe" in d and "torch._grouped_mm" in d
              and d["fused_moe"]["median_ms"] > d["torch._grouped_mm"]["median_ms"]]
    n = sum(1 for d in by.values() if "fused_moe" in d and "torch._grouped_mm" in d)
    lines.append(f"- faster than torch._grouped_mm at every measured point ({n} points): "
                 + ("**met**" if not slower else "**missed** at " + "; ".join(slower)))
    return lines


# Issue 6's targets: (model key, lowest M, highest M) -> the least floor fraction; Qwen3 at M = 1 is a time
# bound instead (time <= 1.5 x floor, i.e. fraction >= 1 / 1.5).
TARGETS = {
    "mixtral": [(1, 1, 0.90), (2, 256, 0.95), (512, 512, 0.90), (1024, 4096, 0.85)],
    "qwen3": [(1, 1, 1 / 1.5), (2, 256, 0.85), (512, 512, 0.85), (1024, 4096, 0.85)],
    "deepseek_v3": [(1, 1, 0.85), (2, 256, 0.90), (512, 512, 0.90), (1024, 4096, 0.85)],
}


def target_for(key: str, M: int) -> float | None:
    for lo, hi, t in TARGETS[key]:
        if lo <= M <= hi:
            return t
    return None


def issue6(rows):
    """Issue 6's table, cell by cell (uniform routing), and the skew criterion (skewed time within 10% of
    uniform at the same M)."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["routing"], r["M"]), {})[r["impl"]] = r
    lines = ["| shape | M | target | fused_moe floor fraction | met | skewed / uniform time |", "|---|---|---|---|---|---|"]
    misses, skew_miss = [], []
    for key in ("mixtral", "qwen3", "deepseek_v3"):
        name = MODELS[key].name
        for M in sorted({k[2] for k in by if k[0] == name}):
            u = by.get((name, "uniform", M), {}).get("fused_moe")
            sk = by.get((name, "skewed", M), {}).get("fused_moe")
            t = target_for(key, M)
            if not u or t is None:
                continue
            ok = u["floor_fraction"] >= t - 5e-3
            ratio = sk["median_ms"] / u["median_ms"] if sk else None
            if not ok:
                misses.append(f"{name} M={M}: {u['floor_fraction']:.2f} (target {t:.2f})")
            if ratio is not None and ratio > 1.10:
                skew_miss.append(f"{name} M={M}: {ratio:.2f}x")
            tgt = f"time <= 1.5x floor ({t:.2f})" if (key == "qwen3" and M == 1) else f">= {t:.2f}"
            lines.append(f"| {name} | {M} | {tgt} | {u['floor_fraction']:.2f} | {'yes' if ok else '**no**'} | "
                         + (f"{ratio:.2f}" if ratio is not None else "-") + " |")
    head = [f"- floor-fraction targets (uniform routing): {len(misses)} cells miss"
            + (": " + "; ".join(misses) if misses else ""),
            "- skewed within 10% of uniform at the same M: " + ("**met**" if not skew_miss else
                                                                 "**missed** at " + "; ".join(skew_miss)), ""]
    return head + lines


def table(rows, model, routing):
    sub = [r for r in rows if r["model"] == model and r["routing"] == routing]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in sub)]
    if not sub:
        return []
    out = [f"### {model}, {routing} routing", "",
           "| M | floor ms | " + " | ".join(SHORT[i] for i in impls) + " | grouped_mm / fused_moe |",
           "|---|---|" + "---|" * len(impls) + "---|"]
    for M in sorted({r["M"] for r in sub}):
        hit = {r["impl"]: r for r in sub if r["M"] == M}
        cells = [f"{hit[i]['median_ms']:.3f} ({hit[i]['floor_fraction']:.2f})" if i in hit else "-" for i in impls]
        sp = (f"{hit['torch._grouped_mm']['median_ms'] / hit['fused_moe']['median_ms']:.2f}x"
              if "fused_moe" in hit and "torch._grouped_mm" in hit else "-")
        out.append(f"| {M} | {next(iter(hit.values()))['floor_ms']:.3f} | " + " | ".join(cells) + f" | {sp} |")
    return out + [""]


def main() -> int:
    import matplotlib.pyplot as plt

    rows = load_rows("ch05_fused_moe")
    if not rows:
        print("no results/*/ch05_fused_moe.csv: not measured")
        return 1
    device = rows[0]["device"]
    md = ["# Benchmark summary: the MoE layer forward (chapters 4-5)", "",
          "Generated by `benchmarks/ch05_summary.py` from `results/" + slug(device) + "/ch05_fused_moe.csv` "
          "(measured by `benchmarks/ch05_fused_moe.py`). Each cell: median time in ms (floor / time). The floor "
          "is measured in the same run: max((expert-weight bytes + activation bytes) / copy bandwidth, FLOPs / "
          "bf16 matmul rate), counting the experts each timed input set really activates (`topk_ids.unique()`; "
          "a row's floor is the mean over its input sets; the CSV's `active_experts` column is their mean "
          "count). Results committed before run 5 used the uniform-routing expectation instead, which skewed "
          "and small-M routing could beat. Every implementation starts from the router logits (routing "
          "included). CUDA-graph replays of 4 forwards on different inputs per call, except the chapter-1 loop "
          "(it synchronises with the host: do_bench, 1 input set).", "",
          f"Run: {summary_line(rows)}.", "",
          "Implementations: `ch01 loop` = chapter 1's per-expert PyTorch loop; `grouped_mm` = torch routing + "
          "permutation + `torch._grouped_mm` on a concatenated w13 and on w2 + torch activation and combine; "
          "`ch03+04 unfused` = chapter 2's router and dispatch + chapter 3's `grouped_gemm` for gate, up and down + "
          "torch activation and weighted sum; `fused_moe` = this package (atomic combine); `fused_moe det.` = "
          "`deterministic=True` (uniform routing only). DeepSeek-V3 (routed) is routed with softmax top-8 here.", "",
          "Fractions slightly above 1 (up to 1.04) remain with honest expert counts where the weights stream from "
          "memory: the floor's bandwidth is a device-to-device copy (reads and writes interleaved, 3.0 TB/s), while "
          "the weight stream only reads; the gate+up kernel alone reads Mixtral's weights at up to 3.11 TB/s "
          "(`ch04_fused_gate_up.csv`, M = 8). A fraction of 1.00-1.04 means the kernel streams at the read "
          "bandwidth. See `docs/perf-notes.md` (issue 6) for each version's prediction and result.", "",
          "## The first performance bar (issue 4)", ""] + bar(rows) + [""] + \
        ["## Issue 6's targets", ""] + issue6(rows) + [""]
    for key in ("mixtral", "qwen3", "deepseek_v3"):
        for routing in ("uniform", "skewed"):
            md += table(rows, MODELS[key].name, routing)
    stage = load_rows("ch04_fused_gate_up")
    if stage:
        md += ["## The gate+up stage alone (chapter 4)", "",
               "`results/" + slug(device) + "/ch04_fused_gate_up.csv`: fused_gate_up against chapter 3's grouped GEMM "
               "for W1 and W3 + torch silu*mul, on a precomputed dispatch, uniform routing; the floor counts the "
               "stage's own bytes and FLOPs.", "",
               "| model | M | fused_gate_up | grouped_gemm x2 + silu*mul | grouped_gemm on w13 + silu*mul |",
               "|---|---|---|---|---|"]
        for r0 in sorted({(r["model"], r["M"]) for r in stage}, key=lambda t: (t[0], t[1])):
            hit = {r["impl"]: r for r in stage if (r["model"], r["M"]) == r0}
            cells = [f"{hit[i]['median_ms']:.3f} ({hit[i]['floor_fraction']:.2f})" if i in hit else "-"
                     for i in ("fused_gate_up", "ch03 grouped_gemm x2 + silu*mul", "ch03 grouped_gemm on w13 + silu*mul")]
            md.append(f"| {r0[0]} | {r0[1]} | " + " | ".join(cells) + " |")
        md.append("")
    out_md = ROOT / "docs" / "benchmark-summary.md"
    out_md.write_text("\n".join(md).rstrip() + "\n")
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    for col, key in enumerate(("mixtral", "qwen3", "deepseek_v3")):
        for r, routing in enumerate(("uniform", "skewed")):
            ax = plot_times(rows, "", model=MODELS[key].name, routing=routing, ax=axes[r, col])
            ax.set_title(f"{MODELS[key].name}, {routing} routing", fontsize=10)  # the run is in the suptitle
    fig.suptitle("MoE layer forward, bf16, CUDA graphs: " + summary_line(rows), fontsize=10)
    fig.tight_layout()
    png = RESULTS / slug(device) / "ch05_fused_moe.png"
    fig.savefig(png, dpi=110)
    print(f"wrote {out_md} and {png}")
    print("\n".join(bar(rows)))
    print("\n".join(issue6(rows)[:2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
