"""Vendor-aware launch configs: one kernel source, one config table per vendor family.

The kernels never ask which GPU they run on (no ``if is_hip`` inside a kernel). What differs between an
NVIDIA and an AMD GPU is the launch config, so that is what this module chooses, at run time:

- ``detect_vendor()``: ``"nvidia"``, ``"amd"`` or ``"cpu"`` (Triton's interpreter). ROCm PyTorch calls its
  GPUs ``"cuda"`` too; ``torch.version.hip`` tells them apart (and Triton's active driver when torch says
  neither).
- ``load_vendor_table(kernel)`` looks for, in order:

  1. ``triton_moe/tables/<kernel>.<device-slug>.json`` -- written by a tuning run on that very GPU
     (``benchmarks/ch06_portability.py --tune`` for ``tiled_matmul``)
     (e.g. ``tiled_matmul.amd-instinct-mi300x.json``);
  2. ``triton_moe/tables/<kernel>.<vendor>.json`` -- the vendor family's table (``.nvidia``, ``.amd``, ``.cpu``);
  3. the fallback: the other vendor's table, adapted (:func:`adapt`). For AMD: ``num_stages`` at most 2,
     ``BLOCK_K`` (then ``BLOCK_N``) halved until the napkin shared-memory estimate fits 64 KB of LDS; for
     NVIDIA: AMD-only options dropped. On the CPU: the NVIDIA table, then the AMD one (the interpreter
     ignores ``num_warps``, ``num_stages`` and AMD options). The result says it was adapted: such a config
     compiles (the cross-compile check covers the adapted tables too) but was never tuned there;
  4. the ``default`` table the caller passes, else ``FileNotFoundError`` naming the paths it tried.

AMD-only compiler options travel in ``KernelConfig.extra``: ``waves_per_eu`` (occupancy hint: waves per
SIMD the register allocator should leave room for), ``matrix_instr_nonkdim`` (16 or 32: which MFMA shape,
16x16 or 32x32), ``kpack`` (1 or 2: how many K elements a lane packs per LDS read). NVIDIA's compiler does
not accept them at launch, so :func:`adapt` drops them there.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple

from .configs import ConfigTable, KernelConfig, load_table
from .timing import slug

TABLES = Path(__file__).resolve().parent / "tables"
VENDORS = ("nvidia", "amd")
AMD_ONLY_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
AMD_LDS_BYTES = 64 * 1024       # MI300X / MI250X: LDS per compute unit and per workgroup
AMD_MAX_STAGES = 2              # Triton's AMD software pipeliner: 2 stages (load next tile while computing)


class VendorTable(NamedTuple):
    table: ConfigTable
    source: str          # the file it came from, or "adapted from <file>", or "default"
    vendor: str          # the vendor it serves
    adapted: bool        # True: not tuned for this vendor (fallback)


def detect_vendor() -> str:
    """``"nvidia"``, ``"amd"`` or ``"cpu"``, from torch (and Triton's driver when torch is ambiguous)."""
    from . import mode

    if not mode.ON_GPU:
        return "cpu"
    import torch

    if getattr(torch.version, "hip", None):
        return "amd"
    if getattr(torch.version, "cuda", None):
        return "nvidia"
    try:  # a torch build that names neither: ask Triton which backend it drives
        import triton

        backend = triton.runtime.driver.active.get_current_target().backend
    except Exception:  # noqa: BLE001
        return "nvidia"
    return "amd" if backend == "hip" else "nvidia"


def device_name() -> str:
    """The GPU's name (``torch.cuda`` also answers on ROCm); "cpu" in interpreter mode. Some ROCm builds
    report an empty name: then the architecture (``gcnArchName``, e.g. ``gfx942``) stands in."""
    from . import mode

    if not mode.ON_GPU:
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(0)
    if not name.strip():
        name = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "") or "unknown-gpu"
    return name


def shared_bytes_estimate(cfg: KernelConfig, elem_bytes: int = 2) -> int:
    """Napkin shared memory / LDS of a pipelined matmul: ``num_stages`` buffers of an A tile
    (BLOCK_M x BLOCK_K) and a B tile (BLOCK_K x BLOCK_N). The compiler's number (``metadata.shared``, in the
    compile report) can be lower (it reuses buffers) or higher (layout conversions, epilogue); the check
    uses the compiler's, never this."""
    return cfg.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K * elem_bytes


def adapt(cfg: KernelConfig, vendor: str, elem_bytes: int = 2) -> KernelConfig:
    """A config tuned for one vendor, made legal for another (see the module docstring)."""
    if vendor == "amd":
        c = dataclasses.replace(cfg, num_stages=min(cfg.num_stages, AMD_MAX_STAGES), extra=dict(cfg.extra))
        while shared_bytes_estimate(c, elem_bytes) > AMD_LDS_BYTES and (c.BLOCK_K > 32 or c.BLOCK_N > 32):
            if c.BLOCK_K > 32:
                c = dataclasses.replace(c, BLOCK_K=c.BLOCK_K // 2, extra=c.extra)
            else:
                c = dataclasses.replace(c, BLOCK_N=c.BLOCK_N // 2, extra=c.extra)
        return c
    extra = {k: v for k, v in cfg.extra.items() if k not in AMD_ONLY_OPTIONS}
    return dataclasses.replace(cfg, extra=extra)


def _table_file(kernel: str, key: str, tables: Path) -> Path:
    return tables / f"{kernel}.{key}.json"


def table_candidates(kernel: str, vendor: str, device: str | None = None, tables: Path | None = None) -> list[Path]:
    tables = Path(tables or TABLES)
    paths = []
    if device and vendor != "cpu":
        paths.append(_table_file(kernel, slug(device), tables))
    paths.append(_table_file(kernel, vendor, tables))
    return paths


@functools.lru_cache(maxsize=None)
def _load(kernel: str, vendor: str, device: str | None, tables: str, default: tuple | None) -> VendorTable:
    tried = table_candidates(kernel, vendor, device, Path(tables))
    for p in tried:
        if p.exists():
            return VendorTable(load_table(p), p.name, vendor, False)
    others = {"amd": ["nvidia"], "nvidia": ["amd"], "cpu": ["nvidia", "amd"]}[vendor]
    for other in others:
        p = _table_file(kernel, other, Path(tables))
        tried.append(p)
        if p.exists():
            target = "amd" if vendor == "amd" else "nvidia"  # the interpreter takes NVIDIA-legal configs
            table = [(m, adapt(c, target)) for m, c in load_table(p)]
            return VendorTable(table, f"adapted from {p.name}", vendor, True)
    if default is not None:
        return VendorTable([(m, adapt(c, "amd" if vendor == "amd" else "nvidia")) for m, c in default],
                           "default", vendor, True)
    raise FileNotFoundError(f"no config table for kernel {kernel!r} ({vendor}): tried "
                            + ", ".join(str(p) for p in tried))


def load_vendor_table(kernel: str, vendor: str | None = None, device: str | None = None,
                      default: ConfigTable | None = None, tables: Path | None = None) -> VendorTable:
    """The config table for ``kernel`` on this (or the given) vendor and device; see the module docstring
    for the search order and the fallback."""
    if vendor is None:
        vendor = detect_vendor()
        device = device if device is not None else device_name()
    if vendor not in VENDORS + ("cpu",):
        raise ValueError(f"vendor must be one of {VENDORS + ('cpu',)}, got {vendor!r}")
    return _load(kernel, vendor, device, str(tables or TABLES), tuple(default) if default else None)


def pick_config(kernel: str, M: int, vendor: str | None = None, default: ConfigTable | None = None) -> KernelConfig:
    """The config for ``M`` tokens from this device's table (``configs.pick`` on :func:`load_vendor_table`)."""
    from .configs import pick

    return pick(load_vendor_table(kernel, vendor, default=default).table, M)


TARGETS_OF = {"nvidia": ("sm_90", "sm_80"), "amd": ("gfx942", "gfx90a")}  # crosscompile target names


def current_target() -> str:
    """This GPU's compile target as :mod:`triton_moe.crosscompile` names it (``sm_90``, ``gfx942``), from
    Triton's active driver; "" on the CPU or when the driver cannot say."""
    from . import mode

    if not mode.ON_GPU:
        return ""
    try:
        import triton

        t = triton.runtime.driver.active.get_current_target()
    except Exception:  # noqa: BLE001
        return ""
    return f"sm_{t.arch}" if t.backend == "cuda" else str(t.arch).split(":")[0]


def vendor_tables(kernel: str, default: ConfigTable | None = None,
                  tables: Path | None = None) -> list[tuple[str, str, tuple, ConfigTable]]:
    """What the cross-compile check must cover: ``(label, vendor, targets, table)`` for the table each vendor
    would run (adapted fallbacks included, so an untuned vendor is still proved to compile) on that vendor's
    targets, and for every device table ``<kernel>.<device>.json`` on its own target (``meta.target``, written
    by the tuning script; the vendor's targets when absent)."""
    import json

    out = [(v, v, TARGETS_OF[v], load_vendor_table(kernel, v, default=default, tables=tables).table) for v in VENDORS]
    for p in sorted(Path(tables or TABLES).glob(f"{kernel}.*.json")):
        key = p.name[len(kernel) + 1: -len(".json")]
        if key in VENDORS + ("cpu",):
            continue
        meta = json.loads(p.read_text()).get("meta", {})
        v = meta.get("vendor")
        if v in VENDORS:
            target = meta.get("target")
            out.append((key, v, (target,) if target else TARGETS_OF[v], load_table(p)))
    return out


def clear_cache() -> None:
    _load.cache_clear()


# --------------------------------------------------------------------------------------------------
# Results of both vendors side by side (chapter 6's timing tables)


def times_table(rows: list[dict], impls: list[str] | None = None, vendors: tuple = VENDORS) -> str:
    """A text table of ``timing.load_rows`` rows: one line per M, one numbered column per (device,
    implementation) with ``ms (fraction of floor)``, explained in a legend above; every vendor in ``vendors``
    without rows gets a "not measured" column, so a missing platform is said, never filled in."""
    cols = []
    for r in rows:
        if impls is None or any(r["impl"].startswith(i) for i in impls):
            key = (r["vendor"], r["device"], r["impl"])
            if key not in cols:
                cols.append(key)
    missing = [v for v in vendors if not any(c[0] == v for c in cols)]
    legend = [f"[{k + 1}] {d}: {i}" for k, (_, d, i) in enumerate(cols)]
    legend += [f"[{len(cols) + k + 1}] {v.upper()}: not measured" for k, v in enumerate(missing)]
    n = len(legend)
    lines = legend + ["", f"{'M':>6}  " + "  ".join(f"[{k + 1}]".rjust(22) for k in range(n))]
    for M in sorted({r["M"] for r in rows}):
        cells = []
        for v, d, i in cols:
            hit = [r for r in rows if (r["vendor"], r["device"], r["impl"], r["M"]) == (v, d, i, M)]
            cells.append(f"{hit[0]['median_ms']:.4f} ms ({hit[0]['floor_fraction']:.2f})" if hit else "not measured")
        cells += ["not measured"] * len(missing)
        lines.append(f"{M:>6}  " + "  ".join(c.rjust(22) for c in cells))
    if not rows:
        lines.append("(no results: " + ", ".join(f"{v.upper()} not measured" for v in vendors) + ")")
    return "\n".join(lines)
