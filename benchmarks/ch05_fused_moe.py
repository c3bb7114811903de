"""Chapters 4 and 5 timings: the whole MoE layer (fused_moe against three baselines) and the gate+up stage.

GPU only. Run from the repository root:

    PYTHONPATH=. python benchmarks/ch05_fused_moe.py [--models mixtral,qwen3,deepseek_v3] [--M 1,16,256]
                                                     [--routings uniform,skewed] [--quick] [--no-stage]

Writes ``results/<device>/ch05_fused_moe.csv`` (the layer) and ``results/<device>/ch04_fused_gate_up.csv``
(the gate+up stage alone), and copies both under ``$OUT`` when that variable is set.

Layer implementations (each from the router logits to the [M, hidden] output, routing included):

- ``ch01 loop``: chapter 1's per-expert PyTorch loop (``torch.nonzero`` synchronises with the host, so it
  cannot be captured in a CUDA graph: timed with ``do_bench``, the ``method`` column says so);
- ``torch._grouped_mm``: torch routing, ``argsort`` permutation, one grouped GEMM on a concatenated
  ``[E, 2*ffn, hidden]`` w13 (concatenated once, outside the timing: its best case), ``silu * mul``, a
  grouped GEMM on w2, weighting and ``index_add_``;
- ``ch03 unfused``: chapter 2's router and dispatch, chapter 3's ``grouped_gemm`` for gate, up and down, a
  torch ``silu * mul`` and a torch weighted sum over the top-k rows;
- ``fused_moe``: this package's forward (atomic combine); ``fused_moe deterministic``: the same with
  ``deterministic=True``.

Every time is the median of CUDA-graph replays (``timing.bench_ms``) of a call that runs ``--rotate`` (4)
forwards on different inputs (different tokens, so different experts: no input set sits in L2 across
replays), divided by that number. The floor (weight bytes / copy bandwidth, FLOPs / bf16 matmul rate) is
measured in the same run, from the experts each timed input set really activates
(``topk_ids.unique().numel()``; the floor of a row is the mean of its input sets' floors, the
``active_experts`` column their mean count). CSVs before 2026-11-26 run 5 used the uniform-routing
*expectation* instead, which could be beaten (ratios above 1). The DeepSeek-V3 routed shape is routed with
softmax top-8 here, like the others: the shape is what is measured (its grouped sigmoid router, chapter 2's
``deepseek_v3_route``, costs the same one small launch).

Gate+up stage (``ch04_fused_gate_up.csv``): fused_gate_up against chapter 3's grouped GEMM run for W1 and for
W3 plus a torch ``silu * mul`` (and a concatenated-w13 grouped GEMM + ``silu * mul``), on a precomputed
dispatch. Its floor counts the stage's own bytes (W1 and W3 of the active experts, x, the intermediate).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from triton_moe import mode  # noqa: E402
from triton_moe.kernels.fused_gate_up import fused_gate_up, pick_config  # noqa: E402
from triton_moe.kernels.fused_moe import dispatch, fused_moe, route  # noqa: E402
from triton_moe.reference import _routing_bias, make_problem  # noqa: E402
from triton_moe.shapes import BATCH_SIZES, MODELS, MoEShape  # noqa: E402
from triton_moe.timing import bench_ms, floor_ms, make_row, results_path, start_run, write_rows  # noqa: E402


@dataclasses.dataclass(frozen=True)
class GateUpStage(MoEShape):
    """The gate+up stage alone, for its own floor: W1 and W3 of the active experts, x read once, the
    [M * top_k, ffn] intermediate written once; two of the three projections' FLOPs."""

    def weight_bytes_per_expert(self, bytes_per_elem: int = 2) -> int:
        return 2 * self.hidden * self.ffn * bytes_per_elem

    def activation_bytes(self, tokens: int, bytes_per_elem: int = 2) -> float:
        return tokens * self.hidden * bytes_per_elem + tokens * self.top_k * self.ffn * bytes_per_elem

    def flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.top_k * 2 * self.hidden * self.ffn


def stage_of(shape: MoEShape) -> GateUpStage:
    return GateUpStage(f"{shape.name} gate+up", shape.hidden, shape.ffn, shape.experts, shape.top_k, shape.router)


# --------------------------------------------------------------------------------------------------
# Baselines


def loop_forward(x, logits, w1, w3, w2, top_k):
    """Chapter 1: torch routing, then the per-expert loop."""
    from triton_moe.baselines import moe_forward_loop, route_topk

    tw, ti = route_topk(logits, top_k)
    return moe_forward_loop(x, tw, ti, w1, w3, w2)


def grouped_mm_forward(x, logits, w13t, w2t, top_k):
    """torch routing + permutation + torch._grouped_mm (w13t: [E, hidden, 2*ffn], w2t: [E, ffn, hidden])."""
    from triton_moe.baselines import grouped_mm_experts, route_topk

    tw, ti = route_topk(logits, top_k)
    return grouped_mm_experts(x, tw, ti, w13t, None, w2t)


def unfused_forward(x, logits, w1, w3, w2, top_k):
    """Chapters 2 + 3: router, dispatch, grouped_gemm for gate, up, down; torch activation and combine."""
    from triton_moe.kernels.grouped_gemm import grouped_gemm
    from triton_moe.kernels.grouped_gemm import pick_config as gg_pick

    M, H = x.shape
    E = w1.shape[0]
    tw, ti = route(logits, top_k)
    cfg = gg_pick(M * top_k)
    st, ei, npp = dispatch(ti, E, cfg.BLOCK_M)
    g = grouped_gemm(x, w1, st, ei, npp, top_k, cfg)
    u = grouped_gemm(x, w3, st, ei, npp, top_k, cfg)
    h = F.silu(g) * u
    y = grouped_gemm(h, w2, st, ei, npp, 1, cfg)
    return (y.view(M, top_k, H).float() * tw[..., None]).sum(1).to(x.dtype)


# --------------------------------------------------------------------------------------------------


def make_inputs(shape: MoEShape, M: int, router: torch.Tensor, routing: str, seeds, dtype):
    """(x, router logits) pairs drawn as ``reference.make_problem`` draws them, without new expert weights;
    one routing bias (the same hot experts) for all the sets of one point."""
    bias = _routing_bias(routing, shape.experts, torch.Generator().manual_seed(seeds[0])).to("cuda")
    out = []
    for s in seeds:
        g = torch.Generator(device="cuda").manual_seed(s)
        x = torch.randn(M, shape.hidden, generator=g, device="cuda").to(dtype)
        logits = (x.double() @ router.double().T + bias).float()
        out.append((x, logits))
    return out


def active_counts(inputs, top_k: int) -> list[int]:
    """Experts each input set's routing really activates (softmax is monotonic: top-k of the logits)."""
    return [int(torch.topk(lg.float(), top_k, dim=-1).indices.unique().numel()) for _, lg in inputs]


def honest_row(meta, ceilings, shape, M, impl, ms, method, dtype, routing, counts):
    """A results row whose floor is the mean of the per-input-set floors, each from the experts that set
    really activates (the time is the mean over the same sets)."""
    floors = [floor_ms(shape, M, ceilings, torch.finfo(dtype).bits // 8, n) for n in counts]
    row = make_row(meta, ceilings, shape, M, impl, ms, method, dtype, routing, active_experts=counts[0])
    fl = sum(floors) / len(floors)
    row["floor_ms"] = round(fl, 5)
    row["floor_fraction"] = round(fl / ms, 4)
    mean = sum(counts) / len(counts)
    row["active_experts"] = int(mean) if mean == int(mean) else round(mean, 2)
    row["method"] = method + "; active experts per input set " + "/".join(map(str, counts))
    return row


def timed(fn, n: int, graph: bool = True):
    # rep=20: do_bench_cudagraph captures rep/t calls in one graph and replays it 10 times (median)
    ms, method = bench_ms(fn, graph=graph, rep=20)
    return ms / n, method


# --------------------------------------------------------------------------------------------------
# --sweep: whole-layer timings (CUDA graphs, rotated inputs, as the benchmark) of candidate launch configs at
# the points where the tuner's per-kernel do_bench timings mislead: decode, where a kernel lasts 10-20 µs and
# do_bench's own overhead is of that order, and the skew gap (uniform and skewed timed together).


def _C(bm, bn, bk, warps, stages, split=None):
    from triton_moe.configs import KernelConfig

    return KernelConfig(bm, bn, bk, 8, warps, stages, extra={} if split is None else {"SPLIT_K": split})


DECODE_UP = [(16, 16, 256, 4, 4), (16, 32, 256, 4, 5), (16, 32, 128, 4, 5), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3),
             (16, 16, 512, 4, 3)]
DECODE_DOWN = [(16, 64, 256, 4, 4, 1), (16, 64, 256, 4, 4, 2), (16, 32, 256, 4, 5, 2), (16, 64, 128, 4, 4, 2),
               (16, 128, 128, 4, 4, 1), (16, 32, 512, 4, 3, 1), (16, 32, 256, 4, 5, 4)]
SKEW_PAIRS = {   # (gate_up, down) pairs per BLOCK_M: the tuner's best per BLOCK_M (runs 4-5) and neighbours
    64: [((16, 32, 256, 4, 5), (16, 64, 256, 4, 4, 2)), ((32, 128, 128, 4, 3), (32, 64, 128, 4, 4, 2)),
         ((32, 64, 256, 4, 3), (32, 128, 128, 4, 3, 2)), ((64, 64, 128, 4, 3), (64, 128, 128, 8, 3, 1)),
         ((64, 64, 64, 4, 5), (64, 128, 64, 4, 4, 2))],
    256: [((32, 128, 128, 4, 3), (32, 128, 64, 4, 4, 1)), ((64, 64, 64, 4, 5), (64, 128, 128, 8, 3, 1)),
          ((64, 64, 128, 4, 3), (64, 128, 64, 4, 4, 2)), ((128, 64, 128, 8, 3), (128, 128, 128, 8, 3, 2)),
          ((128, 128, 64, 8, 4), (128, 128, 64, 8, 5, 2)), ((64, 128, 64, 4, 5), (64, 128, 128, 8, 3, 1))],
}


def sweep(points, R, dtype, out_json):
    import json

    import triton_moe.kernels.fused_moe as fm
    from triton_moe.kernels.down_combine import down_combine
    from triton_moe.kernels.fused_moe import route_dispatch

    orig = fm.pick_config
    results = []
    for key, M, kind in points:
        shape = MODELS[key]
        k, E = shape.top_k, shape.experts
        base = make_problem(shape, 1, dtype, "cuda", seed=1234)
        sets = {r: make_inputs(shape, M, base.router_weight, r, [1000 * M + i for i in range(R)], dtype)
                for r in ("uniform", "skewed")}
        cur = {kern: orig(kern, M, shape.hidden, shape.ffn, E, k) for kern in ("fused_gate_up", "down_combine")}

        def layer(up, down, routing):
            fm.pick_config = lambda kern, *a: up if kern == "fused_gate_up" else down  # noqa: E731
            try:
                ms, _ = timed(lambda: [fm.fused_moe(x, lg, base.w1, base.w3, base.w2, k) for x, lg in sets[routing]], R)
            except Exception as exc:  # noqa: BLE001
                print(f"  {key} M={M} {up.meta()} {down.meta()}: {type(exc).__name__}: {str(exc)[:120]}")
                ms = float("inf")
            finally:
                fm.pick_config = orig
            return ms

        def record(tag, up, down, routings):
            t = {r: layer(up, down, r) for r in routings}
            results.append({"model": key, "M": M, "tag": tag, "up": up.meta(), "down": down.meta(), **t})
            print(f"sweep {key:11s} M={M:4d} {tag:9s} up {tuple(up.meta().values())} down {tuple(down.meta().values())} "
                  + " ".join(f"{r} {v * 1e3:8.1f} us" for r, v in t.items()), flush=True)
            return sum(t.values())

        if kind == "decode":
            best_up, best_down = cur["fused_gate_up"], cur["down_combine"]
            best = record("table", best_up, best_down, ["uniform"])
            for c in DECODE_UP:
                up = _C(*c)
                t = record("up", up, best_down, ["uniform"])
                if t < best:
                    best, best_up = t, up
            for c in DECODE_DOWN:
                down = _C(*c)
                t = record("down", best_up, down, ["uniform"])
                if t < best:
                    best, best_down = t, down
            record("best", best_up, best_down, ["uniform", "skewed"])
            # where the time goes at the best configs: each launch alone, in a graph, rotated inputs
            x_lg = sets["uniform"]
            acc = torch.empty(M, shape.hidden, dtype=torch.float32, device="cuda")
            prep = [(x, route_dispatch(lg, k, True, best_up.BLOCK_M, acc)) for x, lg in x_lg]
            hs = [fused_gate_up(x, base.w1, base.w3, *d[2:], k, best_up) for x, d in prep]
            parts = {
                "route_dispatch+zero": lambda: [route_dispatch(lg, k, True, best_up.BLOCK_M, acc) for _, lg in x_lg],
                "gate_up": lambda: [fused_gate_up(x, base.w1, base.w3, *d[2:], k, best_up) for x, d in prep],
                "down+cast": lambda: [down_combine(h, base.w2, d[0], *d[2:], False, best_down, None, acc=acc)
                                      for h, (_, d) in zip(hs, prep)],
                "cast": lambda: [acc.to(dtype) for _ in x_lg],
            }
            line = []
            for name, fn in parts.items():
                ms, _ = timed(fn, R)
                line.append(f"{name} {ms * 1e3:.1f} us")
                results.append({"model": key, "M": M, "tag": "part", "part": name, "uniform": ms})
            print(f"parts {key:11s} M={M:4d} " + " | ".join(line), flush=True)
        else:
            record("table", cur["fused_gate_up"], cur["down_combine"], ["uniform", "skewed"])
            for u, d in SKEW_PAIRS[M]:
                record("pair", _C(*u), _C(*d), ["uniform", "skewed"])
        del base, sets
        torch.cuda.empty_cache()
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=1))


def ridge(points, dtype, ceilings):
    """The best case of the expert GEMMs through cuBLAS: every expert gets exactly M * top_k / E contiguous
    rows (no routing, no gather, no padding), gate+up as one [rows, hidden] x [hidden, 2 ffn] and down as one
    [rows, ffn] x [ffn, hidden] torch.bmm over the experts; activation and combine left out. Its floor
    fraction is what a dense library reaches at the same bytes and FLOPs: where it is low, the gap is the
    ridge (both ceilings bind at once), not the MoE bookkeeping."""
    out = []
    for key, M in points:
        sh = MODELS[key]
        E, r = sh.experts, M * sh.top_k // sh.experts
        g = torch.Generator(device="cuda").manual_seed(M)
        x = torch.randn(E, r, sh.hidden, generator=g, device="cuda").to(dtype)
        h = torch.randn(E, r, sh.ffn, generator=g, device="cuda").to(dtype)
        w13t = torch.randn(E, sh.hidden, 2 * sh.ffn, generator=g, device="cuda").to(dtype)
        w2t = torch.randn(E, sh.ffn, sh.hidden, generator=g, device="cuda").to(dtype)
        ms, _ = timed(lambda: (torch.bmm(x, w13t), torch.bmm(h, w2t)), 1)
        fl = floor_ms(sh, M, ceilings, 2, E)
        line = f"ridge {sh.name:22s} M={M:5d} dense bmm (balanced, no routing) {ms:.3f} ms, floor {fl:.3f} ms, fraction {fl / ms:.2f}"
        print(line, flush=True)
        out.append(line)
        del x, h, w13t, w2t
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mixtral,qwen3,deepseek_v3")
    ap.add_argument("--M", default=",".join(map(str, BATCH_SIZES)))
    ap.add_argument("--routings", default="uniform,skewed")
    ap.add_argument("--impls", default="loop,grouped_mm,unfused,fused,fused_det")
    ap.add_argument("--rotate", type=int, default=4, help="input sets per timed call (different experts)")
    ap.add_argument("--loop-max-M", type=int, default=1 << 30, help="skip the chapter-1 loop above this M")
    ap.add_argument("--no-stage", action="store_true", help="skip the gate+up stage timings (chapter 4)")
    ap.add_argument("--quick", action="store_true", help="M in 1, 16, 256, 4096; uniform routing only")
    ap.add_argument("--ridge", action="store_true", help="also time the balanced dense torch.bmm best case at "
                    "the large-M points (where the floor fraction of every implementation drops)")
    ap.add_argument("--sweep", action="store_true",
                    help="only time candidate configs as the whole layer (decode points and the skew gap)")
    a = ap.parse_args(argv)
    mode.require_gpu("This benchmark")
    if a.sweep:
        pts = [("qwen3", 1, "decode"), ("qwen3", 2, "decode"), ("qwen3", 4, "decode"), ("deepseek_v3", 1, "decode"),
               ("mixtral", 1, "decode"), ("mixtral", 64, "skew"), ("mixtral", 256, "skew")]
        out = Path(os.environ.get("OUT", ROOT / "results")) / "ch05_sweep.json"
        sweep(pts, a.rotate, torch.bfloat16, out)
        return 0
    Ms = [1, 16, 256, 4096] if a.quick else [int(m) for m in a.M.split(",")]
    routings = ["uniform"] if a.quick else a.routings.split(",")
    impls = a.impls.split(",")
    meta, ceilings = start_run()
    dtype = torch.bfloat16
    rows, stage_rows = [], []
    R = a.rotate
    t_start = time.time()
    for key in a.models.split(","):
        shape = MODELS[key]
        k, E = shape.top_k, shape.experts
        base = make_problem(shape, 1, dtype, "cuda", seed=1234)
        w1, w3, w2 = base.w1, base.w3, base.w2
        w13t = w2t = None
        if "grouped_mm" in impls:
            w13t = torch.cat([w1, w3], dim=1).transpose(1, 2)     # [E, hidden, 2*ffn] view of [E, 2*ffn, hidden]
            w2t = w2.transpose(1, 2)                               # [E, ffn, hidden]
        for routing in routings:
            for M in Ms:
                inputs = make_inputs(shape, M, base.router_weight, routing, [1000 * M + i for i in range(R)], dtype)
                counts = active_counts(inputs, k)
                fns = {
                    "ch01 loop": ("loop", lambda: [loop_forward(x, lg, w1, w3, w2, k) for x, lg in inputs[:1]], 1, False),
                    "torch._grouped_mm": ("grouped_mm", lambda: [grouped_mm_forward(x, lg, w13t, w2t, k) for x, lg in inputs], R, True),
                    "ch03 unfused": ("unfused", lambda: [unfused_forward(x, lg, w1, w3, w2, k) for x, lg in inputs], R, True),
                    "fused_moe": ("fused", lambda: [fused_moe(x, lg, w1, w3, w2, k) for x, lg in inputs], R, True),
                    "fused_moe deterministic": ("fused_det", lambda: [fused_moe(x, lg, w1, w3, w2, k, deterministic=True)
                                                                      for x, lg in inputs], R, True),
                }
                line = []
                for name, (tag, fn, n, graph) in fns.items():
                    if tag not in impls or (tag == "loop" and M > a.loop_max_M):
                        continue
                    if tag == "fused_det" and routing != "uniform":
                        continue
                    try:
                        ms, method = timed(fn, n, graph)
                    except Exception as exc:  # noqa: BLE001  (record and go on: one broken baseline must not end the run)
                        print(f"  {key} {routing} M={M} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        continue
                    if n > 1:
                        method += f", {n} input sets per call"
                    row = honest_row(meta, ceilings, shape, M, name, ms, method, dtype, routing, counts[:n])
                    rows.append(row)
                    line.append(f"{name} {ms:.4f} ({row['floor_fraction']:.2f})")
                print(f"{shape.name:22s} {routing:7s} M={M:5d} floor {rows[-1]['floor_ms']:.4f} ms | " + " | ".join(line),
                      flush=True)
                if not a.no_stage and routing == "uniform":
                    stage_rows += stage_point(meta, ceilings, shape, M, inputs, w1, w3, dtype, R)
                del inputs
                torch.cuda.empty_cache()
        del base, w1, w3, w2, w13t, w2t
        torch.cuda.empty_cache()
        paths = save(rows, stage_rows)  # after every model: a run stopped at its time limit keeps what it measured
    print(f"wrote {', '.join(map(str, paths))} in {time.time() - t_start:.0f} s")
    if a.ridge:
        lines = ridge([("mixtral", 512), ("mixtral", 1024), ("mixtral", 4096), ("qwen3", 1024), ("qwen3", 4096),
                       ("deepseek_v3", 4096)], dtype, ceilings)
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / "ridge.txt").write_text("\n".join(lines) + "\n")
    summary(rows)
    return 0


def save(rows, stage_rows):
    paths = [write_rows(rows, results_path("ch05_fused_moe"))]
    if stage_rows:
        paths.append(write_rows(stage_rows, results_path("ch04_fused_gate_up")))
    return paths


def stage_point(meta, ceilings, shape, M, inputs, w1, w3, dtype, R):
    """fused_gate_up against two grouped GEMMs + torch silu*mul, on precomputed dispatches."""
    from triton_moe.kernels.grouped_gemm import grouped_gemm
    from triton_moe.kernels.grouped_gemm import pick_config as gg_pick

    k, E, H, Fd = shape.top_k, shape.experts, shape.hidden, shape.ffn
    st = stage_of(shape)
    cfg = pick_config("fused_gate_up", M, H, Fd, E, k)
    gcfg = gg_pick(M * k)
    prepared, counts = [], []
    for x, lg in inputs:
        _, ti = route(lg, k)
        counts.append(int(ti.unique().numel()))
        prepared.append((x, dispatch(ti, E, cfg.BLOCK_M), dispatch(ti, E, gcfg.BLOCK_M)))
    w13 = torch.cat([w1, w3], dim=1)

    def fused():
        return [fused_gate_up(x, w1, w3, *d, k, cfg) for x, d, _ in prepared]

    def unfused():
        return [F.silu(grouped_gemm(x, w1, *g, k, gcfg)) * grouped_gemm(x, w3, *g, k, gcfg) for x, _, g in prepared]

    def unfused_w13():
        out = []
        for x, _, g in prepared:
            y = grouped_gemm(x, w13, *g, k, gcfg)
            out.append(F.silu(y[:, :Fd]) * y[:, Fd:])
        return out

    rows = []
    for name, fn in (("fused_gate_up", fused), ("ch03 grouped_gemm x2 + silu*mul", unfused),
                     ("ch03 grouped_gemm on w13 + silu*mul", unfused_w13)):
        try:
            ms, method = timed(fn, R)
        except Exception as exc:  # noqa: BLE001
            print(f"  stage {shape.name} M={M} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        rows.append(honest_row(meta, ceilings, st, M, name, ms, method + f", {R} input sets per call", dtype, "uniform",
                               counts))
    del w13
    print("    gate+up stage: " + " | ".join(f"{r['impl']} {r['median_ms']:.4f} ({r['floor_fraction']:.2f})"
                                            for r in rows), flush=True)
    return rows


def summary(rows):
    """A short table: fused_moe's fraction of the floor and its speed-up over torch._grouped_mm."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["routing"], r["M"]), {})[r["impl"]] = r
    print("\nmodel                  routing  M      floor_ms  fused_ms  floor/fused  grouped_mm/fused")
    for (model, routing, M), d in by.items():
        f, g = d.get("fused_moe"), d.get("torch._grouped_mm")
        if not f:
            continue
        speed = f"{g['median_ms'] / f['median_ms']:.2f}x" if g else "-"
        print(f"{model:22s} {routing:8s} {M:<6d} {f['floor_ms']:8.4f}  {f['median_ms']:8.4f}  {f['floor_fraction']:11.2f}  {speed:>8s}")


if __name__ == "__main__":
    sys.exit(main())
