"""Tune the launch configs of ``fused_gate_up`` and ``down_combine`` on this GPU, in a few minutes.

    PYTHONPATH=. python scripts/tune_fused_moe.py [--models mixtral,qwen3,deepseek_v3] [--M 1,2,4,...]
                                                 [--out DIR] [--write-tables]

For every model shape and M it times (``triton.testing.do_bench``: median, L2 flushed before each run, so
weights come from memory as they do in a real layer) a short list of candidates per kernel, grouped by
BLOCK_M: both kernels share the dispatch, so they share its BLOCK_M. Each candidate runs on a uniform and on
a skewed routing (the table is keyed by M alone, so it must serve both) and scores the sum of the two
medians. For each BLOCK_M allowed at that M (no larger than about twice the rows of a hot expert) it takes
the best gate+up config and the best down config, and keeps the BLOCK_M whose sum is smallest. Every timed config's output is compared with a
torch reference first; a wrong or non-compiling config is never chosen.

Writes ``fused_gate_up.<device>.json`` and ``down_combine.<device>.json`` (this GPU's tables, which the config
chooser takes first on it; ``--family`` writes ``<kernel>.<vendor>.json`` instead; ``configs.save_table`` format:
``table`` holds the default rows, Mixtral's; ``shapes`` holds the rows tuned per model shape) and
``tune_log.csv`` (every candidate's time) to ``--out`` (default ``$OUT`` or ``results/``);
``--write-tables`` also writes the tables into ``triton_moe/tables/``. Keyed by M: the table row for M
serves every M up to it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import triton_moe  # noqa: E402,F401
from triton_moe import configs  # noqa: E402
from triton_moe.target import current  # noqa: E402
from triton_moe.configs import KernelConfig  # noqa: E402
from triton_moe.kernels import fused_gate_up as fgu  # noqa: E402
from triton_moe.kernels.down_combine import down_combine  # noqa: E402
from triton_moe.kernels.fused_moe import dispatch, route  # noqa: E402
from triton_moe.mode import info, require_gpu  # noqa: E402
from triton_moe.reference import _routing_bias  # noqa: E402
from triton_moe.shapes import BATCH_SIZES, MODELS  # noqa: E402

C = KernelConfig
DEVICE_KEY = ""   # the table this run writes: this GPU's (tables/<kernel>.<device>.json) unless --family
# GROUP_M is 8 everywhere: it only orders the programs (GROUP_M row blocks run each column block together),
# and with uniform routing at small M every expert has one row block, so timing cannot tell GROUP_M=1 from 8.
# But a hot expert (skewed routing) gets several row blocks, and with GROUP_M=1 each re-reads its weights
# from memory: run 2 measured DeepSeek-V3 skewed M=256 at 2.09 ms against torch._grouped_mm's 1.36 ms.
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); two B tiles per stage for gate+up.
GATE_UP = [
    C(16, 64, 128, 8, 4, 4), C(16, 32, 256, 8, 4, 4), C(16, 64, 256, 8, 4, 3), C(16, 128, 128, 8, 4, 3),
    C(16, 64, 64, 8, 4, 6), C(16, 32, 128, 8, 4, 5),
    C(32, 64, 128, 8, 4, 4), C(32, 128, 128, 8, 4, 3), C(32, 64, 256, 8, 4, 3), C(32, 128, 64, 8, 4, 4),
    C(64, 64, 128, 8, 4, 3), C(64, 128, 64, 8, 4, 4), C(64, 128, 64, 8, 8, 4), C(64, 64, 64, 8, 4, 5),
    C(64, 128, 128, 8, 8, 2),
    C(64, 128, 64, 8, 4, 3),
    C(128, 64, 64, 8, 8, 4), C(128, 128, 64, 8, 8, 3), C(128, 64, 128, 8, 8, 3), C(128, 128, 64, 8, 4, 3),
    C(128, 128, 64, 8, 8, 4), C(128, 64, 64, 8, 4, 4),
    # run 5: narrower decode tiles (more programs streaming the weights), deeper pipelines, BLOCK_M 256
    C(16, 16, 256, 8, 4, 4), C(16, 32, 256, 8, 4, 5), C(16, 16, 512, 8, 4, 3), C(32, 32, 256, 8, 4, 4),
    C(64, 128, 64, 8, 4, 5), C(128, 128, 32, 8, 8, 6), C(128, 128, 64, 8, 4, 4),
    C(256, 64, 64, 8, 8, 4), C(256, 128, 64, 8, 8, 3), C(256, 64, 64, 8, 8, 3),
]
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), split-K values (a run-time argument).
DOWN = [
    (C(16, 64, 128, 8, 4, 4), (1, 2, 4)), (C(16, 128, 128, 8, 4, 4), (1, 2)), (C(16, 32, 256, 8, 4, 4), (1, 2)),
    (C(16, 64, 256, 8, 4, 3), (1, 2)),
    (C(32, 64, 128, 8, 4, 4), (1, 2)), (C(32, 128, 128, 8, 4, 3), (1, 2)), (C(32, 128, 64, 8, 4, 4), (1,)),
    (C(64, 64, 128, 8, 4, 4), (1, 2)), (C(64, 128, 64, 8, 4, 4), (1, 2)), (C(64, 128, 128, 8, 8, 3), (1, 2)),
    (C(64, 256, 64, 8, 8, 3), (1,)),
    (C(128, 128, 64, 8, 8, 4), (1, 2)), (C(128, 256, 64, 8, 8, 3), (1,)), (C(128, 128, 128, 8, 8, 3), (1, 2)),
    (C(128, 128, 64, 8, 4, 4), (1,)),
    # run 5
    (C(16, 32, 256, 8, 4, 5), (1, 2, 4)), (C(16, 64, 256, 8, 4, 4), (2, 4)), (C(16, 32, 512, 8, 4, 3), (1, 2)),
    (C(32, 64, 256, 8, 4, 3), (1, 2)),
    (C(128, 256, 64, 8, 8, 4), (1, 2)), (C(128, 256, 64, 8, 8, 3), (2,)), (C(128, 128, 64, 8, 8, 5), (1, 2)),
    (C(256, 128, 64, 8, 8, 4), (1,)), (C(256, 128, 64, 8, 8, 3), (1,)), (C(256, 64, 128, 8, 8, 3), (1,)),
]


def allowed_block_m(M: int, experts: int, top_k: int) -> list[int]:
    """BLOCK_M values worth timing: up to about twice the rows of a hot expert under skewed routing (E/8 hot
    experts take most slots), at most the three largest."""
    rows_hot = min(M * top_k, 8 * M * top_k / experts)
    bms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * rows_hot)]
    # BLOCK_M 256 once the average expert has 256 rows (prefill): fewer, larger programs, each weight tile
    # feeding twice the rows (run 5)
    return bms[-3:] + ([256] if M * top_k >= 256 * experts else [])


def bench(fn) -> float:
    import triton.testing as tt

    return float(tt.do_bench(fn, warmup=3, rep=15, return_mode="median"))


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def references(x, tw, ti, w1, w3, w2, k):
    """torch references per expert (bf16 inputs, fp32 math): the intermediate and the layer output."""
    M = x.shape[0]
    flat = ti.reshape(-1).long()
    tok = torch.arange(M * k, device="cuda") // k
    h_ref = torch.empty(M * k, w1.shape[1], device="cuda", dtype=torch.float32)
    experts = torch.unique(flat).tolist()
    for e in experts:
        s = (flat == e).nonzero().flatten()
        xe = x[tok[s]].float()
        h_ref[s] = torch.nn.functional.silu(xe @ w1[e].float().T) * (xe @ w3[e].float().T)
    h_in = h_ref.to(x.dtype)
    y = torch.zeros(M * k, w2.shape[1], device="cuda")
    for e in experts:
        s = (flat == e).nonzero().flatten()
        y[s] = h_in[s].float() @ w2[e].float().T
    return h_ref, h_in, (y.view(M, k, -1) * tw[..., None]).sum(1)


def tune_shape(key: str, Ms, log: list, dtype=torch.bfloat16):
    """Per M: every candidate is timed on a uniform and on a skewed routing (E/8 hot experts, as
    reference.make_problem draws them); the score is the sum of the two times. A table keyed by M cannot
    know the routing, so it should be good for both: a BLOCK_M that fits uniform decode (one or two rows per
    expert) re-reads a hot expert's weights once per row block."""
    shape = MODELS[key]
    E, H, F, k = shape.experts, shape.hidden, shape.ffn, shape.top_k
    g = torch.Generator(device="cuda").manual_seed(0)
    w1 = (torch.randn(E, F, H, device="cuda", generator=g) * H ** -0.5).to(dtype)
    w3 = (torch.randn(E, F, H, device="cuda", generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, F, device="cuda", generator=g) * F ** -0.5).to(dtype)
    router = torch.randn(E, H, device="cuda", generator=g) * H ** -0.5
    bias = _routing_bias("skewed", E, torch.Generator().manual_seed(0)).to("cuda").float()
    up_rows, down_rows = [], []
    for M in Ms:
        t0 = time.time()
        x = torch.randn(M, H, device="cuda", generator=g).to(dtype)
        cases = []
        for routing, b in (("uniform", 0.0), ("skewed", bias)):
            tw, ti = route(x.float() @ router.T + b, k)
            cases.append((routing, tw, ti) + references(x, tw, ti, w1, w3, w2, k))
        best = {}
        for bm in allowed_block_m(M, E, k):
            prepared = [(routing, tw, dispatch(ti, E, bm), h_ref, h_in, out_ref)
                        for routing, tw, ti, h_ref, h_in, out_ref in cases]
            h_out = torch.empty(M * k, F, device="cuda", dtype=dtype)
            out = torch.empty(M, H, device="cuda", dtype=dtype)

            def score(run, check):
                """Sum over the two routings of the median time; inf if wrong or not compiling."""
                total, times = 0.0, []
                for routing, tw, d, h_ref, h_in, out_ref in prepared:
                    fn = lambda: run(tw, d, h_in)  # noqa: E731
                    fn()
                    err = check(h_ref, out_ref)
                    ms = bench(fn) if err < 2e-2 else float("inf")
                    times.append(ms)
                    total += ms
                return total, times, err

            cands = []
            for cfg in [c for c in GATE_UP if c.BLOCK_M == bm]:
                try:
                    total, times, err = score(lambda tw, d, h_in: fgu.fused_gate_up(x, w1, w3, *d, k, cfg, h_out),
                                              lambda h_ref, out_ref: rel_err(h_out, h_ref))
                except Exception as exc:  # noqa: BLE001  (out of shared memory, ...)
                    total, times, err = float("inf"), [float("inf")] * 2, float("nan")
                    print(f"  {key} M={M} gate_up {cfg.meta()}: {type(exc).__name__}: {str(exc)[:100]}")
                log.append({"model": key, "M": M, "kernel": "fused_gate_up", **cfg.meta(), "split_k": 1,
                            "ms_uniform": times[0], "ms_skewed": times[1], "ms": total, "rel_err": err})
                cands.append((total, cfg))
            up = min(cands, key=lambda c: c[0])
            cands = []
            for base, splits in [d for d in DOWN if d[0].BLOCK_M == bm]:
                for sk in splits:
                    cfg = dataclasses.replace(base, extra={"SPLIT_K": sk})
                    try:
                        total, times, err = score(
                            lambda tw, d, h_in: down_combine(h_in, w2, tw, *d, False, cfg, out),
                            lambda h_ref, out_ref: rel_err(out, out_ref))
                    except Exception as exc:  # noqa: BLE001
                        total, times, err = float("inf"), [float("inf")] * 2, float("nan")
                        print(f"  {key} M={M} down {cfg.meta()}: {type(exc).__name__}: {str(exc)[:100]}")
                    log.append({"model": key, "M": M, "kernel": "down_combine", **base.meta(), "split_k": sk,
                                "ms_uniform": times[0], "ms_skewed": times[1], "ms": total, "rel_err": err})
                    cands.append((total, cfg))
            down = min(cands, key=lambda c: c[0])
            best[bm] = (up[0] + down[0], up[1], down[1], up[0], down[0])
        bm = min(best, key=lambda b: best[b][0])
        total, cu, cd, tu, td = best[bm]
        up_rows.append((M, cu))
        down_rows.append((M, cd))
        print(f"{key:12s} M={M:5d} BLOCK_M={bm:3d} gate_up {tu:.4f} ms {cu.meta()}  down {td:.4f} ms "
              f"{cd.meta()}  (uniform + skewed; {time.time() - t0:.1f} s)", flush=True)
    del w1, w3, w2
    torch.cuda.empty_cache()
    return up_rows, down_rows


def rows_json(rows):
    out = []
    for m, c in rows:
        d = dataclasses.asdict(c)
        out.append({"max_M": m, **d})
    return out


def main(argv=None) -> int:
    require_gpu("Tuning")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mixtral,qwen3,deepseek_v3")
    ap.add_argument("--M", default=",".join(map(str, BATCH_SIZES)))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "results")))
    ap.add_argument("--write-tables", action="store_true")
    ap.add_argument("--family", action="store_true", help="write the vendor family's table (<kernel>.<vendor>.json) "
                    "instead of this device's (<kernel>.<device>.json)")
    a = ap.parse_args(argv)
    global DEVICE_KEY
    DEVICE_KEY = info().vendor if a.family else current().device
    Ms = [int(m) for m in a.M.split(",")]
    log: list = []
    tables = {"fused_gate_up": {}, "down_combine": {}}
    # start from the committed tables: a run stopped at its time limit replaces only the shapes it finished
    for kernel in tables:
        old = configs.table_path(kernel, DEVICE_KEY)
        if old.exists():
            for sk, rows in json.loads(old.read_text()).get("shapes", {}).items():
                tables[kernel][sk] = configs.rows_from_json(rows)
    t0 = time.time()
    i = info()
    a.out.mkdir(parents=True, exist_ok=True)
    fgu.TABLES.mkdir(parents=True, exist_ok=True)
    for key in a.models.split(","):
        s = MODELS[key]
        up, down = tune_shape(key, Ms, log)
        sk = fgu.shape_key(s.hidden, s.ffn, s.experts, s.top_k)
        tables["fused_gate_up"][sk] = up
        tables["down_combine"][sk] = down
        # write after every model: a run stopped at its time limit keeps what it tuned
        meta = {"device": i.device_name, "vendor": i.vendor, "torch": i.torch_version, "triton": i.triton_version,
                "runtime": i.runtime_version, "date": time.strftime("%Y-%m-%d"), "dtype": "bfloat16",
                "method": "triton.testing.do_bench median (L2 flushed), warmup 3 ms, rep 15 ms; score = uniform + "
                          "skewed routing time",
                "script": "scripts/tune_fused_moe.py", "M": Ms, "target": current().arch, "seconds": round(time.time() - t0)}
        default_key = fgu.shape_key(4096, 14336, 8, 2)
        for kernel, per_shape in tables.items():
            default = per_shape.get(default_key) or next(iter(per_shape.values()))
            doc = {"meta": meta, "table": rows_json(default),
                   "shapes": {k: rows_json(v) for k, v in per_shape.items()}}
            text = json.dumps(doc, indent=1) + "\n"
            (a.out / f"{kernel}.{DEVICE_KEY}.json").write_text(text)
            if a.write_tables:
                configs.table_path(kernel, DEVICE_KEY).write_text(text)
        with open(a.out / "tune_log.csv", "w", newline="") as f:
            keys = list(dict.fromkeys(k for r in log for k in r))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(log)
    print(f"tuned {len(log)} candidates in {time.time() - t0:.0f} s; wrote tables to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
