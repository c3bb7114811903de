"""Notebooks are generated in two steps by ``python -m triton_moe sync`` (``--check``: only report what is stale).

1. **Solution cells from the package.** A code cell of ``solutions/`` with the metadata
   ``{"triton_moe": {"from": "triton_moe.kernels.grouped_gemm", "show": ["grouped_gemm_kernel", ...]}}``
   is rewritten from that module: an import header for the names the shown symbols use (where the module
   itself gets them: ``from .. import validate`` becomes ``from triton_moe import validate``, a name the module
   defines comes ``from <module> import name``; a name an earlier generated cell of the notebook shows is not
   imported, so an exercise uses the learner's own version), then each symbol's exact source (decorators and the comment lines right
   above it included; a module constant is a symbol too). The module is the only copy of the code; no
   private (``_name``) name may be shown or imported.
2. **Exercises from the solutions.** ``chapters/`` is written from ``solutions/``: markers (nbgrader-compatible)
   inside a solution code cell (in a package module, or in a hand-written cell)::

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
attempted". A whole cell between ``### BEGIN HIDDEN`` and ``### END HIDDEN`` lines is dropped. The
generation metadata does not reach the exercise. ``docs/authoring.md`` explains the scheme for authors.

Notebooks are committed without outputs (execution counts cleared), so regenerating is deterministic and
diffs stay readable. ``tests/test_exercise_sync.py`` fails when anything generated is out of date.
"""
from __future__ import annotations

import ast
import re
import sys
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
        cell.metadata.pop(META_KEY, None)  # where a cell was generated from is no business of the exercise
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
    """Regenerate the package-sourced cells of ``solutions/``, then write ``chapters/`` from them. With
    ``check_only``, write nothing and return what is stale (solution cells and exercise notebooks)."""
    stale = []
    CHAPTERS.mkdir(exist_ok=True)
    wanted = set()
    for path in solution_paths():
        nb = nbformat.read(path, as_version=4)
        changed = sync_solution(nb, path.name)
        if changed:
            stale.extend(f"{path.relative_to(ROOT)} cell {k} (from {m})" for k, m in changed)
            if not check_only:
                path.write_text(dumps(nb))
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


# --------------------------------------------------------------------------------------------------
# Solution cells generated from package modules

META_KEY = "triton_moe"


class SourceError(ValueError):
    """A generated cell cannot be built: unknown module or symbol, or a private name it would need."""


class ModuleSource:
    """The top-level statements of a module, by the names they bind."""

    def __init__(self, module: str):
        # The module of this checkout (not whatever copy sys.path finds first): solutions/ and it go together.
        base = ROOT.joinpath(*module.split("."))
        origin = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
        if not module.startswith("triton_moe") or origin is None:
            raise SourceError(f"no Python source for module {module!r} in {ROOT}")
        self.module = module
        self.package = module if origin.name == "__init__.py" else module.rpartition(".")[0]
        self.text = origin.read_text()
        self.lines = self.text.split("\n")
        self.tree = ast.parse(self.text)
        self.defined: dict[str, ast.stmt] = {}      # name -> the def/class/assignment that binds it
        self.imported: dict[str, tuple] = {}        # name -> ("import", dotted, asname) | ("from", module, name)
        for node in self.tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.imported[a.asname or a.name.split(".")[0]] = ("import", a.name if a.asname else
                                                                       a.name.split(".")[0], a.asname)
            elif isinstance(node, ast.ImportFrom):
                if node.module == "__future__":
                    continue
                source = self._absolute(node.module, node.level)
                for a in node.names:
                    self.imported[a.asname or a.name] = ("from", source, a.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defined[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            self.defined[n.id] = node

    def _absolute(self, module: str | None, level: int) -> str:
        if not level:
            return module
        base = self.package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def segment(self, name: str) -> str:
        """The exact source of a top-level symbol: decorators, and the comment lines directly above it."""
        if name not in self.defined:
            raise SourceError(f"{self.module} defines no top-level {name!r}")
        node = self.defined[name]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while start > 0 and self.lines[start - 1].lstrip().startswith("#"):
            start -= 1
        end, indent = node.end_lineno, node.col_offset
        while end < len(self.lines) and self.lines[end].lstrip().startswith("#") and \
                len(self.lines[end]) - len(self.lines[end].lstrip()) > indent:
            end += 1  # comments that close the body (### END SOLUTION after a return) belong to it
        return "\n".join(self.lines[start: end])

    def free_names(self, name: str) -> list[str]:
        """Module-level names the symbol reads (in order of first use), minus those it binds itself."""
        node = self.defined[name]
        bound, used = set(), []
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                if isinstance(n.ctx, ast.Load):
                    used.append(n.id)
                else:
                    bound.add(n.id)
            elif isinstance(n, ast.arg):
                bound.add(n.arg)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not node:
                bound.add(n.name)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                if isinstance(n, ast.ImportFrom) and n.level:
                    raise SourceError(f"{self.module}.{name} has a relative import inside it: a notebook cell "
                                      "cannot run it (import at module level instead)")
                bound.update(a.asname or a.name.split(".")[0] for a in n.names)
        module_names = self.defined.keys() | self.imported.keys()
        return [u for u in dict.fromkeys(used) if u in module_names and u not in bound]


def _name_order(name: str):
    return (not name.isupper(), not name[:1].isupper(), name.lower())


def _from_line(module: str, names: list[str], width: int = 110) -> str:
    line = f"from {module} import {', '.join(names)}"
    if len(line) <= width:
        return line
    head = f"from {module} import ("
    lines, cur = [], head
    for n in names:  # isort's wrapping: a parenthesised list aligned after "("
        piece = n + ", "
        if len(cur) + len(piece) > width and cur.strip() not in (head.strip(), ""):
            lines.append(cur.rstrip())
            cur = " " * len(head)
        cur += piece
    return "\n".join(lines + [cur.rstrip(", ") + ")"])


def _section(module: str) -> int:
    top = module.split(".")[0]
    return 2 if top == "triton_moe" else (0 if top in sys.stdlib_module_names else 1)


def import_header(src: ModuleSource, names: list[str]) -> str:
    """``import``/``from ... import`` lines for names of ``src``, isort style: the standard library, other
    packages, then this one; in each, plain imports before ``from`` imports."""
    plain, froms = set(), {}
    for n in names:
        if n in src.imported:
            kind, where, real = src.imported[n]
            if kind == "import":
                plain.add((where, f"import {where} as {real}" if real else f"import {where}"))
                continue
            froms.setdefault(where, []).append(real if real == n else f"{real} as {n}")
        else:
            froms.setdefault(src.module, []).append(n)
    sections = []
    for sec in (0, 1, 2):
        lines = [line for where, line in sorted(plain) if _section(where) == sec]
        lines += [_from_line(m, sorted(froms[m], key=_name_order)) for m in sorted(froms) if _section(m) == sec]
        if lines:
            sections.append("\n".join(lines))
    return "\n\n".join(sections)


def generated_source(module: str, show: list[str], known: set[str] = frozenset(),
                     later: set[str] = frozenset()) -> tuple[str, set[str]]:
    """The source of a generated cell, and the names it shows. ``known``: names shown by earlier generated
    cells of the notebook (not imported: the notebook's own definition, the learner's in an exercise, is the
    one to use); ``later``: names a later generated cell shows
    (imported here as forward references, then replaced by the notebook's own definition)."""
    src = ModuleSource(module)
    for s in show:
        if s.startswith("_"):
            raise SourceError(f"{module}: {s!r} is private; give it a public name to show it in a notebook")
    needed = []
    for s in show:
        src.segment(s)  # raises for an unknown symbol
        needed += [n for n in src.free_names(s) if n not in show and n not in known and n not in needed]
    private = [n for n in needed if n.startswith("_")]
    if private:
        raise SourceError(f"{module}: the cell showing {show} would import private names {private}: make them "
                          "public in the package or show them too")
    exercises = [n for n in needed if n in src.defined and n not in later and BEGIN in src.segment(n)]
    if exercises:
        raise SourceError(f"{module}: the cell showing {show} would import {exercises}, which hold an exercise "
                          "region: show them (the learner writes them) instead of importing the solution")
    out, prev_def = import_header(src, needed), None
    for s in show:
        is_def = not isinstance(src.defined[s], (ast.Assign, ast.AnnAssign))
        if out:  # PEP 8: two blank lines around a def, one between the header and a constant
            out += "\n\n\n" if is_def or prev_def else ("\n\n" if prev_def is None else "\n")
        out += src.segment(s)
        prev_def = is_def
    return out, set(show)


def sync_solution(nb, where: str = "") -> list[tuple[int, str]]:
    """Rewrite the generated cells of a solution notebook in place; return (cell index, module) of those
    that changed."""
    changed, known = [], set()
    metas = [c.metadata.get(META_KEY) if c.cell_type == "code" else None for c in nb.cells]
    for k, cell in enumerate(nb.cells):
        meta = cell.metadata.get(META_KEY) if cell.cell_type == "code" else None
        if not meta:
            continue
        try:
            later = {n for m in metas[k + 1:] if m and m.get("from") == meta["from"] for n in m.get("show", ())}
            text, bound = generated_source(meta["from"], list(meta["show"]), known, later)
        except (KeyError, TypeError) as exc:
            raise SourceError(f"{where} cell {k}: metadata {META_KEY} needs 'from' and 'show' ({exc})") from None
        except SourceError as exc:
            raise SourceError(f"{where} cell {k}: {exc}") from None
        known |= bound
        if cell.source != text:
            cell.source = text
            changed.append((k, meta["from"]))
    return changed


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
