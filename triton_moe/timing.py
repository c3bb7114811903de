"""Timing harness (GPU only) and the results files the notebooks plot.

Every timing is written with what it was measured on: device name, torch, triton, CUDA/HIP version,
dtype, shapes, routing and date, plus the two ceilings measured in the same run (device-to-device copy
bandwidth and a large bf16 matmul), so each row carries its own floor:

    floor = max(weight bytes + activation bytes) / copy bandwidth, FLOPs / matmul rate)

On a CPU, :func:`require_gpu` explains that timings need a GPU and the notebooks read ``results/``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from .mode import info, require_gpu
from .shapes import MoEShape

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

COLUMNS = ["date", "device", "vendor", "torch", "triton", "runtime", "dtype", "model", "hidden", "ffn",
           "experts", "top_k", "routing", "M", "impl", "median_ms", "floor_ms", "floor_fraction",
           "copy_GBps", "matmul_TFLOPs", "method", "active_experts"]


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the folder under results/)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def bench_ms(fn: Callable[[], object], graph: bool = True, rep: int = 100) -> tuple[float, str]:
    """Median milliseconds of ``fn()``. With ``graph``, replay a CUDA graph of it (launch gaps gone, as a
    serving engine runs decode); falls back to plain ``do_bench`` when ``fn`` cannot be captured."""
    require_gpu("Timing")
    import triton.testing as tt

    fn()  # compile and warm up outside the measurement
    torch.cuda.synchronize()
    if graph:
        try:
            return float(tt.do_bench_cudagraph(fn, rep=rep, return_mode="median")), "cudagraph"
        except Exception:  # e.g. a host synchronisation inside fn
            torch.cuda.synchronize()
    return float(tt.do_bench(fn, warmup=25, rep=rep, return_mode="median")), "do_bench"


def measure_ceilings(copy_bytes: int = 1 << 30, matmul_n: int = 8192) -> dict:
    """The two ceilings on this GPU, now: copy bandwidth (bytes read + written) and bf16 matmul rate."""
    require_gpu("Measuring ceilings")
    import triton.testing as tt

    src = torch.randn(copy_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = tt.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    copy_gbps = 2 * copy_bytes / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device="cuda")
    ms = tt.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    tflops = 2 * matmul_n ** 3 / (ms * 1e-3) / 1e12
    return {"copy_GBps": copy_gbps, "matmul_TFLOPs": tflops}


def floor_ms(shape: MoEShape, M: int, ceilings: dict, bytes_per_elem: int = 2,
             active_experts: int | None = None) -> float:
    """The floor for M tokens. Pass ``active_experts`` (experts that received at least one token in the
    routing actually timed): with few tokens or skewed routing it differs from the uniform expectation,
    and a floor from the expectation can then be beaten, which would be no floor at all."""
    weights = (shape.weight_bytes(M, bytes_per_elem) if active_experts is None
               else active_experts * shape.weight_bytes_per_expert(bytes_per_elem))
    moved = weights + shape.activation_bytes(M, bytes_per_elem)
    return 1e3 * max(moved / (ceilings["copy_GBps"] * 1e9), shape.flops(M) / (ceilings["matmul_TFLOPs"] * 1e12))


def run_metadata() -> dict:
    i = info()
    return {"date": _dt.date.today().isoformat(), "device": i.device_name, "vendor": i.vendor,
            "torch": i.torch_version, "triton": i.triton_version, "runtime": i.runtime_version}


def make_row(meta: dict, ceilings: dict, shape: MoEShape, M: int, impl: str, ms: float, method: str,
             dtype: torch.dtype, routing: str, active_experts: int | None = None) -> dict:
    """One results row. ``active_experts``: count of experts the timed routing really used (e.g.
    ``topk_ids.unique().numel()``); without it the floor uses the uniform-routing expectation."""
    fl = floor_ms(shape, M, ceilings, torch.finfo(dtype).bits // 8, active_experts)
    return {**meta, "dtype": str(dtype).replace("torch.", ""), "model": shape.name, "hidden": shape.hidden,
            "ffn": shape.ffn, "experts": shape.experts, "top_k": shape.top_k, "routing": routing, "M": M,
            "impl": impl, "median_ms": round(ms, 5), "floor_ms": round(fl, 5),
            "floor_fraction": round(fl / ms, 4), "copy_GBps": round(ceilings["copy_GBps"], 1),
            "matmul_TFLOPs": round(ceilings["matmul_TFLOPs"], 1), "method": method,
            "active_experts": "" if active_experts is None else int(active_experts)}


def results_path(name: str, device_name: str | None = None) -> Path:
    """results/<device slug>/<name>.csv"""
    device_name = device_name or info().device_name
    return RESULTS / slug(device_name) / f"{name}.csv"


def start_run() -> tuple[dict, dict]:
    """What every benchmark does first: the run's metadata and the two ceilings, measured now and printed."""
    meta = run_metadata()
    ceilings = measure_ceilings()
    print(f"{meta['device']}: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul "
          f"{ceilings['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    return meta, ceilings


def write_rows(rows: Iterable[dict], path: Path) -> Path:
    """Write a results CSV; also copy it into ``$OUT`` when that is set (the GPU machine's way back)."""
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(f"wrote {path}", flush=True)
    return path


def load_rows(name: str) -> list[dict]:
    """Every committed results/<device>/<name>.csv, numbers parsed. Empty list if none was measured."""
    rows = []
    for path in sorted(RESULTS.glob(f"*/{name}.csv")):
        with open(path) as f:
            for r in csv.DictReader(f):
                for k in ("hidden", "ffn", "experts", "top_k", "M"):
                    r[k] = int(r[k])
                for k in ("median_ms", "floor_ms", "floor_fraction", "copy_GBps", "matmul_TFLOPs"):
                    r[k] = float(r[k])
                rows.append(r)
    return rows


def summary_line(rows: list[dict]) -> str:
    if not rows:
        return "not measured"
    r = rows[0]
    return (f"{r['device']}, torch {r['torch']}, triton {r['triton']}, {r['runtime']}, {r['dtype']}, "
            f"{r['date']}; ceilings {r['copy_GBps']:.0f} GB/s copy, {r['matmul_TFLOPs']:.0f} TFLOP/s bf16")


def plot_times(rows: list[dict], title: str, model: str | None = None, routing: str = "uniform", ax=None,
               details: bool | None = None):
    """Time against M per implementation, with the floor; log-log. Returns the axes.

    ``details`` (default: only when this call makes its own figure) adds the run's device, versions and
    ceilings under the title. A figure of several panels should say them once, with
    ``fig.suptitle(summary_line(rows))``: repeated in every panel title they overlap the neighbours."""
    import textwrap

    import matplotlib.pyplot as plt

    rows = [r for r in rows if (model is None or r["model"] == model) and r["routing"] == routing]
    if details is None:
        details = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    if not rows:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return ax
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["M"], r["median_ms"]) for r in rows if r["impl"] == impl)
        ax.plot(*zip(*pts), marker="o", label=impl)
    floor = sorted({(r["M"], r["floor_ms"]) for r in rows})
    ax.plot(*zip(*floor), "k--", label="floor (same run)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens M")
    ax.set_ylabel("median time (ms)")
    ax.set_title(title + ("\n" + textwrap.fill(summary_line(rows), 90) if details else ""),
                 fontsize=8 if details else 9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return ax

