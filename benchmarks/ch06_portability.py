"""Chapter 6 timing: the same ``tiled_matmul`` source with this vendor's config table, against the vendor's own
GEMM library through ``torch.matmul`` (cuBLAS on NVIDIA, hipBLASLt / rocBLAS on AMD).

GPU only (NVIDIA or AMD). Run from the repository root:

    PYTHONPATH=. python benchmarks/ch06_portability.py [--quick]          # timings
    PYTHONPATH=. python benchmarks/ch06_portability.py --tune [--tune-M 1,16,256,4096]   # first choose a table

Writes ``results/<device>/ch06_tiled_matmul.csv`` (the course's results format: device, versions, ceilings
measured in the same run, floor per row) and, with ``--tune``, ``triton_moe/tables/tiled_matmul.<device>.json``
(the first table ``triton_moe.vendor`` looks for on this GPU) plus ``results/<device>/tune_tiled_matmul.csv``
with every candidate's time. Copies go under ``$OUT`` when that variable is set.

Problem: one expert's gate projection of Mixtral-8x7B, ``x[M, 4096] @ w1[e].T`` with ``w1[e]: [14336, 4096]``,
bf16, M in ``shapes.BATCH_SIZES``. Floor of a row: max(bytes moved / copy bandwidth, FLOPs / bf16 matmul rate),
both measured in the same run; bytes = weights + input + output once.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from triton_moe import mode, vendor  # noqa: E402
from triton_moe.configs import KernelConfig, save_table  # noqa: E402
from triton_moe.kernels.portability_demo import KERNEL, tiled_matmul  # noqa: E402
from triton_moe.shapes import BATCH_SIZES, MODELS  # noqa: E402
from triton_moe.timing import bench_ms, measure_ceilings, results_path, run_metadata, slug, write_rows  # noqa: E402

N, K = MODELS["mixtral"].ffn, MODELS["mixtral"].hidden
QUICK = (1, 16, 256, 4096)

# Candidates for --tune: the vendor table's own rows plus a short list that compiles without spills or
# overflow on the vendor's targets (docs/compile-report.md); AMD's carry its compiler options.
NVIDIA_CANDIDATES = [KernelConfig(bm, bn, bk, 8, w, s) for bm, bn, bk, w, s in (
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (64, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3))]
AMD_CANDIDATES = [KernelConfig(bm, bn, bk, 8, w, 2, extra) for bm, bn, bk, w in (
    (16, 64, 128, 4), (16, 128, 128, 4), (32, 64, 64, 4), (64, 64, 64, 4), (64, 128, 64, 4), (128, 128, 64, 4),
    (128, 128, 64, 8), (128, 256, 64, 8)) for extra in ({}, {"matrix_instr_nonkdim": 16, "kpack": 2},
                                                          {"waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2})]


def floor_ms(M: int, ceilings: dict) -> float:
    moved = 2 * (N * K + M * K + M * N)
    return 1e3 * max(moved / (ceilings["copy_GBps"] * 1e9), 2 * M * N * K / (ceilings["matmul_TFLOPs"] * 1e12))


def row(meta, ceilings, M, impl, ms, method) -> dict:
    fl = floor_ms(M, ceilings)
    return {**meta, "dtype": "bfloat16", "model": "Mixtral-8x7B w1, one expert", "hidden": K, "ffn": N,
            "experts": 1, "top_k": 1, "routing": "dense", "M": M, "impl": impl, "median_ms": round(ms, 5),
            "floor_ms": round(fl, 5), "floor_fraction": round(fl / ms, 4),
            "copy_GBps": round(ceilings["copy_GBps"], 1), "matmul_TFLOPs": round(ceilings["matmul_TFLOPs"], 1),
            "method": method, "active_experts": 1}


def rel_err(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def tune(sizes, meta, out_dir: Path | None) -> Path:
    v = vendor.detect_vendor()
    cands = AMD_CANDIDATES if v == "amd" else NVIDIA_CANDIDATES
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    log, best = [], {}
    for M in sizes:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = a.double() @ w.double().T
        for c in cands:
            if c.BLOCK_M > 2 * max(16, M):  # tiles much taller than the batch only waste work
                continue
            try:
                err = rel_err(tiled_matmul(a, w, c), ref)
                ms = bench_ms(lambda: tiled_matmul(a, w, c), graph=True, rep=30)[0] if err < 2e-2 else float("nan")
            except Exception as exc:  # noqa: BLE001 - a config that does not launch here is skipped
                print(f"M={M} {c}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            log.append({"M": M, **{k: v2 for k, v2 in c.meta().items()}, "ms": ms, "rel_err": err})
            if ms == ms and (M not in best or ms < best[M][0]):
                best[M] = (ms, c)
        print(f"M={M:5d}: best {best[M][1]} {best[M][0]:.4f} ms", flush=True)
    table = [(M, best[M][1]) for M in sorted(best)]
    table[-1] = (1 << 30, table[-1][1])
    path = vendor.TABLES / f"{KERNEL}.{slug(meta['device'])}.json"
    save_table(table, path, {"kernel": KERNEL, "vendor": v, "device": meta["device"],
                             "target": vendor.current_target(), "date": meta["date"],
                             "torch": meta["torch"], "triton": meta["triton"], "runtime": meta["runtime"],
                             "source": "benchmarks/ch06_portability.py --tune: fastest correct candidate per M "
                                       "(median of CUDA-graph replays)"})
    log_path = results_path("tune_tiled_matmul")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=sorted({k for r in log for k in r}))
        wr.writeheader()
        wr.writerows(log)
    for p in (path, log_path):
        print(f"wrote {p}")
        if out_dir:
            shutil.copy(p, out_dir / p.name)
    vendor.clear_cache()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK}")
    ap.add_argument("--tune", action="store_true", help="choose a config table for this GPU first")
    ap.add_argument("--tune-M", default=",".join(map(str, QUICK)),
                    help="batch sizes to tune at (each row of the table serves every M up to its own)")
    a = ap.parse_args(argv)
    mode.require_gpu("This benchmark")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    meta = run_metadata()
    sizes = QUICK if a.quick else BATCH_SIZES
    if a.tune:
        tune([int(m) for m in a.tune_M.split(",")], meta, out_dir)
    ceilings = measure_ceilings()
    table = vendor.load_vendor_table(KERNEL)
    print(f"{meta['device']} ({vendor.detect_vendor()}): copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul "
          f"{ceilings['matmul_TFLOPs']:.0f} TFLOP/s; table {table.source}", flush=True)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    impl = f"triton tiled_matmul ({table.source})"
    rows = []
    for M in sizes:
        a_ = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = a_.double() @ w.double().T
        line = []
        for name, fn in ((impl, lambda: tiled_matmul(a_, w)), ("torch.matmul", lambda: a_ @ w.T)):
            err = rel_err(fn(), ref)
            if err > 2e-2:
                print(f"M={M}: {name} is WRONG (relative error {err:.2e}); not timed", flush=True)
                continue
            ms, method = bench_ms(fn, graph=True)
            rows.append(row(meta, ceilings, M, name, ms, method))
            line.append(f"{name.split(' (')[0]} {ms:8.4f} ms ({rows[-1]['floor_fraction']:.2f} of floor)")
        print(f"M={M:5d} floor {floor_ms(M, ceilings):.4f} ms | " + " | ".join(line), flush=True)
    path = write_rows(rows, results_path("ch06_tiled_matmul"))
    print(f"wrote {path}")
    if out_dir:
        shutil.copy(path, out_dir / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
