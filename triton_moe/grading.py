"""Learner check and teacher grading.

Each notebook runs in its own Python subprocess with a timeout: its code cells run in order (a failing
cell is recorded and the next one still runs), then the chapter's checkers run on the functions it
defined. A crash, a hang or a corrupted heap (the interpreter does not catch out-of-bounds accesses)
only costs that notebook its points.

    python -m triton_moe check                   # your notebooks in chapters/
    python -m triton_moe grade submissions/ --out grades.csv --seed 1234
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import nbformat

from .checking import FAILED, NOT_ATTEMPTED, REGISTRY

DEFAULT_TIMEOUT = 600  # seconds per notebook


def _exercises(chapter: str):
    from . import checks  # noqa: F401  (registers all)

    return [ex for ex in REGISTRY.values() if ex.chapter == chapter]


def _strip_magics(src: str) -> str:
    return "\n".join("pass  # " + line if line.lstrip().startswith(("%", "!")) else line for line in src.split("\n"))


SKIP_TAG = "skip-grading"  # cell tag: plots, timing tables and demos the grader and tests need not run


def exec_notebook(path: Path, replace: list[tuple[str, str]] = (), skip_tags=(SKIP_TAG,),
                  stop_on_error: bool = False, grading: bool = True, on_cell=None) -> tuple[dict, list[str]]:
    """Execute a notebook's code cells in order in this process; return (namespace, cell errors).

    Each cell is written to a real file first, so ``@triton.jit`` (which reads its function's source via
    ``inspect``) works as it does in Jupyter. ``replace`` plants bugs for tests: each (old, new) must
    occur exactly once in the notebook's code. Cells tagged ``skip-grading`` are skipped. With
    ``grading`` the notebook's own check cells do nothing (the caller runs the checkers)."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and not set(skip_tags) & set(c.metadata.get("tags", []))]
    sources = [c.source for c in cells]
    for old, new in replace:
        hits = sum(src.count(old) for src in sources)
        if hits != 1:
            raise ValueError(f"replace: {old!r} occurs {hits} times in {path}, expected exactly once")
        sources = [src.replace(old, new) for src in sources]
    ns: dict = {"__name__": "__main__", "display": print}
    errors = []
    saved = os.environ.get("TRITON_MOE_GRADING")
    if grading:
        os.environ["TRITON_MOE_GRADING"] = "1"
    try:
        _exec_cells(path, sources, ns, errors, stop_on_error, on_cell)
    finally:
        if saved is None:
            os.environ.pop("TRITON_MOE_GRADING", None)
        else:
            os.environ["TRITON_MOE_GRADING"] = saved
    return ns, errors


def _exec_cells(path, sources, ns, errors, stop_on_error, on_cell=None):
    tmp = Path(tempfile.mkdtemp(prefix="triton_moe_cells_"))
    for i, src in enumerate(sources):
        if on_cell:
            on_cell(i, src)
        f = tmp / f"{Path(path).stem}_cell_{i:02d}.py"
        f.write_text(_strip_magics(src))
        try:
            exec(compile(f.read_text(), str(f), "exec"), ns)
        except BaseException as exc:  # noqa: BLE001  (a learner's SystemExit must not end grading)
            if isinstance(exc, KeyboardInterrupt) or stop_on_error:
                raise
            errors.append(f"cell {i}: {type(exc).__name__}: {exc}")


def run_notebook_here(path: Path, seed: int | None, out: Path | None = None) -> list[dict]:
    """Runs in the child process: execute the notebook's code cells, then the chapter's checkers.
    With ``out``, results are written after every exercise and ``out.progress`` says what is running,
    so a crash keeps the points already earned and the parent can say where it crashed."""
    from .notebooks import chapter_of

    progress = Path(str(out) + ".progress") if out else None

    def stage(text):
        if progress:
            progress.write_text(text)

    def on_cell(i, src):
        first = next((line for line in src.splitlines() if line.strip() and not line.startswith("#")), "")
        stage(f"running code cell {i} ({first.strip()[:60]!r})")

    ns, cell_errors = exec_notebook(path, on_cell=on_cell)
    results = []
    for k, ex in enumerate(_exercises(chapter_of(path))):
        stage(f"checking {ex.key}")
        r = ex.run(ns.get(ex.name), None if seed is None else seed + 1000 * k, ns)
        d = {"exercise": ex.key, "status": r.status, "message": r.message, "hint": r.hint, "seed": r.seed,
             "points": ex.points if r.passed else 0, "max_points": ex.points}
        if not r.passed and cell_errors and r.status == NOT_ATTEMPTED and "no function" in r.message:
            d["message"] += f" (notebook errors: {cell_errors[0]})"
        results.append(d)
        if out:
            out.write_text(json.dumps(results))
    return results


def grade_notebook(path: Path, seed: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
    """Run one notebook in a fresh subprocess; never raises for anything the notebook does."""
    from .notebooks import chapter_of

    path = Path(path)
    chapter = chapter_of(path)
    if chapter is None:
        return [{"exercise": f"??:{path.name}", "status": FAILED, "seed": seed, "points": 0, "max_points": 0,
                 "message": "cannot tell which chapter this notebook is",
                 "hint": "name it like the course's file (e.g. 01-moe-layer-and-naive-loop.ipynb) or keep its "
                         "'# Chapter N' title cell"}]
    exercises = _exercises(chapter)
    if not exercises:
        return []
    env = dict(os.environ, TRITON_MOE_GRADING="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    if seed is not None:
        env["TRITON_MOE_SEED"] = str(seed)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        progress = Path(str(out) + ".progress")
        cmd = [sys.executable, "-m", "triton_moe.grading", "_run", str(path.resolve()), str(out)]
        if seed is not None:
            cmd.append(str(seed))
        try:
            proc = subprocess.run(cmd, env=env, cwd=path.resolve().parent, timeout=timeout,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            why = None if proc.returncode == 0 else f"the notebook crashed (exit code {proc.returncode})"
        except subprocess.TimeoutExpired:
            why = f"timed out after {timeout:g} s (an endless loop, or far too large a grid?)"
        done = json.loads(out.read_text()) if out.exists() else []
        if why is None and len(done) == len(exercises):
            return done
        where = f" while {progress.read_text()}" if progress.exists() else ""
        finished = {r["exercise"] for r in done}
        return done + [{"exercise": ex.key, "status": FAILED, "message": why + where, "hint": "", "seed": seed,
                        "points": 0, "max_points": ex.points} for ex in exercises if ex.key not in finished]


# --------------------------------------------------------------------------------------------------
# Learner check


def check_notebooks(paths: list[Path], seed: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
    rows = []
    for p in paths:
        print(f"checking {Path(p).name} ...", file=sys.stderr, flush=True)
        for r in grade_notebook(p, seed, timeout):
            rows.append({"notebook": Path(p).name, **r})
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("chapter", "exercise", "result", "first failing property / hint")
    body = []
    for r in rows:
        chapter, name = r["exercise"].split(":", 1)
        detail = r["message"] + (f" -- hint: {r['hint']}" if r["hint"] and r["status"] != "passed" else "")
        seed = f"seed {r['seed']}" if r.get("seed") is not None else ""
        body.append((chapter, name, r["status"], f"{detail} [{seed}]" if r["status"] != "passed" else seed))
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(3)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head[:3], widths)) + "  " + head[3]]
    lines.append("-" * min(120, len(lines[0]) + 30))
    for row in body:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row[:3], widths)) + "  " + row[3])
    passed = sum(r["status"] == "passed" for r in rows)
    lines.append(f"\n{passed} of {len(rows)} exercises passed")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Teacher grading


def submissions_in(folder: Path) -> dict[str, list[Path]]:
    """A submission is a notebook in ``folder`` or a sub-folder of notebooks (one per learner)."""
    subs: dict[str, list[Path]] = {}
    for entry in sorted(Path(folder).iterdir()):
        if entry.is_file() and entry.suffix == ".ipynb":
            subs[entry.stem] = [entry]
        elif entry.is_dir() and not entry.name.startswith("."):
            nbs = sorted(entry.glob("*.ipynb"))
            if nbs:
                subs[entry.name] = nbs
    return subs


def grade_folder(folder: Path, out_csv: Path, seed: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
    from .notebooks import chapter_of

    subs = submissions_in(folder)
    if not subs:
        raise ValueError(f"folder: no .ipynb submissions found in {folder}")
    table = []
    for name, nbs in subs.items():
        results = []
        for nb in nbs:
            results.extend(grade_notebook(nb, seed, timeout))
        table.append((name, {r["exercise"]: r for r in results}, {chapter_of(n) for n in nbs} - {None}))
    chapters = sorted(set().union(*(c for _, _, c in table)))
    keys = [ex.key for c in chapters for ex in _exercises(c)]
    rows = []
    for name, res, _ in table:
        row = {"submission": name, "seed": "" if seed is None else seed}
        notes = [f"{k[3:]}: {r['message']} ({r['hint']})" for k, r in res.items() if k.startswith("??:")]
        for k in keys:
            r = res.get(k)
            row[k] = r["points"] if r else 0
            if r is None:
                notes.append(f"{k}: not submitted")
            elif r["status"] != "passed":
                hint = f" -- hint: {r['hint']}" if r.get("hint") else ""
                notes.append((f"{k}: {r['status']}: {r['message'][:300]}" + hint)[:500])
        row["total"] = sum(row[k] for k in keys)
        row["max_total"] = sum(REGISTRY[k].points for k in keys)
        row["notes"] = " | ".join(notes)
        rows.append(row)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["submission", *keys, "total", "max_total", "seed", "notes"])
        w.writeheader()
        w.writerows(rows)
    return rows


def _child_main(argv: list[str]) -> None:
    path, out = Path(argv[0]), Path(argv[1])
    seed = int(argv[2]) if len(argv) > 2 else None
    try:
        results = run_notebook_here(path, seed, out)
    except Exception:
        traceback.print_exc()
        raise
    out.write_text(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: a learner's heap corruption must not turn a result into a crash


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        _child_main(sys.argv[2:])
