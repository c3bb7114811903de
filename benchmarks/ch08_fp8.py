"""Chapter 8 timings: fp8 experts (block-scaled w8a8 and per-channel w8a16) against this course's bf16 fused_moe,
in the same run, with CUDA graphs.

GPU only (fp8 needs NVIDIA sm_89+ or AMD gfx942). From the repository root:

    . scripts/gpu_env.sh; python3 benchmarks/ch08_fp8.py [--quick] [--models mixtral,deepseek_v3] [--M 1,16,128]

Writes ``results/<device>/ch08_fp8.csv`` and ``ch08_fp8_summary.txt`` (and copies both under ``$OUT``).

Each implementation runs from the router logits to the [M, hidden] output, routing included:
``fused_moe bf16`` (chapter 5's layer, bf16 weights), ``fused_moe_fp8 block`` (DeepSeek-V3's 128x128 weight
blocks, activations quantised per token group in the forward), ``fused_moe_fp8 channel`` (fp8 weights with one
scale per output row, bf16 activations). Every time is the median of CUDA-graph replays of a call that runs
``--rotate`` forwards on different inputs (different tokens, so different experts), divided by that number.

Floors, from ceilings measured in this run: bytes = the experts each input set really activates times their
bytes (bf16: 2 B per weight; fp8: 1 B per weight + the fp32 scales) + x read and the output written (bf16),
over the **read** bandwidth (a 2 GB ``torch.sum``: the layer only reads weights); FLOPs over the matmul rate of
the dtype the dots run in (bf16 ``torch.matmul`` 8192^3 for bf16 and weight-only; fp8 ``torch._scaled_mm``
8192^3 for the block scheme). Each row's ``floor_ms``/``floor_fraction`` use these; ``copy_GBps`` and
``matmul_TFLOPs`` keep the course's usual two ceilings, and ``method`` names the ones used.

Targets (issue 14): fp8 >= 1.8x faster than bf16 at M <= 32; >= 0.90 of the fp8 floor at M <= 128, >= 0.80
beyond. The summary lists every cell as met or missed.

``--sweep``: instead, time the whole fp8 layer (graphs, rotated inputs) with candidate (gate+up, down) configs
at M = 1, 16, 128 per model and scheme, print the best and write ``ch08_fp8_sweep.json`` (under ``$OUT`` too):
the input for replacing the untuned ``GPU_TABLES`` of ``triton_moe/kernels/fp8.py``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from ch05_fused_moe import active_counts, make_inputs, timed  # noqa: E402
from triton_moe import mode  # noqa: E402
from triton_moe.kernels.fp8 import GROUP, fp8_dtype, fused_moe_fp8, quantize_experts  # noqa: E402
from triton_moe.kernels.fused_moe import fused_moe  # noqa: E402
from triton_moe.reference import make_problem  # noqa: E402
from triton_moe.shapes import BATCH_SIZES, MODELS, MoEShape  # noqa: E402
from triton_moe.timing import make_row, results_path, start_run, write_rows  # noqa: E402

QUICK_M = (1, 16, 128, 1024)


def expert_bytes(shape: MoEShape, scheme: str) -> int:
    """Bytes of one expert's weights and scales."""
    H, F = shape.hidden, shape.ffn
    if scheme == "bf16":
        return 3 * H * F * 2
    if scheme == "block":
        return 3 * H * F + 4 * 3 * (-(-H // GROUP)) * (-(-F // GROUP))
    return 3 * H * F + 4 * (2 * F + H)


def read_bandwidth() -> float:
    """Bytes per second of a read-only stream (torch.sum over 2 GB of bf16)."""
    import triton.testing as tt

    x = torch.ones(1 << 30, dtype=torch.bfloat16, device="cuda")
    ms = tt.do_bench(lambda: x.sum(), warmup=25, rep=200, return_mode="median")
    x = None
    return 2 * (1 << 30) / (ms * 1e-3)


def fp8_matmul_rate(dtype, n: int = 8192) -> float:
    """FLOP/s of torch._scaled_mm on an n^3 fp8 matmul (the fp8 tensor-core ceiling, this run)."""
    import triton.testing as tt

    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype).t()     # column-major, as _scaled_mm wants
    one = torch.ones((), device="cuda")
    ms = tt.do_bench(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                     warmup=25, rep=200, return_mode="median")
    a = b = None
    return 2 * n ** 3 / (ms * 1e-3)


def floor_of(shape, M, scheme, counts, read_bps, rate):
    floors = [max((n * expert_bytes(shape, scheme) + 2 * M * shape.hidden * 2) / read_bps, shape.flops(M) / rate)
              for n in counts]
    return 1e3 * sum(floors) / len(floors)


SWEEP_UP = [(16, 64, 128, 4, 4), (16, 32, 128, 4, 5), (16, 128, 128, 4, 3), (16, 64, 64, 4, 6)]
SWEEP_DOWN = [(16, 64, 128, 4, 4, 2), (16, 64, 128, 4, 4, 1), (16, 32, 128, 4, 5, 2), (16, 64, 128, 4, 4, 4)]


def sweep(models, R, dt8):
    """Whole-layer timings of candidate configs (BLOCK_M 16 at decode; for M = 128 also BLOCK_M 32 and 64)."""
    import json

    import triton_moe.kernels.fp8 as f8
    from triton_moe.configs import KernelConfig

    orig = f8.pick_config
    out = []
    for key in models:
        shape = MODELS[key]
        k = shape.top_k
        base = make_problem(shape, 1, torch.bfloat16, "cuda", seed=1234)
        for scheme in ("block", "channel"):
            q = quantize_experts(base.w1, base.w3, base.w2, scheme, dt8)
            for M in (1, 16, 128):
                sets = make_inputs(shape, M, base.router_weight, "uniform", [1000 * M + i for i in range(R)],
                                   torch.bfloat16)
                best = None
                bms = (16,) if M < 128 else (16, 32, 64)
                for bm in bms:
                    for u in SWEEP_UP:
                        for d in SWEEP_DOWN:
                            up = KernelConfig(bm, *u[1:3], 8, *u[3:5])
                            down = KernelConfig(bm, *d[1:3], 8, *d[3:5], extra={"SPLIT_K": d[5]})
                            if scheme == "block" and (128 % up.BLOCK_K or 128 % down.BLOCK_K):
                                continue
                            f8.pick_config = lambda op, *a, up=up, down=down: up if op == "fused_gate_up_fp8" else down  # noqa: E731
                            try:
                                ms, _ = timed(lambda: [fused_moe_fp8(x, lg, q, k) for x, lg in sets], R)
                            except Exception as exc:  # noqa: BLE001
                                print(f"  {key} {scheme} M={M} {up} {down}: {type(exc).__name__} {str(exc)[:100]}")
                                continue
                            finally:
                                f8.pick_config = orig
                            out.append({"model": key, "scheme": scheme, "M": M, "up": up.meta(), "down": down.meta(),
                                        "us": ms * 1e3})
                            if best is None or ms < best[0]:
                                best = (ms, up, down)
                print(f"sweep {key:11s} {scheme:7s} M={M:4d} best {best[0] * 1e3:8.1f} us up {best[1].meta()} "
                      f"down {best[2].meta()}", flush=True)
                sets = None
            q = None
        base = None
        torch.cuda.empty_cache()
    path = results_path("ch08_fp8_sweep").with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mixtral,deepseek_v3")
    ap.add_argument("--M", default=None, help="comma-separated batch sizes (default: every BATCH_SIZES entry)")
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_M}")
    ap.add_argument("--rotate", type=int, default=4, help="input sets per timed call (different experts)")
    ap.add_argument("--sweep", action="store_true", help="time candidate configs instead (see the docstring)")
    args = ap.parse_args()
    mode.require_gpu("benchmarks/ch08_fp8.py")
    if args.sweep:
        return sweep(args.models.split(","), args.rotate, fp8_dtype())
    Ms = QUICK_M if args.quick else (tuple(int(m) for m in args.M.split(",")) if args.M else BATCH_SIZES)
    dt8 = fp8_dtype()
    meta, ceilings = start_run()
    read_bps = read_bandwidth()
    rate8 = fp8_matmul_rate(dt8)
    rate16 = ceilings["matmul_TFLOPs"] * 1e12
    print(f"read {read_bps / 1e9:.0f} GB/s, fp8 {dt8} _scaled_mm {rate8 / 1e12:.0f} TFLOP/s", flush=True)
    rows, summary = [], []
    R = args.rotate
    for key in args.models.split(","):
        shape = MODELS[key]
        k = shape.top_k
        base = make_problem(shape, 1, torch.bfloat16, "cuda", seed=1234)
        impls = {"fused_moe bf16": ("bf16", None)}
        for scheme in ("block", "channel"):
            impls[f"fused_moe_fp8 {scheme}"] = (scheme, quantize_experts(base.w1, base.w3, base.w2, scheme, dt8))
        torch.cuda.synchronize()
        for M in Ms:
            sets = make_inputs(shape, M, base.router_weight, "uniform", [1000 * M + i for i in range(R)], torch.bfloat16)
            counts = active_counts(sets, k)
            times = {}
            for impl, (scheme, q) in impls.items():
                if q is None:
                    fn = lambda: [fused_moe(x, lg, base.w1, base.w3, base.w2, k) for x, lg in sets]  # noqa: E731
                else:
                    fn = lambda q=q: [fused_moe_fp8(x, lg, q, k) for x, lg in sets]  # noqa: E731
                ms, method = timed(fn, R)
                rate = rate8 if scheme == "block" else rate16
                fl = floor_of(shape, M, scheme, counts, read_bps, rate)
                row = make_row(meta, ceilings, shape, M, impl, ms, method, torch.bfloat16 if q is None else dt8,
                               "uniform", active_experts=counts[0])
                row["floor_ms"] = round(fl, 5)
                row["floor_fraction"] = round(fl / ms, 4)
                row["active_experts"] = round(sum(counts) / len(counts), 2)
                row["method"] = (f"{method}; floor: read {read_bps / 1e9:.0f} GB/s, "
                                 f"{'fp8 _scaled_mm' if scheme == 'block' else 'bf16 matmul'} "
                                 f"{rate / 1e12:.0f} TFLOP/s; active experts per set " + "/".join(map(str, counts)))
                rows.append(row)
                times[impl] = (ms, fl / ms)
                print(f"{shape.name:22s} M={M:5d} {impl:24s} {ms * 1e3:9.1f} us  floor fraction {fl / ms:.2f}", flush=True)
            bf = times["fused_moe bf16"][0]
            for scheme in ("block", "channel"):
                ms, frac = times[f"fused_moe_fp8 {scheme}"]
                speed = bf / ms
                want_frac = 0.90 if M <= 128 else 0.80
                cells = [f"{frac:.2f} of floor ({'met' if frac >= want_frac else 'MISSED'} >= {want_frac})"]
                if M <= 32:
                    cells.append(f"{speed:.2f}x vs bf16 ({'met' if speed >= 1.8 else 'MISSED'} >= 1.8x)")
                else:
                    cells.append(f"{speed:.2f}x vs bf16")
                summary.append(f"{shape.name:22s} M={M:5d} fp8 {scheme:7s}: " + "; ".join(cells))
            sets = None
        base = impls = None
        torch.cuda.empty_cache()
        write_rows(rows, results_path("ch08_fp8"))   # after each model: a later crash keeps the earlier rows
    text = "\n".join([f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; read "
                      f"{read_bps / 1e9:.0f} GB/s, bf16 {rate16 / 1e12:.0f} TFLOP/s, fp8 {rate8 / 1e12:.0f} TFLOP/s"]
                     + summary) + "\n"
    print(text)
    path = results_path("ch08_fp8_summary").with_suffix(".txt")
    path.write_text(text)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
