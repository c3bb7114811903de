"""Chapter 1 timing: the per-expert looped MoE forward (PyTorch) against the roofline floor.

GPU only. Run from the repository root:  python benchmarks/ch01_naive_loop.py [--models mixtral] [--quick]
Writes results/<device>/ch01_naive_loop.csv (and a copy under $OUT when that variable is set).

The floor is measured in the same run: max(weight bytes / copy bandwidth, FLOPs / bf16 matmul rate).
The loop is timed with CUDA graphs where it can be captured: it cannot (torch.nonzero synchronises with
the host to size its output), so it falls back to do_bench and the 'method' column says so.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from triton_moe import mode  # noqa: E402
from triton_moe.baselines import moe_forward_loop  # noqa: E402  (chapter 1's solution)
from triton_moe.reference import make_problem  # noqa: E402
from triton_moe.shapes import BATCH_SIZES, MODELS  # noqa: E402
from triton_moe.timing import bench_ms, make_row, results_path, start_run, write_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mixtral", help="comma-separated keys of shapes.MODELS")
    ap.add_argument("--quick", action="store_true", help="fewer M values")
    a = ap.parse_args()
    mode.require_gpu("This benchmark")
    meta, ceilings = start_run()
    rows = []
    sizes = (1, 16, 256, 4096) if a.quick else BATCH_SIZES
    for key in a.models.split(","):
        shape = MODELS[key]
        p = make_problem(shape, max(sizes), torch.bfloat16, "cuda", seed=0)
        for M in sizes:
            args = (p.x[:M], p.topk_weights[:M], p.topk_ids[:M], p.w1, p.w3, p.w2)
            ms, method = bench_ms(lambda: moe_forward_loop(*args), graph=False)
            active = int(p.topk_ids[:M].unique().numel())
            row = make_row(meta, ceilings, shape, M, "ch01 loop (torch)", ms, method, torch.bfloat16, "uniform", active)
            rows.append(row)
            print(f"{shape.name:22s} M={M:5d} {ms:8.3f} ms  floor {row['floor_ms']:.3f} ms  "
                  f"floor/time {row['floor_fraction']:.2f}")
        del p
        torch.cuda.empty_cache()
    write_rows(rows, results_path("ch01_naive_loop"))


if __name__ == "__main__":
    main()
