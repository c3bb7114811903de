"""Chapter 2 timing: the sorted dispatch (and the fused routers) against plain PyTorch versions.

GPU only. Run from the repository root:  PYTHONPATH=. python benchmarks/ch02_dispatch.py [--quick]
Writes results/<device>/ch02_dispatch.csv (and a copy under $OUT when that variable is set).

Shapes: Mixtral-8x7B (8 experts, top-2) and DeepSeek-V3 (256 experts, top-8), M in shapes.BATCH_SIZES.
BLOCK_M is the grouped GEMM table's choice for M * top_k rows (Mixtral) and 16 for DeepSeek-V3 (few rows per
expert). Implementations:

- ``triton sorted_dispatch (ch02)``: the four kernels of chapter 2;
- ``torch argsort+bincount``: the same contract in PyTorch (``dispatch.sorted_dispatch_torch``);
- ``triton router (ch02)`` / ``torch router``: Mixtral's softmax top-2, DeepSeek-V3's grouped router, from
  float32 logits.

Each time is the median of CUDA-graph replays (``timing.bench_ms``; ``method`` says when a function could not
be captured). ``floor_ms`` is the floor of the WHOLE MoE layer measured in the same run: dispatch and routing
are overhead on top of it, so ``median_ms / floor_ms`` is the share of the layer's minimum time they take.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from triton_moe import mode  # noqa: E402
from triton_moe.kernels.dispatch import sorted_dispatch, sorted_dispatch_torch  # noqa: E402
from triton_moe.kernels.grouped_gemm import pick_config  # noqa: E402
from triton_moe.kernels.routing import (deepseek_v3_route, deepseek_v3_route_reference, topk_softmax,  # noqa: E402
                                        topk_softmax_reference)
from triton_moe.reference import sorted_dispatch_reference  # noqa: E402
from triton_moe.shapes import BATCH_SIZES, MODELS  # noqa: E402
from triton_moe.timing import bench_ms, make_row, results_path, start_run, write_rows  # noqa: E402


def torch_router(logits, bias, k, deepseek):
    if not deepseek:
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids
    M, E = logits.shape
    s = torch.sigmoid(logits)
    choice = s + bias
    gs = choice.view(M, 8, -1).topk(2, dim=-1).values.sum(-1)
    gidx = gs.topk(4, dim=-1).indices
    mask = torch.zeros_like(gs).scatter_(1, gidx, 1.0).repeat_interleave(E // 8, dim=1)
    ids = choice.masked_fill(mask == 0, float("-inf")).topk(k, dim=-1).indices
    w = s.gather(1, ids)
    return w / w.sum(dim=-1, keepdim=True) * 2.5, ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M in 1, 64, 4096")
    a = ap.parse_args(argv)
    mode.require_gpu("This benchmark")
    meta, ceilings = start_run()
    rows = []
    sizes = (1, 64, 4096) if a.quick else BATCH_SIZES
    gen = torch.Generator(device="cuda").manual_seed(0)
    for key in ("mixtral", "deepseek_v3"):
        shape = MODELS[key]
        E, k = shape.experts, shape.top_k
        deepseek = key == "deepseek_v3"
        bias = torch.randn(E, generator=gen, device="cuda") * 0.3
        for M in sizes:
            bm = 16 if deepseek else pick_config(M * k).BLOCK_M
            logits = torch.randn(M, E, generator=gen, device="cuda")
            if deepseek:
                w, ids = deepseek_v3_route(logits, bias, k, 8, 4, 2.5)
                rw, rids = deepseek_v3_route_reference(logits, bias, k, 8, 4, 2.5)
            else:
                w, ids = topk_softmax(logits, k)
                rw, rids = topk_softmax_reference(logits, k)
            assert torch.equal(ids.long(), rids), "router disagrees with its reference"
            ref = sorted_dispatch_reference(ids, E, bm)
            for fn in (sorted_dispatch, sorted_dispatch_torch):
                assert all(torch.equal(g, r) for g, r in zip(fn(ids, E, bm), ref)), fn.__name__
            fns = {
                "triton sorted_dispatch (ch02)": lambda: sorted_dispatch(ids, E, bm),
                "torch argsort+bincount": lambda: sorted_dispatch_torch(ids, E, bm),
                "triton router (ch02)": (lambda: deepseek_v3_route(logits, bias, k, 8, 4, 2.5)) if deepseek
                else (lambda: topk_softmax(logits, k)),
                "torch router": lambda: torch_router(logits, bias, k, deepseek),
            }
            line = []
            for impl, fn in fns.items():
                ms, method = bench_ms(fn, graph=True, rep=50)
                row = make_row(meta, ceilings, shape, M, impl, ms, f"{method}, BLOCK_M={bm}", torch.bfloat16,
                               "uniform")
                rows.append(row)
                line.append(f"{impl.split(' (')[0]} {ms * 1e3:7.1f} us ({method})")
            print(f"{shape.name:22s} M={M:5d} BLOCK_M={bm:3d} | " + " | ".join(line), flush=True)
    write_rows(rows, results_path("ch02_dispatch"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
