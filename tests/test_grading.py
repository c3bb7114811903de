"""Teacher grading: every submission runs in its own subprocess with a timeout, so a wrong, a crashing
and a hanging submission cost only their own points. Also the learner's check table."""
import csv
import json
import shutil

import nbformat
import pytest

from notebook_helpers import notebook
from triton_moe.grading import check_notebooks, format_table, grade_folder


def _variant(src_path, dst, replace=None, append=None):
    nb = nbformat.read(src_path, as_version=4)
    if replace:
        old, new = replace
        hits = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert len(hits) == 1
        hits[0].source = hits[0].source.replace(old, new)
    if append:
        nb.cells.insert(2, nbformat.v4.new_code_cell(append))
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)


@pytest.mark.slow
def test_grade_folder_with_correct_wrong_crashing_and_hanging_submissions(tmp_path):
    sol = notebook("solutions", "00")
    subs = tmp_path / "subs"
    _variant(sol, subs / "alice" / sol.name)                                      # correct
    _variant(sol, subs / "bob" / sol.name, replace=("a * x + b, mask=mask)", "a * x - b, mask=mask)"))  # wrong
    _variant(sol, subs / "carol" / sol.name, append="import os\nos.abort()")      # crashes the interpreter
    _variant(sol, subs / "dave" / sol.name, append="while True:\n    pass")        # hangs
    out = tmp_path / "grades.csv"
    grade_folder(subs, out, seed=1234, timeout=45)
    rows = {r["submission"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"alice", "bob", "carol", "dave"}
    assert rows["alice"]["00:axpb"] == "1" and rows["alice"]["total"] == "1" and rows["alice"]["max_total"] == "1"
    assert rows["bob"]["00:axpb"] == "0" and "relative error" in rows["bob"]["notes"]
    assert rows["carol"]["00:axpb"] == "0" and "crashed" in rows["carol"]["notes"]
    assert rows["dave"]["00:axpb"] == "0" and "timed out" in rows["dave"]["notes"]


@pytest.mark.slow
def test_learner_check_table_and_teacher_seed(tmp_path):
    ex = notebook("chapters", "00")
    sol = notebook("solutions", "00")
    rows = check_notebooks([ex, sol], seed=99)
    table = format_table(rows)
    assert "not attempted" in table and "passed" in table and "1 of 2 exercises passed" in table
    # the teacher's seed fixes the inputs: the same seed gives the same per-check seeds
    again = check_notebooks([sol], seed=99)
    assert again[0]["seed"] == rows[1]["seed"]


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        grade_folder(tmp_path, tmp_path / "g.csv")
