"""Vendor-aware launch configs, as chapter 6 teaches them: one kernel source, one config table per vendor.

The kernels never ask which GPU they run on (no ``if is_hip`` inside a kernel): what differs between an NVIDIA
and an AMD GPU is the launch config, which :mod:`triton_moe.configs` chooses (the one chooser; its docstring
has the search order: device table, vendor table, the other vendor's table adapted, the op's portable table)
for the target :mod:`triton_moe.target` detects. This module keeps chapter 6's names for them and the
side-by-side view of both vendors' results.

AMD-only compiler options travel in ``KernelConfig.extra``: ``waves_per_eu`` (occupancy hint: waves per SIMD
the register allocator should leave room for), ``matrix_instr_nonkdim`` (16 or 32: which MFMA shape, 16x16 or
32x32), ``kpack`` (1 or 2: how many K elements a lane packs per LDS read). NVIDIA's compiler does not accept
them at launch, so :func:`triton_moe.configs.adapt` drops them there.
"""
from __future__ import annotations

from . import configs
from . import target as _target
from .configs import AMD_LDS_BYTES, AMD_MAX_STAGES, AMD_ONLY_OPTIONS, TABLES, adapt, staged_bytes  # noqa: F401

VENDORS = ("nvidia", "amd")
TARGETS_OF = {"nvidia": ("sm_90", "sm_80"), "amd": ("gfx942", "gfx90a")}  # compile-check target names
_VENDOR_TARGET = {"nvidia": "sm_90", "amd": "gfx942", "cpu": "cpu"}


def detect_vendor() -> str:
    """``"nvidia"``, ``"amd"`` or ``"cpu"`` (Triton's interpreter)."""
    return _target.current().vendor


def current_target() -> str:
    """This GPU's compile target (``sm_90``, ``gfx942``); "" on the CPU."""
    return _target.current().arch


def shared_bytes_estimate(cfg, elem_bytes: int = 2) -> int:
    """Napkin LDS / shared memory of a one-weight-tile matmul config (:func:`triton_moe.configs.staged_bytes`)."""
    return staged_bytes(cfg, 1, elem_bytes)


def load_vendor_table(kernel: str, vendor: str | None = None) -> configs.Table:
    """The table ``kernel`` runs on this machine, or on a GPU of ``vendor`` (its first target)."""
    if vendor is not None and vendor not in _VENDOR_TARGET:
        raise ValueError(f"vendor must be one of {tuple(_VENDOR_TARGET)}, got {vendor!r}")
    return configs.table(kernel, target=None if vendor is None else _VENDOR_TARGET[vendor])


def pick_config(kernel: str, M: int, vendor: str | None = None):
    """The config for ``M`` rows on this machine (or a ``vendor`` GPU): :func:`triton_moe.configs.choose`."""
    return configs.choose(kernel, M, target=None if vendor is None else _VENDOR_TARGET[vendor])


def vendor_tables(kernel: str) -> list[tuple[str, str, tuple, list]]:
    """What the compile check must cover: ``(label, vendor, targets, table)`` for the table each vendor runs
    (adapted fallbacks included) on that vendor's targets, and every device table on its own target
    (``meta.target`` in the file, written by the tuning script; the vendor's targets when absent)."""
    import json

    out = [(v, v, TARGETS_OF[v], list(load_vendor_table(kernel, v).rows)) for v in VENDORS]
    for key, p in configs.table_files(kernel):
        if key in VENDORS + ("cpu",):
            continue
        meta = json.loads(p.read_text()).get("meta", {})
        v = meta.get("vendor")
        if v in VENDORS:
            t = meta.get("target")
            out.append((key, v, (t,) if t else TARGETS_OF[v], configs.load_table(p)))
    return out


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
