"""Choose the routers' launch configs (tokens per program, warps) on this GPU and write them as a table.

GPU only. Run from the repository root:  PYTHONPATH=. python benchmarks/tune_routing.py

For each router of the course (topk_softmax at Mixtral's 8 and Qwen3's 128 experts, the DeepSeek-V3 router at
256) it times every (BLOCK_T, num_warps) candidate at M = 1, 64 and 4096 and keeps the one whose worst ratio to
the best time at each M is smallest. Writes ``triton_moe/tables/routing.<vendor>.json`` and logs every timing
to ``results/<device>/tune_routing.csv`` (copies under ``$OUT`` when set).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from triton_moe import mode  # noqa: E402
from triton_moe.kernels import routing  # noqa: E402
from triton_moe.timing import bench_ms, results_path, run_metadata, slug  # noqa: E402

ROUTERS = [("topk_softmax", 8, 2), ("topk_softmax", 128, 8), ("deepseek_v3_route", 256, 8)]
SIZES = (1, 64, 4096)


def candidates(kernel: str, E: int) -> list[tuple[int, int]]:
    """(BLOCK_T, num_warps) pairs: tiles of 32 to 8192 scores. The DeepSeek-V3 router unrolls ~20 reductions
    and compiles slowly (twice: M=1 is specialised), so it gets a short list around one token per warp."""
    if kernel == "deepseek_v3_route":
        return [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (16, 4)]
    return [(bt, w) for bt in (1, 4, 16, 64) for w in (1, 2, 4)
            if 32 * w <= bt * routing.next_pow2(E) <= 8192]


def write(table, log, meta):
    vendor = mode.info().vendor
    path = routing.TABLES / f"routing.{vendor}.json"
    path.write_text(json.dumps({"meta": {**{k: meta[k] for k in ("device", "date", "torch", "triton", "runtime")},
                                         "source": "benchmarks/tune_routing.py",
                                         "objective": "least worst ratio to the per-M best at M = 1, 64, 4096",
                                         "log": f"results/{slug(meta['device'])}/tune_routing.csv"},
                                "table": table}, indent=1) + "\n")
    log_path = results_path("tune_routing")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(log[0]))
        wr.writeheader()
        wr.writerows(log)
    if os.environ.get("OUT"):
        for p in (path, log_path):
            shutil.copy(p, Path(os.environ["OUT"]) / p.name)
    return path, log_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default="topk_softmax,deepseek_v3_route", help="kernels to tune")
    a = ap.parse_args(argv)
    mode.require_gpu("Tuning")
    meta = run_metadata()
    gen = torch.Generator(device="cuda").manual_seed(0)
    log, table = [], {}
    for kernel, E, k in ROUTERS:
        if kernel not in a.routers.split(","):
            continue
        bias = torch.randn(E, generator=gen, device="cuda") * 0.3
        cands = candidates(kernel, E)
        times = {}
        for M in SIZES:
            logits = torch.randn(M, E, generator=gen, device="cuda")
            if kernel == "deepseek_v3_route":
                ref = routing.deepseek_v3_route_reference(logits, bias, k, 8, 4, 2.5)[1]
                call = lambda: routing.deepseek_v3_route(logits, bias, k, 8, 4, 2.5)  # noqa: E731
            else:
                ref = routing.topk_softmax_reference(logits, k)[1]
                call = lambda: routing.topk_softmax(logits, k)  # noqa: E731
            for bt, w in cands:
                routing.launch_config = lambda name, e, _c=(bt, w): _c   # force the candidate
                ok = bool((call()[1].long() != ref).any(dim=1).float().mean() < 0.01)  # fp32 vs fp64 near-ties
                ms, method = bench_ms(call, rep=30)
                times[(bt, w, M)] = ms if ok else float("inf")
                log.append({"kernel": kernel, "E": E, "top_k": k, "M": M, "BLOCK_T": bt, "num_warps": w,
                            "us": round(ms * 1e3, 3), "correct": ok, "method": method, "device": meta["device"],
                            "date": meta["date"], "torch": meta["torch"], "triton": meta["triton"]})
        best = {M: min(times[(bt, w, M)] for bt, w in cands) for M in SIZES}
        score = {(bt, w): max(times[(bt, w, M)] / best[M] for M in SIZES) for bt, w in cands}
        bt, w = min(score, key=score.get)
        print(f"{kernel} E={E}: best BLOCK_T={bt} num_warps={w} (worst ratio to per-M best {score[(bt, w)]:.2f}); "
              + ", ".join(f"M={M}: {times[(bt, w, M)] * 1e3:.1f} us (v1 default "
                          f"{times.get((routing.tokens_per_program(E), 4, M), float('nan')) * 1e3:.1f} us)"
                          for M in SIZES), flush=True)
        table.setdefault(kernel, []).append({"max_E": E, "BLOCK_T": bt, "num_warps": w})
        path, log_path = write(table, log, meta)          # after each router: a timeout keeps what is done
        print(f"wrote {path} and {log_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
