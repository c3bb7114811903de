"""Launch configurations from a table keyed by problem size, never from autotune.

Why a table: ``triton.autotune`` with several configs needs a GPU driver (it fails on the CPU
interpreter), it hides which config ran, and a CUDA graph needs the choice fixed before capture.
A table is explicit, printable, committed next to the measurements that chose it, and the tuning
scripts write it.

A table maps the largest M a row is meant for to a config; :func:`pick` takes the first row whose
bound is >= M (the last row serves everything larger).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


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


ConfigTable = list  # [(max_M, KernelConfig), ...] sorted by max_M


def pick(table: ConfigTable, M: int) -> KernelConfig:
    if not table:
        raise ValueError("config table is empty")
    for max_m, cfg in table:
        if M <= max_m:
            return cfg
    return table[-1][1]


def save_table(table: ConfigTable, path: str | Path, meta: dict | None = None) -> None:
    rows = [{"max_M": m, **asdict(c)} for m, c in table]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta or {}, "table": rows}, indent=1) + "\n")


def load_table(path: str | Path) -> ConfigTable:
    data = json.loads(Path(path).read_text())
    out = []
    for row in data["table"]:
        m = row.pop("max_M")
        out.append((m, KernelConfig(**row)))
    return sorted(out, key=lambda r: r[0])
