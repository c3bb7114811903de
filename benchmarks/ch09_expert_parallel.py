"""Chapter 9 timings: expert parallelism (``triton_moe.parallel.ExpertParallelMoE``) for one DeepSeek-V3 routed
layer (hidden 7168, ffn 2048, 256 experts, top-8, bf16), time split into the exchange and the experts.

GPU only, NCCL. From the repository root (``. scripts/gpu_env.sh`` first on the GPU machine):

    python benchmarks/ch09_expert_parallel.py [--quick]                   # one GPU: world size 1
    torchrun --nproc-per-node 8 benchmarks/ch09_expert_parallel.py --worlds 2,4,8 [--quick]
    python benchmarks/ch09_expert_parallel.py --smoke                     # CPU: the logic only (gloo, tiny)

With ``--worlds 2,4,8`` one 8-process launch measures the first 2, the first 4 and all 8 GPUs in turn (a
process group per size; the others wait). For each world size W, routing (uniform, skewed) and M tokens per
rank (``--M``, default 1, 8, 64, 512, 4096), every rank routes its own tokens (softmax top-8 on its own router
logits) and the phases are timed apart with CUDA events, eagerly (the exact-size dispatch synchronises with the
host, so no CUDA graph), after a barrier, ``--reps`` times: median per rank, then the **slowest rank** (a layer
waits for it). Rows (``impl``):

- ``EP W=w dispatch``: plan + counts all-to-all + the host synchronisation + token all-to-all;
- ``EP W=w experts``: ``fused_experts`` on the received rows (this rank's 256 / W experts);
- ``EP W=w return``: the reverse all-to-all; ``EP W=w combine``: the weighted sum (local);
- ``EP W=w exchange``: dispatch + return per iteration; ``EP W=w forward``: all four;
- ``EP W=w capacity forward`` (and its phases): the static-capacity variant, ``C = M * min(8, E_local)`` rows per
  rank pair (the worst case: nothing dropped; no host synchronisation), so it moves W * C rows per rank;
- ``single GPU fused_experts (W*M tokens)``: the single-GPU layer on the same W * M tokens, all 256 experts of
  the layer on GPU 0 (timed with CUDA graphs, ``timing.bench_ms``). One layer's routed experts are 22.5 GB in
  bf16 and fit one H200; the whole model's (58 layers, 1.3 TB) would not: that is why one layer is measured.

``M`` is tokens per rank. Floors (same run): experts rows from the slowest rank's active experts and rows
(weights / copy bandwidth, FLOPs / bf16 matmul rate); exchange rows from the bytes the busiest rank sends to
other ranks / the all-to-all bandwidth measured in the same run (``results/<device>/ch09_link_w<W>.csv``: an
equal-split ``all_to_all_single`` of 512 MB per rank); at W = 1 nothing leaves the GPU and the exchange floor
is the local copy of the rows at copy bandwidth. Results: ``results/<device>/ch09_expert_parallel_w<W>.csv``
(copied to ``$OUT``), and each point is checked against the single-GPU layer (relative error printed, and in
``ch09_check_w<W>.json``).

NVLink multicast (NVLS) stays off: ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and
``NVSHMEM_DISABLE_NVLS=1`` are set below before torch is imported.
"""
from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"                 # NVLink multicast off (the device README says why)
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from triton_moe import mode  # noqa: E402
from triton_moe.checking import relative_error  # noqa: E402
from triton_moe.kernels.fused_moe import fused_experts, route  # noqa: E402
from triton_moe.parallel import ExpertParallelMoE, combine  # noqa: E402
from triton_moe.reference import _routing_bias  # noqa: E402
from triton_moe.shapes import DEEPSEEK_V3  # noqa: E402
from triton_moe.timing import bench_ms, make_row, results_path, run_metadata, start_run, write_rows  # noqa: E402

SHAPE = DEEPSEEK_V3
DTYPE = torch.bfloat16
DEV = "cuda"
PHASES = ("dispatch", "experts", "return", "combine")
SMOKE = False   # --smoke: a CPU dry run of this script's logic (gloo, tiny shape, fp32); writes nothing


class Timer:
    """CUDA events on a GPU; wall clock in the CPU smoke run."""

    def __init__(self):
        self.marks = []

    def mark(self):
        if SMOKE:
            self.marks.append(time.perf_counter())
        else:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)

    def intervals_ms(self):
        if SMOKE:
            return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def init() -> tuple[int, int]:
    """torchrun's environment, or one process (world size 1) on GPU 0."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    wait = datetime.timedelta(minutes=30)   # ranks outside a smaller world wait at a barrier meanwhile
    if SMOKE:
        dist.init_process_group("gloo", timeout=wait)
        return rank, world
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()), timeout=wait)
    return rank, world


def full_weights():
    """One layer's 256 routed experts and the router, identical on every rank (same seed, same generator)."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    E, H, F = SHAPE.experts, SHAPE.hidden, SHAPE.ffn
    rnd = lambda *s, scale: (torch.randn(*s, generator=gen, device=DEV, dtype=DTYPE) * scale)  # noqa: E731
    return rnd(E, F, H, scale=H ** -0.5), rnd(E, F, H, scale=H ** -0.5), rnd(E, H, F, scale=F ** -0.5), \
        rnd(E, H, scale=H ** -0.5)


def inputs(router, M, routing, rank, seed):
    """This rank's tokens and their softmax top-8 routing (own seed per rank)."""
    gen = torch.Generator(device=DEV).manual_seed(seed * 1009 + rank)
    x = torch.randn(M, SHAPE.hidden, generator=gen, device=DEV, dtype=DTYPE)
    bias = _routing_bias(routing, SHAPE.experts, torch.Generator().manual_seed(seed)).to(DEV)
    logits = (x.float() @ router.float().T + bias).float()
    w, ids = route(logits, SHAPE.top_k, True)
    return x, w, ids


def time_phases(ep, x, w, ids, group, reps, warmup):
    """Per-iteration times (ms) of each phase on this rank. Returns the medians, the last output, the real rows
    received, the local experts that got any, and the rows that left this rank."""
    got = {p: [] for p in PHASES + ("exchange", "forward")}
    out = None
    for i in range(warmup + reps):
        dist.barrier(group=group)
        sync()
        tm = Timer()
        tm.mark()
        ex = ep.dispatch(x, ids)
        tm.mark()
        y = ep.experts(ex)
        tm.mark()
        back = ep.send_back(ex, y)
        tm.mark()
        out = combine(back, ex.order, w)
        tm.mark()
        t = tm.intervals_ms()
        if i >= warmup:
            for p, v in zip(PHASES, t):
                got[p].append(v)
            got["exchange"].append(t[0] + t[2])
            got["forward"].append(sum(t))
    real = ex.recv_ids[ex.recv_ids >= 0]       # capacity mode: padding rows carry -1 (no compute)
    rows, active = int(real.numel()), int(torch.unique(real).numel())
    if ex.send_splits is not None:
        sent_out = ex.order.numel() - ex.send_splits[ep.rank]
    else:                                      # capacity: every pair moves C rows, padding included
        sent_out = (ep.world_size - 1) * ep.capacity
    return {p: statistics.median(v) for p, v in got.items()}, out, rows, active, sent_out


def slowest(values: dict, group) -> dict:
    """Max over the group's ranks of each value (a layer is as slow as its slowest rank)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=DEV, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(keys, t.tolist()))


def measure_link(group, W, nbytes=512 << 20, reps=20):
    """Equal-split all_to_all_single of ``nbytes`` per rank: GB/s leaving one GPU ((W-1)/W of the buffer)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        dist.barrier(group=group)
        sync()
        tm = Timer()
        tm.mark()
        dist.all_to_all_single(dst, src, group=group)
        tm.mark()
        if i >= 3:
            times.append(tm.intervals_ms()[0])
    ms = slowest({"ms": statistics.median(times)}, group)["ms"]
    out_bytes = nbytes * (W - 1) / W
    return {"ms": ms, "bytes_per_rank": nbytes, "GBps_out_per_gpu": out_bytes / (ms * 1e-3) / 1e9 if W > 1 else 0.0}


def gather(t, W, group):
    """Every rank's tensor, concatenated in rank order (all ranks get it)."""
    if W == 1:
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(W)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def wall_ms(fn, reps=3):
    fn()
    t = []
    for _ in range(reps):
        a = time.perf_counter()
        fn()
        t.append((time.perf_counter() - a) * 1e3)
    return statistics.median(t), "wall clock (CPU smoke run)"


def floor_experts(rows, active, ceilings):
    wb = active * SHAPE.weight_bytes_per_expert(2) + 2 * rows * SHAPE.hidden * 2
    return 1e3 * max(wb / (ceilings["copy_GBps"] * 1e9),
                     2.0 * rows * 3 * SHAPE.hidden * SHAPE.ffn / (ceilings["matmul_TFLOPs"] * 1e12))


def run_world(W, rank, full, args, meta, ceilings):
    """Every process calls this (new_group is collective); ranks >= W only wait. Returns rank 0's rows."""
    group = dist.new_group(list(range(W)))
    rows, checks = [], []
    if rank >= W:
        dist.barrier()
        return rows, checks, None
    w1, w3, w2, router = full
    E_local = SHAPE.experts // W
    ep = ExpertParallelMoE.shard(w1, w3, w2, group=group)
    link = measure_link(group, W, nbytes=(1 << 20) if SMOKE else 512 << 20) if W > 1 else None
    if rank == 0 and link:
        print(f"W={W}: all_to_all {link['bytes_per_rank'] >> 20} MB per rank: {link['ms']:.3f} ms, "
              f"{link['GBps_out_per_gpu']:.0f} GB/s out per GPU", flush=True)
    for routing in args.routings:
        for M in args.M:
            x, w, ids = inputs(router, M, routing, rank, seed=M)
            results = {}
            for variant, cap in (("", None), ("capacity ", M * min(SHAPE.top_k, E_local))):
                ep.capacity = cap
                med, out, nrows, active, sent = time_phases(ep, x, w, ids, group, args.reps, args.warmup)
                results[variant] = (slowest({**med, "rows": nrows, "active": active, "sent": sent}, group), out)
            ep.capacity = None
            # the single-GPU layer on all W * M tokens, on rank 0; the EP result checked against it
            xs, ws, idss, outs = (gather(t, W, group) for t in (x, w, ids, results[""][1]))
            if rank == 0:
                single = lambda: fused_experts(xs, ws, idss, w1, w3, w2)  # noqa: E731
                err = relative_error(outs, single())
                err_cap = relative_error(results["capacity "][1], single()[:M])
                ms1, method1 = bench_ms(single, graph=True, rep=50) if not SMOKE else wall_ms(single)
                checks.append({"W": W, "M": M, "routing": routing, "rel_err_vs_single_gpu": err,
                               "rel_err_capacity_rank0": err_cap})
                print(f"W={W} {routing:7s} M/rank={M:5d}: forward {results[''][0]['forward']:.3f} ms "
                      f"(exchange {results[''][0]['exchange']:.3f}, experts {results[''][0]['experts']:.3f}), "
                      f"capacity {results['capacity '][0]['forward']:.3f} ms; single GPU ({W * M} tokens) "
                      f"{ms1:.3f} ms; rel err vs single GPU {err:.2e} (capacity {err_cap:.2e})", flush=True)
                for variant, (s, _) in results.items():
                    ef = floor_experts(s["rows"], s["active"], ceilings)
                    if W > 1:
                        xf = 1e3 * 2 * s["sent"] * SHAPE.hidden * 2 / (link["GBps_out_per_gpu"] * 1e9)
                    else:   # nothing leaves the GPU: the rows are copied locally, there and back
                        xf = 1e3 * 2 * 2 * M * SHAPE.top_k * SHAPE.hidden * 2 / (ceilings["copy_GBps"] * 1e9)
                    floors = {"experts": ef, "exchange": xf, "dispatch": xf / 2, "return": xf / 2,
                              "combine": 0.0, "forward": ef + xf}
                    for phase in ("exchange", "experts", "forward", "dispatch", "return", "combine"):
                        r = make_row(meta, ceilings, SHAPE, M, f"EP W={W} {variant}{phase}", s[phase],
                                     f"cuda events, eager, median of {args.reps}, slowest of {W} ranks", DTYPE,
                                     routing, active_experts=int(s["active"]))
                        r["floor_ms"] = round(floors[phase], 5)
                        r["floor_fraction"] = round(floors[phase] / s[phase], 4) if s[phase] > 0 else 0.0
                        rows.append(r)
                rows.append(make_row(meta, ceilings, SHAPE, W * M, f"single GPU fused_experts (W={W} x M tokens)",
                                     ms1, method1, DTYPE, routing,
                                     active_experts=int(torch.unique(idss).numel())))
                rows[-1]["M"] = M    # M stays tokens per rank; the impl says W x M
            dist.barrier(group=group)
    dist.barrier()
    return rows, checks, link


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default=None, help="world sizes to measure (default: the launch's)")
    ap.add_argument("--M", default="1,8,64,512,4096")
    ap.add_argument("--routings", default="uniform,skewed")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="M 1,64,512, uniform only, 10 reps")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run of the logic (gloo, a tiny DeepSeek-like shape, fp32, 2 reps); writes nothing")
    args = ap.parse_args()
    global SHAPE, DTYPE, DEV, SMOKE
    if args.smoke:
        SMOKE, DEV, DTYPE = True, "cpu", torch.float32
        SHAPE = DEEPSEEK_V3.scaled(hidden=64, ffn=64, experts=16, top_k=4)
        args.M, args.routings, args.reps, args.warmup = "3", "skewed", 1, 1
    else:
        mode.require_gpu("The expert-parallel benchmark")
    rank, world = init()
    if args.quick:
        args.M, args.routings, args.reps = "1,64,512", "uniform", 10
    args.M = [int(m) for m in args.M.split(",")]
    args.routings = args.routings.split(",")
    worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else [world]
    if any(w > world or SHAPE.experts % w for w in worlds):
        raise ValueError(f"--worlds {worlds}: each must divide {SHAPE.experts} and be <= the launch's {world} processes")
    if SMOKE:
        meta, ceilings = run_metadata(), {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0}   # not measured: nothing is written
    else:
        meta, ceilings = start_run() if rank == 0 else (None, None)
    full = full_weights()
    for W in worlds:
        rows, checks, link = run_world(W, rank, full, args, meta, ceilings)
        if rank == 0 and SMOKE:
            print(f"smoke W={W}: {len(rows)} rows, checks {checks}", flush=True)
        elif rank == 0:
            write_rows(rows, results_path(f"ch09_expert_parallel_w{W}"))
            extra = results_path(f"ch09_check_w{W}").with_suffix(".json")
            extra.write_text(json.dumps({"meta": meta, "ceilings": ceilings, "link": link, "checks": checks}, indent=1))
            if link:
                lp = results_path(f"ch09_link_w{W}")
                with open(lp, "w", newline="") as f:
                    wr = csv.DictWriter(f, fieldnames=["date", "device", "torch", "world", "bytes_per_rank", "ms",
                                                       "GBps_out_per_gpu", "nccl_nvls"])
                    wr.writeheader()
                    wr.writerow({"date": meta["date"], "device": meta["device"], "torch": meta["torch"], "world": W,
                                 **link, "nccl_nvls": os.environ["NCCL_NVLS_ENABLE"]})
            for p in [extra] + ([lp] if link else []):
                if os.environ.get("OUT"):
                    shutil.copy(p, Path(os.environ["OUT"]) / p.name)
            bad = [c for c in checks if not c["rel_err_vs_single_gpu"] <= 2e-2]
            if bad:
                print("MISMATCH against the single-GPU layer:", bad, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
