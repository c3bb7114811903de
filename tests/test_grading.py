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
    _variant(sol, subs / "erin.ipynb")          # a lone notebook named after the learner: found by its title
    out = tmp_path / "grades.csv"
    grade_folder(subs, out, seed=1234, timeout=45)
    rows = {r["submission"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"alice", "bob", "carol", "dave", "erin"}
    assert rows["erin"]["00:axpb"] == "1" and rows["alice"]["seed"] == "1234"
    assert rows["alice"]["00:axpb"] == "1" and rows["alice"]["total"] == "1" and rows["alice"]["max_total"] == "1"
    assert rows["bob"]["00:axpb"] == "0" and "relative error" in rows["bob"]["notes"]
    assert rows["carol"]["00:axpb"] == "0" and "crashed" in rows["carol"]["notes"]
    assert "os.abort" in rows["carol"]["notes"] or "import os" in rows["carol"]["notes"]  # names the cell
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


@pytest.mark.slow
def test_crash_while_checking_keeps_earlier_points(tmp_path):
    sol = notebook("solutions", "01")
    nb = tmp_path / "frank" / sol.name
    _variant(sol, nb, replace=("    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)\n    for e",
                               "    import os; os.abort()\n    out = None\n    for e"))
    rows = {r["exercise"]: r for r in check_notebooks([nb], seed=5)}
    assert rows["01:route_topk"]["status"] == "passed"
    assert rows["01:moe_forward_loop"]["status"] == "failed"
    assert "crashed" in rows["01:moe_forward_loop"]["message"] and "checking 01:moe_forward_loop" in rows["01:moe_forward_loop"]["message"]


def test_unrecognisable_notebook_is_reported_not_silently_zero(tmp_path):
    import nbformat as nbf

    nb = nbf.v4.new_notebook(cells=[nbf.v4.new_code_cell("x = 1")])
    nbf.write(nb, tmp_path / "mystery.ipynb")
    rows = check_notebooks([tmp_path / "mystery.ipynb"])
    assert rows[0]["status"] == "failed" and "cannot tell which chapter" in rows[0]["message"]


def test_correct_answer_that_kept_the_marker_passes():
    from triton_moe.checking import Exercise

    ns = {}
    import tempfile, pathlib
    f = pathlib.Path(tempfile.mkdtemp()) / "m.py"
    f.write_text("def f(x):\n    # YOUR CODE HERE\n    return x + 1\n")
    exec(compile(f.read_text(), str(f), "exec"), ns)

    def check(fn, seed):
        from triton_moe.checking import CheckFailure
        if fn(1) != 2:
            raise CheckFailure("f(1) should be 2")

    ex = Exercise("99", "f", check)
    assert ex.run(ns["f"], seed=1).passed
    f.write_text("def g(x):\n    # YOUR CODE HERE\n    return x\n")
    exec(compile(f.read_text(), str(f), "exec"), ns)
    r = ex.run(ns["g"], seed=1)
    assert r.status == "not attempted" and "delete that line" in r.message
