"""Launch configurations: one chooser for every kernel, from tables keyed by problem size, never autotune.

Why tables: ``triton.autotune`` with several configs needs a GPU driver (it fails in the CPU interpreter), it
hides which config ran, and a CUDA graph needs the choice fixed before capture. A table is explicit,
printable, committed next to the measurements that chose it, and the tuning scripts write it.

Each kernel registers an :class:`Op` once: its name, what the table's key ``m`` means for it (tokens, GEMM rows
``tokens * top_k``, experts), its CPU table (big tiles: the interpreter costs ~7 ms per program x K step), its
portable GPU table (any GPU nobody tuned), how many weight tiles it stages per K step (for the shared-memory /
LDS fit), the oldest NVIDIA architecture its tuned tables were made for, and whether an AMD GPU may borrow the
NVIDIA table. :func:`choose` then answers for the target :mod:`triton_moe.target` reports (or simulates):

1. CPU: ``tables/<op>.cpu.json`` if committed, else ``Op.cpu``;
2. ``tables/<op>.<device>.json``: tuned on this very GPU (``<device>`` = its name's slug, e.g. ``nvidia-h200``);
3. ``tables/<op>.<vendor>.json``: the vendor family's table (NVIDIA: only from ``Op.nvidia_min_sm`` on; the
   committed NVIDIA tables were tuned on an H100, and their tiles spill registers on sm_80);
4. AMD with ``Op.amd_borrows``: the NVIDIA family table adapted (at most 2 stages; BLOCK_K, then BLOCK_N,
   halved until the staged tiles fit 64 KB of LDS) -- legal there, never tuned there;
5. ``Op.portable`` (adapted the same way on AMD when ``amd_borrows``).

A table file is ``{"meta": {...}, "table": [rows], "shapes": {shape_key: [rows]}}``: ``table`` serves every
shape, ``shapes`` rows tuned for one model shape (:func:`shape_key`). A row ``{"max_M": m, ...}`` serves every
key value up to ``m``; the last row serves everything larger (:func:`pick`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import target as _target
from .target import Target, simulate  # noqa: F401  (re-exported: configs.simulate for the compile check)

TABLES = Path(__file__).resolve().parent / "tables"
INF = 1 << 30
AMD_ONLY_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")   # NVIDIA's compiler refuses them
AMD_LDS_BYTES = 64 * 1024        # MI300X / MI250X: LDS per workgroup
AMD_MAX_STAGES = 2               # Triton's AMD software pipeliner: load the next tile while computing this one
NVIDIA_SHARED_BYTES = 227 * 1024  # what one block may opt into on an H100


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int = 64     # rows (sorted token slots) per program
    BLOCK_N: int = 64     # output columns per program
    BLOCK_K: int = 32     # reduction step
    GROUP_M: int = 8      # programs along M that share a column block, for L2 reuse
    num_warps: int = 4
    num_stages: int = 3
    extra: dict = field(default_factory=dict, hash=False, compare=False)  # vendor knobs (waves_per_eu, ...)

    def meta(self) -> dict:
        """Keyword arguments for a kernel launch: constexpr blocks and the compiler options."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class RouterConfig:
    """A router launch: tokens per program and warps (the experts of a token always fit one tile)."""
    BLOCK_T: int = 64
    num_warps: int = 4


ConfigTable = list  # [(max key value, config), ...] sorted by the key


@dataclass(frozen=True)
class Op:
    name: str                  # tables/<name>.<...>.json
    key: str                   # what m means for this op, said once
    cpu: tuple                 # the interpreter's table
    portable: tuple            # any GPU without a tuned table
    weight_tiles: int = 1      # weight tiles staged per K step (gate+up stages two)
    nvidia_min_sm: int = 0     # the committed NVIDIA family table serves sm >= this
    amd_borrows: bool = False  # AMD may run the NVIDIA family table, adapted
    row: type = KernelConfig   # the config type of a table row


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add (or replace) an op; kernel modules register theirs at import."""
    OPS[op.name] = op
    clear_cache()
    return op


def shape_key(hidden: int, ffn: int, experts: int, top_k: int) -> str:
    """How a tuned table names the model shape it was tuned for."""
    return f"hidden={hidden},ffn={ffn},experts={experts},top_k={top_k}"


# --------------------------------------------------------------------------------------------------
# Tables


def pick(table: ConfigTable, m: int):
    if not table:
        raise ValueError("config table is empty")
    for max_m, cfg in table:
        if m <= max_m:
            return cfg
    return table[-1][1]


def rows_from_json(rows, row_type=KernelConfig) -> ConfigTable:
    """Table rows as a table file stores them ({"max_M": m, ...} dicts) -> [(m, config)], sorted."""
    out = []
    for row in rows:
        row = dict(row)
        bound = next(k for k in row if k.startswith("max_"))
        m = row.pop(bound)
        out.append((m, row_type(**row)))
    return sorted(out, key=lambda r: r[0])


def save_table(table: ConfigTable, path: str | Path, meta: dict | None = None, shapes: dict | None = None) -> None:
    rows = lambda t: [{"max_M": m, **asdict(c)} for m, c in t]  # noqa: E731
    doc = {"meta": meta or {}, "table": rows(table)}
    if shapes:
        doc["shapes"] = {k: rows(t) for k, t in shapes.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load_table(path: str | Path, shape: str | None = None, row_type=KernelConfig) -> ConfigTable:
    """The rows of a table file: the ``shape``'s own rows when it has them, else the default ``table``."""
    data = json.loads(Path(path).read_text())
    rows = data.get("shapes", {}).get(shape) if shape else None
    return rows_from_json(rows or data["table"], row_type)


def table_path(op: str, key: str, tables: Path | None = None) -> Path:
    """``tables/<op>.<key>.json``, key = a device slug, a vendor or ``cpu``: the one naming scheme."""
    return Path(tables or TABLES) / f"{op}.{key}.json"


def staged_bytes(cfg: KernelConfig, weight_tiles: int = 1, elem_bytes: int = 2) -> int:
    """Napkin shared memory / LDS of a pipelined matmul: ``num_stages`` buffers of an input tile
    (BLOCK_M x BLOCK_K) and ``weight_tiles`` weight tiles (BLOCK_K x BLOCK_N). The compiler's number
    (``metadata.shared``, in the compile report) can be lower (buffer reuse) or higher (layout conversions); the
    compile check uses the compiler's, never this."""
    return cfg.num_stages * (cfg.BLOCK_M * cfg.BLOCK_K + weight_tiles * cfg.BLOCK_K * cfg.BLOCK_N) * elem_bytes


def adapt(cfg, vendor: str, weight_tiles: int = 1, elem_bytes: int = 2):
    """A config tuned for one vendor, made legal for another: on AMD at most 2 stages and staged tiles that fit
    64 KB of LDS (halve BLOCK_K, then BLOCK_N, not below 32); elsewhere without AMD-only compiler options."""
    if not isinstance(cfg, KernelConfig):
        return cfg
    if vendor == "amd":
        c = dataclasses.replace(cfg, num_stages=min(cfg.num_stages, AMD_MAX_STAGES), extra=dict(cfg.extra))
        while staged_bytes(c, weight_tiles, elem_bytes) > AMD_LDS_BYTES and (c.BLOCK_K > 32 or c.BLOCK_N > 32):
            if c.BLOCK_K > 32:
                c = dataclasses.replace(c, BLOCK_K=c.BLOCK_K // 2, extra=c.extra)
            else:
                c = dataclasses.replace(c, BLOCK_N=c.BLOCK_N // 2, extra=c.extra)
        return c
    return dataclasses.replace(cfg, extra={k: v for k, v in cfg.extra.items() if k not in AMD_ONLY_OPTIONS})


@dataclass(frozen=True)
class Table:
    rows: tuple           # ((max key, config), ...)
    source: str           # the file it came from, "adapted from <file>", "portable" or "cpu"
    adapted: bool = False  # True: not tuned for this vendor

    @property
    def table(self) -> ConfigTable:
        """The rows as a list, for :func:`pick`."""
        return list(self.rows)


@functools.lru_cache(maxsize=None)
def _table(op_name: str, shape: str | None, t: Target, tables: str) -> Table:
    op = OPS[op_name]
    tables = Path(tables)
    if t.vendor == "cpu":
        p = table_path(op.name, "cpu", tables)
        if p.exists():
            return Table(tuple(load_table(p, shape, op.row)), p.name)
        return Table(tuple(op.cpu), "cpu")
    keys = [t.device] if t.device else []
    if not (t.vendor == "nvidia" and t.sm and t.sm < op.nvidia_min_sm):
        keys.append(t.vendor)
    for key in keys:
        p = table_path(op.name, key, tables)
        if p.exists():
            return Table(tuple(load_table(p, shape, op.row)), p.name)
    if t.vendor == "amd" and op.amd_borrows:
        p = table_path(op.name, "nvidia", tables)
        if p.exists():
            rows = [(m, adapt(c, "amd", op.weight_tiles)) for m, c in load_table(p, shape, op.row)]
            return Table(tuple(rows), f"adapted from {p.name}", True)
    if t.vendor == "amd" and op.amd_borrows:
        return Table(tuple((m, adapt(c, "amd", op.weight_tiles)) for m, c in op.portable), "portable", True)
    return Table(tuple(op.portable), "portable")


def table(op: str, shape: str | None = None, target: Target | str | None = None, tables: Path | None = None) -> Table:
    """The table ``op`` runs on ``target`` (default: :func:`triton_moe.target.current`) for a model shape
    (:func:`shape_key`; None: the default rows); see the module docstring for the search order."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; registered: {sorted(OPS)}")
    t = _target.current() if target is None else _target.parse(target)
    return _table(op, shape, t, str(tables or TABLES))


def fit_shared(cfg: KernelConfig, op: str, elem_bytes: int, target: Target | None = None) -> KernelConfig:
    """Tables are tuned for 2-byte inputs; wider inputs grow the staged tiles. Halve BLOCK_K (down to 32), then
    drop stages (down to 2), until they fit the target's shared memory / LDS. The interpreter has no limit."""
    t = target or _target.current()
    if not t.on_gpu or elem_bytes <= 2 or not isinstance(cfg, KernelConfig):
        return cfg
    limit = AMD_LDS_BYTES if t.vendor == "amd" else NVIDIA_SHARED_BYTES
    tiles = OPS[op].weight_tiles
    while staged_bytes(cfg, tiles, elem_bytes) > limit and (cfg.BLOCK_K > 32 or cfg.num_stages > 2):
        if cfg.BLOCK_K > 32:
            cfg = dataclasses.replace(cfg, BLOCK_K=cfg.BLOCK_K // 2, extra=dict(cfg.extra))
        else:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1, extra=dict(cfg.extra))
    return cfg


@functools.lru_cache(maxsize=8192)
def _choose(op: str, m: int, shape: str | None, elem_bytes: int, t: Target):
    return fit_shared(pick(list(table(op, shape, t).rows), m), op, elem_bytes, t)


def choose(op: str, m: int, shape: str | None = None, elem_bytes: int = 2, target: Target | str | None = None):
    """THE config chooser: the config of ``op`` for key value ``m`` (see ``OPS[op].key``), for a model shape,
    fitted to the target's shared memory for ``elem_bytes``-byte inputs. Cached: cheap on every call."""
    t = _target.current() if target is None else _target.parse(target)
    return _choose(op, int(m), shape, int(elem_bytes), t)


def clear_cache() -> None:
    """Forget loaded tables (tests that write tables, tuning scripts that replace them)."""
    _table.cache_clear()
    _choose.cache_clear()


def table_files(op: str, tables: Path | None = None) -> list[tuple[str, Path]]:
    """Every committed table of ``op``: ``(key, path)``, key = device slug, vendor or ``cpu``."""
    out = []
    for p in sorted(Path(tables or TABLES).glob(f"{op}.*.json")):
        out.append((p.name[len(op) + 1: -len(".json")], p))
    return out
