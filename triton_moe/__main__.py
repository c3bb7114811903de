"""Command line: ``python -m triton_moe <command>``.

    info                          mode (CPU interpreter or GPU), versions, device
    check [NOTEBOOK ...]          check your chapter notebooks (default: chapters/*.ipynb) and print a table
                                  (--seed S replays every exercise whose printed seed is S; --exercise NAME)
    grade FOLDER --out CSV        grade a folder of submissions (teachers); --seed for unseen inputs, --jobs N
    sync [--check]                regenerate solution cells from the package, then chapters/ (or report what is stale)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m triton_moe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="mode, versions, device")
    c = sub.add_parser("check", help="check your notebooks")
    c.add_argument("notebooks", nargs="*", type=Path)
    c.add_argument("--seed", type=int, default=None, help="the inputs of every exercise (the seed a result printed)")
    c.add_argument("--exercise", action="append", default=None,
                   help="check only this exercise (name or chapter:name; repeatable)")
    c.add_argument("--timeout", type=float, default=600)
    c.add_argument("--jobs", type=int, default=1, help="notebooks checked at once")
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks into a CSV")
    g.add_argument("folder", type=Path)
    g.add_argument("--out", type=Path, default=Path("grades.csv"))
    g.add_argument("--seed", type=int, default=None, help="inputs the learners never saw (default: a random one, "
                                                          "written to the CSV)")
    g.add_argument("--timeout", type=float, default=600, help="seconds per notebook")
    g.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="notebooks graded at once (default: cores)")
    s = sub.add_parser("sync", help="regenerate solution cells from the package, then chapters/ from solutions/")
    s.add_argument("--check", action="store_true", help="only report stale solution cells and exercise notebooks")
    a = ap.parse_args(argv)

    if a.cmd == "info":
        from .mode import info

        for k, v in vars(info()).items():
            print(f"{k:15s} {v}")
        return 0
    if a.cmd == "check":
        from .grading import check_notebooks, format_table
        from .notebooks import CHAPTERS

        paths = a.notebooks or sorted(CHAPTERS.glob("[0-9][0-9]-*.ipynb"))
        rows = check_notebooks(paths, a.seed, a.timeout, a.jobs, set(a.exercise) if a.exercise else None)
        print(format_table(rows))
        return 0 if all(r["status"] == "passed" for r in rows) else 1
    if a.cmd == "grade":
        from .grading import grade_folder

        try:
            rows = grade_folder(a.folder, a.out, a.seed, a.timeout, a.jobs)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for r in rows:
            print(f"{r['submission']:30s} {r['total']}/{r['max_total']}")
        print(f"wrote {a.out}")
        return 0
    if a.cmd == "sync":
        from .notebooks import MarkerError, SourceError, generate

        try:
            stale = generate(check_only=a.check)
        except (MarkerError, SourceError) as exc:
            print(f"sync: {exc}", file=sys.stderr)
            return 1
        for s in stale:
            print(("stale: " if a.check else "wrote: ") + s)
        return 1 if (a.check and stale) else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
