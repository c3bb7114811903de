"""Choose the grouped GEMM's launch configs on this GPU and write them as a table (chapter 3).

GPU only. Run from the repository root:  PYTHONPATH=. python benchmarks/tune_grouped_gemm.py [--quick]

For Mixtral-8x7B in bf16 and every M of ``shapes.BATCH_SIZES`` it times a short list of candidate configs on
the layer's two GEMM shapes (w1/w3: N=14336, K=4096 from the token activations; w2: N=4096, K=14336 from one
row per slot), keeps the config with the least ``2 * t(w1) + t(w2)`` (the three grouped GEMMs of the layer)
whose result matches a float64 reference, and writes
``triton_moe/tables/grouped_gemm.<vendor>.json`` keyed by ``num_slots = M * top_k`` (rows of the GEMM).
Every timing is logged to ``results/<device>/tune_grouped_gemm.csv``; both go under ``$OUT`` too when set.

Times: median of CUDA-graph replays of a call that runs 4 input sets (different tokens, so different
experts and rows), divided by 4.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from triton_moe import mode  # noqa: E402
from triton_moe.configs import KernelConfig, save_table  # noqa: E402
from triton_moe.kernels.dispatch import sorted_dispatch  # noqa: E402
from triton_moe.kernels.grouped_gemm import TABLES, grouped_gemm, grouped_gemm_reference  # noqa: E402
from triton_moe.reference import make_problem  # noqa: E402
from triton_moe.shapes import BATCH_SIZES, MODELS  # noqa: E402
from triton_moe.timing import bench_ms, results_path, run_metadata, slug  # noqa: E402

#               BLOCK_M BLOCK_N BLOCK_K GROUP_M warps stages
CANDIDATES = [(16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (16, 64, 256, 1, 4, 3), (16, 32, 128, 1, 4, 4),
              (32, 64, 128, 8, 4, 4), (32, 128, 128, 8, 4, 3),
              (64, 64, 128, 8, 4, 3), (64, 128, 64, 8, 4, 4), (64, 128, 128, 8, 8, 3),
              (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (128, 128, 64, 4, 4, 4)]
ROTATE = 4


def candidates(slots: int, experts: int) -> list[KernelConfig]:
    """Configs whose BLOCK_M is at most twice the rows an expert gets on average (at least 16). (Run 1 allowed
    only the average: at M=64, 16 rows per expert, that left out BLOCK_M=32, see docs/perf-notes.md.)"""
    per_expert = max(16, 2 * triton.next_power_of_2(max(1, slots // experts)))
    return [KernelConfig(bm, bn, bk, g, w, s) for bm, bn, bk, g, w, s in CANDIDATES if bm <= per_expert]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="M in 1, 64, 4096 only (and no table written)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new M values after this many seconds (the table then ends there)")
    a = ap.parse_args(argv)
    mode.require_gpu("Tuning")
    meta = run_metadata()
    shape = MODELS["mixtral"]
    E, k, H, F = shape.experts, shape.top_k, shape.hidden, shape.ffn
    base = make_problem(shape, 1, torch.bfloat16, "cuda", seed=7)
    w1, w2 = base.w1, base.w2
    sizes = (1, 64, 4096) if a.quick else BATCH_SIZES
    log, table = [], []
    t0, tuned_up_to = time.time(), None
    for M in sizes:
        if a.budget_s is not None and time.time() - t0 > a.budget_s:
            print(f"time budget of {a.budget_s:.0f} s spent: stopping before M={M}", flush=True)
            break
        tuned_up_to = M
        S = M * k
        sets = []
        for i in range(ROTATE):
            p = make_problem(shape.scaled(H, 16), M, torch.bfloat16, "cuda", seed=100 * M + i)
            h = torch.randn(S, F, device="cuda", generator=torch.Generator("cuda").manual_seed(i)).bfloat16()
            sets.append((p.x, p.topk_ids, h))
        x0, ids0, h0 = sets[0]
        ref1 = grouped_gemm_reference(x0, w1, ids0, k)
        ref2 = grouped_gemm_reference(h0, w2, ids0, 1)
        best = None
        for cfg in candidates(S, E):
            ds = [sorted_dispatch(ids, E, cfg.BLOCK_M) for _, ids, _ in sets]
            try:
                o1 = grouped_gemm(x0, w1, *ds[0], k, cfg)
                o2 = grouped_gemm(h0, w2, *ds[0], 1, cfg)
                err = max(float((o1.double() - ref1).norm() / ref1.norm()),
                          float((o2.double() - ref2).norm() / ref2.norm()))
                t1, m1 = bench_ms(lambda: [grouped_gemm(x, w1, *d, k, cfg) for (x, _, _), d in zip(sets, ds)], rep=20)
                t2, m2 = bench_ms(lambda: [grouped_gemm(h, w2, *d, 1, cfg) for (_, _, h), d in zip(sets, ds)], rep=20)
                t1, t2 = t1 / ROTATE, t2 / ROTATE
            except Exception as exc:  # a config that does not compile or run here (e.g. shared memory)
                print(f"M={M:5d} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            score = 2 * t1 + t2
            ok = err < 2e-2
            log.append({"M": M, "num_slots": S, **{f: getattr(cfg, f) for f in
                        ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")},
                        "w1_ms": round(t1, 5), "w2_ms": round(t2, 5), "layer_gemms_ms": round(score, 5),
                        "rel_err": f"{err:.2e}", "method": m1, "device": meta["device"], "date": meta["date"],
                        "torch": meta["torch"], "triton": meta["triton"]})
            print(f"M={M:5d} BM={cfg.BLOCK_M:3d} BN={cfg.BLOCK_N:3d} BK={cfg.BLOCK_K:3d} G={cfg.GROUP_M} "
                  f"w={cfg.num_warps} s={cfg.num_stages}: w1 {t1 * 1e3:8.1f} us  w2 {t2 * 1e3:8.1f} us  "
                  f"2*w1+w2 {score * 1e3:8.1f} us  err {err:.1e}{'' if ok else '  WRONG'}", flush=True)
            if ok and (best is None or score < best[0]):
                best = (score, cfg)
        if best:
            print(f"M={M:5d}: best {best[1]} ({best[0] * 1e3:.1f} us)", flush=True)
            if table and table[-1][1] == best[1]:
                table[-1] = (S, best[1])         # extend the previous row
            else:
                table.append((S, best[1]))
        del sets
        torch.cuda.empty_cache()
    log_path = results_path("tune_grouped_gemm")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(log[0]))
        w.writeheader()
        w.writerows(log)
    print(f"wrote {log_path}")
    out = os.environ.get("OUT")
    if out:
        shutil.copy(log_path, Path(out) / log_path.name)
    if a.quick or not table:
        return 0
    table[-1] = (1 << 31, table[-1][1])          # the last row serves everything larger
    vendor = mode.info().vendor
    path = TABLES / f"grouped_gemm.{vendor}.json"
    save_table(table, path, {"device": meta["device"], "date": meta["date"], "torch": meta["torch"],
                             "triton": meta["triton"], "runtime": meta["runtime"],
                             "source": "benchmarks/tune_grouped_gemm.py",
                             "key": "max_M = num_slots = tokens * top_k",
                             "objective": "min 2*t(w1: N=14336,K=4096) + t(w2: N=4096,K=14336), Mixtral-8x7B bf16",
                             "tuned_M": f"{sizes[0]}..{tuned_up_to}",
                             "log": f"results/{slug(meta['device'])}/tune_grouped_gemm.csv"})
    print(f"wrote {path}")
    if out:
        shutil.copy(path, Path(out) / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
