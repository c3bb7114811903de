"""Chapter 3 timing: the MoE layer (routing given) from grouped GEMMs, against chapter 1's loop and
``torch._grouped_mm``, each as a fraction of the floor measured in the same run.

GPU only. Run from the repository root:  PYTHONPATH=. python benchmarks/ch03_grouped_gemm.py [--quick]
Writes results/<device>/ch03_grouped_gemm.csv (and a copy under $OUT when that variable is set).

Mixtral-8x7B, bf16, uniform routing, M in shapes.BATCH_SIZES. All three compute the same thing from
(x, topk_weights, topk_ids): gate, up, SwiGLU, down, weighted combine.

- ``ch01 loop``: chapter 1's per-expert PyTorch loop (host synchronisation: no CUDA graph, ``do_bench``);
- ``torch._grouped_mm``: stable argsort of the slots, gather, ``torch._grouped_mm`` for w1, w3 and w2 (separate,
  like ours), SwiGLU, weighting and ``index_add_`` (if this PyTorch has no ``_grouped_mm``, no row is written
  and the log says so);
- ``triton grouped_gemm (ch03)``: ``moe_forward_grouped`` (chapter 2's dispatch + three grouped_gemm launches,
  torch SwiGLU and combine), configs from the committed table.

Each time is the median of CUDA-graph replays of a call that runs 4 input sets (different tokens, so
different experts), divided by 4 (the loop: one set, do_bench).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from triton_moe import mode  # noqa: E402
from triton_moe.kernels.grouped_gemm import moe_forward_grouped  # noqa: E402
from triton_moe.reference import make_problem, moe_reference  # noqa: E402
from triton_moe.shapes import BATCH_SIZES, MODELS  # noqa: E402
from triton_moe.baselines import grouped_mm_experts, moe_forward_loop  # noqa: E402
from triton_moe.timing import bench_ms, make_row, results_path, start_run, write_rows  # noqa: E402

ROTATE = 4


loop_forward = moe_forward_loop  # chapter 1's solution


grouped_mm_forward = grouped_mm_experts  # PyTorch's grouped GEMM, separate gate and up GEMMs (like ours)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M in 1, 16, 256, 4096")
    a = ap.parse_args(argv)
    mode.require_gpu("This benchmark")
    meta, ceilings = start_run()
    shape = MODELS["mixtral"]
    dtype = torch.bfloat16
    base = make_problem(shape, 1, dtype, "cuda", seed=1234)
    w1, w3, w2 = base.w1, base.w3, base.w2
    has_gmm = hasattr(torch, "_grouped_mm")
    if not has_gmm:
        print(f"torch {torch.__version__} has no torch._grouped_mm: that baseline is not measured")
    w1t, w3t, w2t = w1.transpose(1, 2), w3.transpose(1, 2), w2.transpose(1, 2)
    rows = []
    sizes = (1, 16, 256, 4096) if a.quick else BATCH_SIZES
    for M in sizes:
        sets = []
        for i in range(ROTATE):
            p = make_problem(shape.scaled(shape.hidden, 16), M, dtype, "cuda", seed=1000 * M + i)
            sets.append((p.x, p.topk_weights, p.topk_ids))
        x, tw, ti = sets[0]
        ref = moe_reference(x, tw, ti, w1, w3, w2)
        fns = {"ch01 loop": (lambda: loop_forward(x, tw, ti, w1, w3, w2), 1, False),
               "triton grouped_gemm (ch03)": (lambda: [moe_forward_grouped(*s, w1, w3, w2) for s in sets], ROTATE, True)}
        if has_gmm:
            fns["torch._grouped_mm"] = (lambda: [grouped_mm_forward(*s, w1t, w3t, w2t) for s in sets], ROTATE, True)
        line = []
        for impl, (fn, n, graph) in fns.items():
            one = fn()
            got = one if isinstance(one, torch.Tensor) else one[0]
            err = float((got.double() - ref).norm() / ref.norm())
            if err > 2e-2:
                print(f"M={M}: {impl} is WRONG (relative error {err:.2e}); not timed", flush=True)
                continue
            ms, method = bench_ms(fn, graph=graph, rep=50)
            ms /= n
            method = f"{method}, {n} input set{'s' if n > 1 else ''} per call"
            rows.append(make_row(meta, ceilings, shape, M, impl, ms, method, dtype, "uniform"))
            line.append(f"{impl.split(' (')[0]} {ms:7.3f} ms ({rows[-1]['floor_fraction']:.2f} of floor, err {err:.0e})")
        print(f"M={M:5d} floor {rows[-1]['floor_ms']:.3f} ms | " + " | ".join(line), flush=True)
        del sets
        torch.cuda.empty_cache()
    write_rows(rows, results_path("ch03_grouped_gemm"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
