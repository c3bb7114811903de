"""Learner check and teacher grading (the threat model: docs/grading.md).

The score is decided here, in the grading parent: the course's checkers run in this process with the
grader's seed, inputs and float64 references, and call the learner's functions through proxies
(:mod:`triton_moe.sandbox`) that run them in a child process holding only the notebook's code and a private
copy of the package. A crash, a hang, an exit or garbage from the child costs only the exercise it
happened in (the child is restarted for the next one).

    python -m triton_moe check                   # your notebooks in chapters/
    python -m triton_moe check chapters/03-grouped-gemm.ipynb --exercise grouped_gemm --seed 1234   # replay
    python -m triton_moe grade submissions/ --out grades.csv --seed 1234 --jobs 4

Seeds: every exercise of a run gets the same seed (the one printed), so ``--seed S`` replays any exercise
whose printed seed is S.
"""
from __future__ import annotations

import atexit
import csv
import hashlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .checking import FAILED, NOT_ATTEMPTED, PASSED, REGISTRY
from .reference import new_seed

DEFAULT_TIMEOUT = 600  # seconds per notebook
SKIP_TAG = "skip-grading"  # cell tag: plots, timing tables and demos the grader and tests need not run
ROOT = Path(__file__).resolve().parent.parent


def _exercises(chapter: str):
    from . import checks  # noqa: F401  (registers all)

    return [ex for ex in REGISTRY.values() if ex.chapter == chapter]


def _strip_magics(src: str) -> str:
    return "\n".join("pass  # " + line if line.lstrip().startswith(("%", "!")) else line for line in src.split("\n"))


# --------------------------------------------------------------------------------------------------
# In-process execution (tests and authoring; never for grading untrusted work)


_CELL_DIRS: list[str] = []


@atexit.register
def _remove_cell_dirs():
    for d in _CELL_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def code_cells(nb, skip_tags=(SKIP_TAG,)) -> list[tuple[int, str]]:
    """[(cell number, 1-based position in the notebook, source)] of the code cells to run."""
    return [(i + 1, c.source) for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and not set(skip_tags) & set(c.metadata.get("tags", []))]


def exec_notebook(path: Path, replace: list[tuple[str, str]] = (), skip_tags=(SKIP_TAG,),
                  stop_on_error: bool = False, grading: bool = True, on_cell=None) -> tuple[dict, list[str]]:
    """Execute a notebook's code cells in order in this process; return (namespace, cell errors).

    Each cell is written to a real file named after its cell first, so ``@triton.jit`` (which reads its
    function's source via ``inspect``) works as it does in Jupyter and errors name "cell N, line L". The
    files are removed when the process exits. ``replace`` plants bugs for tests: each (old, new) must occur
    exactly once in the notebook's code. Cells tagged ``skip-grading`` are skipped. With ``grading`` the
    notebook's own check cells do nothing (the caller runs the checkers)."""
    from .checking import learner_location

    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb, skip_tags)
    for old, new in replace:
        hits = sum(src.count(old) for _, src in cells)
        if hits != 1:
            raise ValueError(f"replace: {old!r} occurs {hits} times in {path}, expected exactly once")
        cells = [(n, src.replace(old, new)) for n, src in cells]
    ns: dict = {"__name__": "__main__", "display": print}
    errors = []
    saved = os.environ.get("TRITON_MOE_GRADING")
    if grading:
        os.environ["TRITON_MOE_GRADING"] = "1"
    tmp = tempfile.mkdtemp(prefix="triton_moe_cells_")
    _CELL_DIRS.append(tmp)
    try:
        for i, (number, src) in enumerate(cells):
            if on_cell:
                on_cell(i, src)
            f = Path(tmp) / f"{Path(path).stem}_cell_{number:02d}.py"
            f.write_text(_strip_magics(src))
            try:
                exec(compile(f.read_text(), str(f), "exec"), ns)
            except BaseException as exc:  # noqa: BLE001  (a learner's SystemExit must not end grading)
                if isinstance(exc, KeyboardInterrupt) or stop_on_error:
                    raise
                text, _ = learner_location(exc)
                errors.append(f"cell {number}: {text}")
    finally:
        if saved is None:
            os.environ.pop("TRITON_MOE_GRADING", None)
        else:
            os.environ["TRITON_MOE_GRADING"] = saved
    return ns, errors


# --------------------------------------------------------------------------------------------------
# Reading submissions (everything is read into memory before any learner code runs)


_TITLE = re.compile(r"^#\s*Chapter\s+(\d+)\b", re.I)


class NotANotebook(ValueError):
    pass


@dataclass
class Notebook:
    path: Path              # where it was found (for messages only: its bytes are in ``data``)
    shown: str              # the name in notes ("lena/01-x.ipynb")
    data: bytes
    nb: object
    chapter: str | None

    @property
    def cells(self):
        return code_cells(self.nb)


def read_notebook(path: Path, shown: str | None = None, data: bytes | None = None) -> Notebook:
    path = Path(path)
    try:
        data = path.read_bytes() if data is None else data
    except OSError as exc:
        raise NotANotebook(f"unreadable ({exc.strerror})") from None
    if not data.strip():
        raise NotANotebook("empty file")
    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # noqa: BLE001
        raise NotANotebook(f"not a valid notebook ({type(exc).__name__}: {str(exc)[:80]})") from None
    chapter = None
    if re.match(r"^\d\d-", path.name):
        chapter = path.name[:2]
    else:
        for cell in nb.cells[:3]:
            if cell.cell_type == "markdown" and (m := _TITLE.match(cell.source.strip())):
                chapter = f"{int(m.group(1)):02d}"
                break
    return Notebook(path, shown or path.name, data, nb, chapter)


_COURSE_SCANS: dict = {}


def _course_scan(chapter: str):
    """The scan of the course's own exercise notebook of ``chapter`` (its stubs and its own flags)."""
    from .codescan import scan_cells

    if chapter not in _COURSE_SCANS:
        found = sorted((ROOT / "chapters").glob(f"{chapter}-*.ipynb"))
        _COURSE_SCANS[chapter] = scan_cells(code_cells(nbformat.read(found[0], as_version=4))) if found else None
    return _COURSE_SCANS[chapter]


def course_file(chapter: str) -> str | None:
    found = sorted((ROOT / "chapters").glob(f"{chapter}-*.ipynb"))
    return found[0].name if found else None


# --------------------------------------------------------------------------------------------------
# Grading one notebook


def _result(ex, status, message, hint="", seed=None, points=0):
    return {"exercise": ex.key, "status": status, "message": message, "hint": hint, "seed": seed,
            "points": points, "max_points": ex.points}


@dataclass
class Graded:
    results: list
    flags: list = field(default_factory=list)     # reasons to read the notebook (not scored)
    notes: list = field(default_factory=list)


def grade_notebook(nb: Notebook | Path, seed: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                   only: set | None = None, guard=None) -> Graded:
    """Grade one notebook: its code runs in a child process; the checkers run here. Never raises for
    anything the notebook does."""
    from .codescan import flag_notes, is_stub_source, scan_cells
    from .sandbox import CannotSend, CellInfo, Child, ChildDied, Proxy

    if not isinstance(nb, Notebook):
        try:
            nb = read_notebook(Path(nb))
        except NotANotebook as exc:
            return Graded([{"exercise": f"??:{Path(nb).name}", "status": FAILED, "seed": None, "points": 0,
                            "max_points": 0, "message": f"not a notebook ({exc})", "hint": ""}])
    seed = new_seed() if seed is None else seed
    if nb.chapter is None:
        return Graded([{"exercise": f"??:{nb.path.name}", "status": FAILED, "seed": seed, "points": 0,
                        "max_points": 0, "message": "cannot tell which chapter this notebook is",
                        "hint": "name it like the course's file (e.g. 01-moe-layer-and-naive-loop.ipynb) or keep "
                                "its '# Chapter N' title cell"}])
    exercises = [ex for ex in _exercises(nb.chapter) if only is None or ex.name in only or ex.key in only]
    if not exercises:
        return Graded([], notes=[f"{nb.shown}: chapter {nb.chapter} has no exercises (not graded)"])
    cells = nb.cells
    scan = scan_cells(cells)
    course = _course_scan(nb.chapter)
    flags = flag_notes(scan, course)
    stub_kernels = {k for k in scan.jit_kernels
                    if course is not None and k in course.functions and scan.functions.get(k) == course.functions[k]}
    first_lines = {n: next((ln.strip() for ln in src.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
                   for n, src in cells}
    names = [ex.name for ex in exercises]
    deadline = time.monotonic() + timeout
    results, child, ready, startup_failure = [], None, None, None
    if guard:
        guard.started(nb)
    try:
        for ex in exercises:
            if startup_failure:
                results.append(_result(ex, FAILED, startup_failure, seed=seed))
                continue
            if time.monotonic() >= deadline:
                results.append(_result(ex, FAILED, f"not run: the notebook used up its {timeout:g} s", seed=seed))
                continue
            if child is None or child.dead:
                if child is not None:
                    child.close()
                try:
                    child = Child([CellInfo(n, s) for n, s in cells], names, re.sub(r"\W", "_", nb.path.stem)[:40],
                                  nb.chapter, deadline)
                except Exception as exc:  # noqa: BLE001  (e.g. out of file descriptors or disk)
                    child, startup_failure = None, f"the grader could not start the notebook's process: {exc}"
                    results.append(_result(ex, FAILED, startup_failure, seed=seed))
                    continue
                child.learner_kernels, child.stub_kernels = scan.jit_kernels, stub_kernels
                child.first_lines = first_lines
                try:
                    ready = child.wait_ready()
                except ChildDied as exc:
                    startup_failure = _timed(exc.message, timeout)
                    results.append(_result(ex, FAILED, startup_failure, seed=seed))
                    continue
            info = ready["functions"].get(ex.name)
            if not isinstance(info, dict) or info.get("kind") not in ("function", "jit"):
                msg = f"no function named {ex.name!r} was defined"
                if ready["errors"]:
                    msg += f" (notebook errors: {ready['errors'][0][:300]})"
                results.append(_result(ex, NOT_ATTEMPTED, msg, "run the cell that defines it (and keep its name)", seed))
                continue
            child.exercise_calls = 0
            proxy = Proxy(child, ex.name, info)
            proxy._kind = info["kind"]
            untouched = any(is_stub_source(scan.sources.get(n)) for n in (ex.name, *ex.kernels))
            try:
                r = ex.run(proxy, seed, untouched=untouched)
            except ChildDied as exc:
                results.append(_result(ex, FAILED, _timed(exc.message, timeout),
                                       "the crash is yours to find: an out-of-bounds access in a kernel (mask every "
                                       "load and store), an exit, or a process kill", seed))
                continue
            except CannotSend as exc:
                results.append(_result(ex, FAILED, f"the checker failed: {exc}", seed=seed))
                continue
            except Exception as exc:  # noqa: BLE001  (a checker bug must not cost the other exercises)
                results.append(_result(ex, FAILED, f"the checker failed: {type(exc).__name__}: {exc}", seed=seed))
                continue
            results.append(_result(ex, r.status, r.message, r.hint, r.seed, ex.points if r.passed else 0))
    finally:
        if child is not None:
            child.close()
        if guard:
            guard.finished(nb)
    return Graded(results, flags=flags)


def _timed(message: str, timeout: float) -> str:
    if "process timed out" not in message:
        return message
    return message.replace("process timed out", f"process timed out after {timeout:g} s", 1) + \
        " (an endless loop, or far too large a grid?)"


# --------------------------------------------------------------------------------------------------
# Learner check


def _prepare(chapters) -> None:
    """Everything a child's start reads from the repository, read before any learner code runs (a submission
    that changes the package cannot change what a later one is given)."""
    from .sandbox import module_chapters_cached, private_package

    module_chapters_cached()
    for ch in chapters:
        private_package(ch)
        _course_scan(ch)


def check_notebooks(paths: list[Path], seed: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                    jobs: int = 1, only: set | None = None) -> list[dict]:
    seed = new_seed() if seed is None else seed
    _prepare(sorted({Path(p).name[:2] for p in paths if re.match(r"^\d\d-", Path(p).name)}))

    def one(p):
        print(f"checking {Path(p).name} ...", file=sys.stderr, flush=True)
        g = grade_notebook(Path(p), seed, timeout, only)
        for note in g.notes:
            print(f"  {note}", file=sys.stderr, flush=True)
        return [{"notebook": Path(p).name, "path": str(p), **r} for r in g.results]

    from .sandbox import end_of_run

    try:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            return [r for rows in pool.map(one, paths) for r in rows]
    finally:
        end_of_run()


def replay_command(row: dict) -> str:
    ch, name = row["exercise"].split(":", 1)
    path = str(row.get("path", row.get("notebook", "")))
    try:
        rel = os.path.relpath(path)
        path = rel if not rel.startswith("..") else path
    except ValueError:
        pass
    return f"./course check {path} --exercise {name} --seed {row['seed']}"


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
    failed = [r for r in rows if r["status"] == FAILED and r.get("seed") is not None and ":" in r["exercise"]
              and not r["exercise"].startswith("??")]
    if failed:
        lines.append("replay a failure with its inputs: " + replay_command(failed[0]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The repository's files: a submission that changes them is flagged and they are restored


WATCHED = ("triton_moe", "solutions", "chapters", "tests", "course", "requirements.txt", "pyproject.toml")


class RepoGuard:
    """Snapshot of the repository's package, solutions, chapters and tests (in memory); after each
    notebook, changed files are restored and new files removed. With several notebooks running at once
    the change is blamed on all of them and they are graded again one at a time (:meth:`suspects`)."""

    def __init__(self, root: Path = ROOT):
        self.root = root
        self.snapshot = self._read()
        self.lock = threading.Lock()
        self.running: set = set()
        self.window: set = set()
        self.blamed: dict = {}       # notebook id -> changed files
        self.to_regrade: set = set()

    def _files(self):
        for name in WATCHED:
            p = self.root / name
            if p.is_file():
                yield p
            elif p.is_dir():
                for f in p.rglob("*"):
                    if f.is_file() and "__pycache__" not in f.parts and ".pytest_cache" not in f.parts \
                            and f.suffix != ".pyc":
                        yield f

    def _read(self) -> dict:
        out = {}
        for f in self._files():
            try:
                out[f] = f.read_bytes()
            except OSError:
                pass
        return out

    def restore(self) -> list[str]:
        changed = []
        now = {f: hashlib.sha256(f.read_bytes()).digest() for f in self._files() if f.is_file()}
        for f, data in self.snapshot.items():
            if now.get(f) != hashlib.sha256(data).digest():
                changed.append(str(f.relative_to(self.root)))
                try:
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(data)
                except OSError:
                    pass
        for f in now:
            if f not in self.snapshot:
                changed.append(str(f.relative_to(self.root)) + " (new)")
                try:
                    f.unlink()
                except OSError:
                    pass
        return changed

    def started(self, nb) -> None:
        with self.lock:
            self.running.add(id(nb))
            self.window.add(id(nb))

    def finished(self, nb) -> None:
        with self.lock:
            self.running.discard(id(nb))
            changed = self.restore()
            if changed:
                if len(self.window) == 1:
                    self.blamed[id(nb)] = changed
                else:
                    self.to_regrade |= self.window
            self.window = set(self.running)


# --------------------------------------------------------------------------------------------------
# Teacher grading


@dataclass
class Submission:
    name: str
    notebooks: list = field(default_factory=list)    # Notebook objects to grade
    notes: list = field(default_factory=list)
    is_folder: bool = False


def collect(folder: Path, exclude: tuple = ()) -> list[Submission]:
    """Every entry of ``folder`` becomes a submission (a row): a notebook file named after the learner, or a
    folder of the learner's notebooks (searched recursively). Rules, each leaving a note:

    - ``.ipynb`` in any letter case is a notebook; any other file is listed as ignored;
    - a notebook that cannot be read or parsed: "not a notebook"; one whose chapter cannot be told or has no
      exercises: noted, not graded;
    - two notebooks of one chapter for one learner: the one named exactly like the course's file is graded
      (else the one with the shortest name, then the first alphabetically); the others are noted;
    - a learner name used twice (``lena/`` and ``lena.ipynb``): both are graded, as rows ``lena/`` and
      ``lena.ipynb``, each noting the other;
    - notebooks in sub-folders of a learner's folder are graded and noted; Jupyter's ``.ipynb_checkpoints``
      copies are ignored (noted)."""
    folder = Path(folder)
    excluded = {os.path.realpath(p) for p in exclude}
    subs: list[Submission] = []
    for entry in sorted(folder.iterdir()):
        if os.path.realpath(entry) in excluded or entry.name.startswith("."):
            continue
        if entry.is_dir():
            sub = Submission(entry.name, is_folder=True)
            for f in sorted(entry.rglob("*")):
                rel = f.relative_to(entry).as_posix()
                if not f.is_file() or os.path.realpath(f) in excluded:
                    continue
                if ".ipynb_checkpoints" in f.parts:
                    sub.notes.append(f"ignored Jupyter checkpoint copy {rel}")
                elif f.suffix.lower() != ".ipynb":
                    sub.notes.append(f"ignored {rel} (not a .ipynb notebook)")
                else:
                    if "/" in rel:
                        sub.notes.append(f"found {rel} in a sub-folder")
                    _add(sub, f, f"{entry.name}/{rel}")
            subs.append(sub)
        elif entry.suffix.lower() == ".ipynb":
            sub = Submission(entry.stem)
            _add(sub, entry, entry.name)
            subs.append(sub)
        else:
            subs.append(Submission(entry.name, notes=[f"ignored {entry.name} (not a .ipynb notebook)"]))
    # the same learner twice
    by_name: dict = {}
    for s in subs:
        by_name.setdefault(s.name.lower(), []).append(s)
    for same in by_name.values():
        if len(same) > 1:
            for s in same:
                s.name = s.name + ("/" if s.is_folder else next((p.path.suffix for p in s.notebooks), ""))
            shown = ", ".join(s.name for s in same)
            for s in same:
                s.notes.append(f"the learner name is used {len(same)} times ({shown}): graded separately")
    for s in subs:
        _choose_per_chapter(s)
    return subs


def _add(sub: Submission, path: Path, shown: str) -> None:
    try:
        nb = read_notebook(path, shown)
    except NotANotebook as exc:
        sub.notes.append(f"{shown}: not a notebook ({exc})")
        return
    if nb.chapter is None:
        sub.notes.append(f"{shown}: cannot tell which chapter this notebook is (name it like the course's file or "
                         "keep its '# Chapter N' title cell): not graded")
    elif not _exercises(nb.chapter):
        sub.notes.append(f"{shown}: chapter {nb.chapter} has no exercises: not graded")
    else:
        sub.notebooks.append(nb)


def _choose_per_chapter(sub: Submission) -> None:
    keep = []
    chapters = sorted({nb.chapter for nb in sub.notebooks})
    for ch in chapters:
        same = [nb for nb in sub.notebooks if nb.chapter == ch]
        exact = course_file(ch)
        same.sort(key=lambda nb: (nb.path.name != exact, nb.shown.count("/"), len(nb.path.name), nb.shown))
        keep.append(same[0])
        for other in same[1:]:
            why = "named like the course's file" if same[0].path.name == exact else "the shorter name"
            sub.notes.append(f"{other.shown}: a second chapter {ch} notebook, not graded (graded {same[0].shown}: {why})")
    sub.notebooks = keep


def _write_csv(path: Path, fieldnames: list, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def grade_folder(folder: Path, out_csv: Path, seed: int | None = None, timeout: float = DEFAULT_TIMEOUT,
                 jobs: int | None = None, guard: RepoGuard | None = None) -> list[dict]:
    folder, out_csv = Path(folder), Path(out_csv)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} is not a folder")
    subs = collect(folder, exclude=(out_csv,))
    if not any(p.suffix.lower() == ".ipynb" for p in folder.rglob("*")):
        raise ValueError(f"folder: no .ipynb submissions found in {folder}")
    seed = new_seed() if seed is None else seed
    guard = RepoGuard() if guard is None else guard
    chapters = sorted({nb.chapter for s in subs for nb in s.notebooks})
    _prepare(chapters)
    keys = [ex.key for c in chapters for ex in _exercises(c)]
    fieldnames = ["submission", *keys, "total", "max_total", "seed", "notes"]
    max_total = sum(REGISTRY[k].points for k in keys)
    graded: dict = {}           # id(notebook) -> Graded
    rows: dict = {}
    lock = threading.Lock()

    def row_of(sub: Submission, pending: bool = False) -> dict:
        row = {"submission": sub.name, "seed": seed, "max_total": max_total}
        notes = list(sub.notes)
        results = {}
        for nb in sub.notebooks:
            g = graded.get(id(nb))
            if g is None:
                continue
            for r in g.results:
                results[r["exercise"]] = r
            notes += [f"{n}" for n in g.notes]
            if g.flags:
                notes.append(f"FLAGGED {nb.shown}: " + "; ".join(g.flags[:12])
                             + (f"; ... {len(g.flags) - 12} more" if len(g.flags) > 12 else ""))
            if id(nb) in guard.blamed:
                notes.append(f"FLAGGED {nb.shown}: changed the course's files {', '.join(guard.blamed[id(nb)][:5])} "
                             "(restored): 0 points for it")
                for r in g.results:
                    results[r["exercise"]] = {**r, "points": 0}
        for k in keys:
            r = results.get(k)
            row[k] = r["points"] if r else 0
            if r is None:
                has = any(nb.chapter == k[:2] for nb in sub.notebooks)
                notes.append(f"{k}: not graded yet" if pending and has else f"{k}: not submitted")
            elif r["status"] != PASSED:
                hint = f" -- hint: {r['hint']}" if r.get("hint") else ""
                notes.append((f"{k}: {r['status']}: {r['message'][:300]}" + hint)[:500])
        row["total"] = sum(row[k] for k in keys)
        row["notes"] = " | ".join(notes)
        return row

    def flush():
        with lock:
            _write_csv(out_csv, fieldnames, [rows.get(s.name) or row_of(s, pending=True) for s in subs])

    flush()
    remaining = {s.name: len(s.notebooks) for s in subs}
    for s in subs:
        if not s.notebooks:
            rows[s.name] = row_of(s)
    work = [(s, nb) for s in subs for nb in s.notebooks]

    def one(item):
        s, nb = item
        print(f"grading {nb.shown} ...", file=sys.stderr, flush=True)
        try:
            g = grade_notebook(nb, seed, timeout, guard=guard)
        except Exception as exc:  # noqa: BLE001  (never lose the run)
            g = Graded([_result(ex, FAILED, f"the grader failed on it: {type(exc).__name__}: {exc}", seed=seed)
                        for ex in _exercises(nb.chapter)])
        with lock:
            graded[id(nb)] = g
            remaining[s.name] -= 1
            done = remaining[s.name] == 0
        if done:
            rows[s.name] = row_of(s)
        flush()

    from .sandbox import end_of_run

    try:
        with ThreadPoolExecutor(max(1, jobs or os.cpu_count() or 1)) as pool:
            list(pool.map(one, work))
        # A change to the repository while several notebooks ran: grade those again, one at a time.
        for s, nb in work:
            if id(nb) in guard.to_regrade:
                guard.to_regrade.discard(id(nb))
                one((s, nb))
                rows[s.name] = row_of(s)
    finally:
        end_of_run()  # the fork server and anything a child left behind
    flush()
    return [rows[s.name] for s in subs]
