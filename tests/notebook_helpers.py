"""Load a chapter's solution or exercise notebook into a namespace, optionally with a planted bug, and run
its checkers. Used by every chapter's checker tests."""
from __future__ import annotations

import functools
from pathlib import Path

from triton_moe.checking import REGISTRY
from triton_moe.grading import exec_notebook

ROOT = Path(__file__).resolve().parent.parent


def notebook(folder: str, chapter: str) -> Path:
    found = sorted((ROOT / folder).glob(f"{chapter}-*.ipynb"))
    assert found, f"no {folder}/{chapter}-*.ipynb"
    return found[0]


@functools.lru_cache(maxsize=None)
def _cached(folder: str, chapter: str):
    ns, errors = exec_notebook(notebook(folder, chapter))
    return ns, tuple(errors)


def solution_ns(chapter: str) -> dict:
    ns, errors = _cached("solutions", chapter)
    assert not errors, f"solution notebook {chapter} raised: {errors}"
    return ns


def exercise_ns(chapter: str) -> dict:
    return _cached("chapters", chapter)[0]


def planted_ns(chapter: str, *replace: tuple[str, str]) -> dict:
    """The solution notebook with each (old, new) replacement applied (each must match exactly once)."""
    ns, errors = exec_notebook(notebook("solutions", chapter), replace=list(replace))
    return ns


def check(key: str, ns: dict, seed: int | None = None):
    """Run exercise ``key`` ("01:moe_forward_loop") on the function of that name in ``ns``."""
    import triton_moe.checks  # noqa: F401

    ex = REGISTRY[key]
    return ex.run(ns.get(ex.name), seed, ns)
