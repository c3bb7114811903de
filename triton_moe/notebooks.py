"""Exercises are generated from the solutions: ``solutions/`` is hand-edited, ``chapters/`` is written here.

Markers (nbgrader-compatible) inside a solution code cell::

    def moe_forward_loop(x, ...):
        ### BEGIN SOLUTION
        # HINT: loop over experts; gather the tokens that chose each one
        out = ...
        ### END SOLUTION

become, in the exercise::

    def moe_forward_loop(x, ...):
        # YOUR CODE HERE
        # HINT: loop over experts; gather the tokens that chose each one
        raise NotImplementedError("moe_forward_loop: not attempted yet. Hint: loop over experts; ...")

Inside an ``@triton.jit`` body, where ``raise`` does not compile, lines ``# STUB: <code>`` in the region
become the stub's code instead of the ``raise`` (e.g. ``# STUB: acc = tl.zeros(...)``), so the exercise
still compiles and runs; the checker recognises it by the ``YOUR CODE HERE`` marker and says "not
attempted". A whole cell between ``### BEGIN HIDDEN`` and ``### END HIDDEN`` lines is dropped.

Notebooks are committed without outputs (execution counts cleared), so regenerating is deterministic and
diffs stay readable. ``python -m triton_moe sync`` regenerates; ``tests/test_exercise_sync.py`` fails when
``chapters/`` is out of date.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

from .checking import STUB_MARKER

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
CHAPTERS = ROOT / "chapters"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN", "### END HIDDEN"
_HINT = re.compile(r"^\s*# HINT:\s?(.*)$")
_STUB = re.compile(r"^(\s*)# STUB:\s?(.*)$")
_DEF = re.compile(r"^\s*def\s+(\w+)\s*\(")


class MarkerError(ValueError):
    pass


def stub_region(region: list[str], indent: str, func: str) -> list[str]:
    hints = [m.group(1) for line in region if (m := _HINT.match(line))]
    stubs = [indent + m.group(2) for line in region if (m := _STUB.match(line))]
    out = [f"{indent}# {STUB_MARKER}"] + [f"{indent}# HINT: {h}" for h in hints]
    if stubs:
        return out + stubs
    msg = f"{func}: not attempted yet." + (f" Hint: {' '.join(hints)}" if hints else "")
    return out + [f"{indent}raise NotImplementedError({msg!r})"]


def strip_solutions(source: str, where: str = "") -> str:
    """Replace each BEGIN/END SOLUTION region with its stub; drop HIDDEN regions."""
    lines = source.split("\n")
    out: list[str] = []
    i = 0
    func = "this exercise"
    while i < len(lines):
        line = lines[i]
        if m := _DEF.match(line):
            func = m.group(1)
        stripped = line.strip()
        if stripped == HIDDEN_BEGIN:
            j = _find(lines, i + 1, HIDDEN_END, where)
            i = j + 1
            continue
        if stripped == BEGIN:
            j = _find(lines, i + 1, END, where)
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(stub_region(lines[i + 1: j], indent, func))
            i = j + 1
            continue
        if stripped in (END, HIDDEN_END):
            raise MarkerError(f"{where}: {stripped!r} without its BEGIN")
        out.append(line)
        i += 1
    return "\n".join(out)


def _find(lines, start, marker, where):
    for j in range(start, len(lines)):
        if lines[j].strip() == marker:
            return j
        if lines[j].strip() in (BEGIN, HIDDEN_BEGIN):
            raise MarkerError(f"{where}: nested markers before {marker!r}")
    raise MarkerError(f"{where}: no {marker!r} after line {start}")


def clean(nb):
    """No outputs, no execution counts: committed notebooks are deterministic."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def exercise_from_solution(nb):
    nb = nbformat.from_dict(nb)  # a copy
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, f"cell {k}")
        elif cell.cell_type == "markdown":
            cell.source = cell.source.replace("(solution)", "(exercise)")
    return clean(nb)


def dumps(nb) -> str:
    return nbformat.writes(nb) + ("" if nbformat.writes(nb).endswith("\n") else "\n")


def solution_paths() -> list[Path]:
    return sorted(SOLUTIONS.glob("[0-9][0-9]-*.ipynb"))


def generate(check_only: bool = False) -> list[str]:
    """Write chapters/ from solutions/. With ``check_only``, write nothing and return the stale files."""
    stale = []
    CHAPTERS.mkdir(exist_ok=True)
    wanted = set()
    for path in solution_paths():
        nb = nbformat.read(path, as_version=4)
        text = dumps(exercise_from_solution(nb))
        target = CHAPTERS / path.name
        wanted.add(target.name)
        if not target.exists() or target.read_text() != text:
            stale.append(str(target.relative_to(ROOT)))
            if not check_only:
                target.write_text(text)
    for extra in CHAPTERS.glob("[0-9][0-9]-*.ipynb"):
        if extra.name not in wanted:
            stale.append(f"{extra.relative_to(ROOT)} (no solution)")
    return stale


_TITLE = re.compile(r"^#\s*Chapter\s+(\d+)\b", re.I)


def chapter_of(path: Path) -> str | None:
    """The chapter a notebook belongs to: '01-moe-layer-and-naive-loop.ipynb' -> '01'. A renamed notebook
    (e.g. 'alice.ipynb') is recognised by its title cell '# Chapter 1 ...'. None if neither says."""
    name = Path(path).name
    if re.match(r"^\d\d-", name):
        return name[:2]
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:
        return None
    for cell in nb.cells[:3]:
        if cell.cell_type == "markdown" and (m := _TITLE.match(cell.source.strip())):
            return f"{int(m.group(1)):02d}"
    return None


# --------------------------------------------------------------------------------------------------
# Authoring helper: write a notebook from percent-format text ("# %%" code cells, "# %% [markdown]",
# '# %% tags=["skip-grading"]' for tagged code cells).


def from_percent(text: str):
    cells = []
    for chunk in re.split(r"^# %%", text, flags=re.M)[1:]:
        head, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if "[markdown]" in head:
            md = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.split("\n"))
            cells.append(nbformat.v4.new_markdown_cell(md))
        else:
            cell = nbformat.v4.new_code_cell(body)
            if m := re.search(r"tags=\[([^\]]*)\]", head):
                cell.metadata["tags"] = [t.strip().strip("'\"") for t in m.group(1).split(",") if t.strip()]
            cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def write_solution_from_percent(src: Path, dst: Path) -> None:
    dst.write_text(dumps(clean(from_percent(Path(src).read_text()))))
