"""The learner's check table, seed replay, error locations, crash containment and the grader's own failure
modes. The attacks of issue 11 are in tests/test_grading_attacks.py."""
import csv
import os
import tempfile

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
    """Issue 10 item 4: a crash costs only its exercise, and the message names the call that was running."""
    sol = notebook("solutions", "01")
    nb = tmp_path / "frank" / sol.name
    _variant(sol, nb, replace=("    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)\n    for e",
                               "    import os; os.abort()\n    out = None\n    for e"))
    rows = {r["exercise"]: r for r in check_notebooks([nb], seed=5)}
    assert rows["01:route_topk"]["status"] == "passed"
    msg = rows["01:moe_forward_loop"]["message"]
    assert rows["01:moe_forward_loop"]["status"] == "failed"
    assert "crashed during call 1: moe_forward_loop(tensor[" in msg and "SIGABRT" in msg


@pytest.mark.slow
def test_seed_replays_a_second_exercise_and_errors_name_the_learners_line(tmp_path):
    """Issue 10 items 5 and 6: every exercise gets the printed seed, so `check --exercise NAME --seed S` sees the
    same inputs; an error inside an interpreted @triton.jit kernel names the learner's cell and line."""
    log = tmp_path / "inputs.log"
    sol1 = notebook("solutions", "01")
    nb1 = tmp_path / sol1.name
    _variant(sol1, nb1, replace=("    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)\n",
                                 f"    open({str(log)!r}, 'a').write(repr(float(x.double().sum())) + '\\n')\n"
                                 "    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)\n"))
    sol0 = notebook("solutions", "00")
    nb0 = tmp_path / "bug" / sol0.name
    _variant(sol0, nb0, replace=("a * x + b, mask=mask)", "a * x + b + tl.zeros((BLOCK, 2), tl.float32), mask=mask)"))
    rows = check_notebooks([nb1, nb0], seed=777, jobs=2)
    by = {r["exercise"]: r for r in rows}
    assert by["01:moe_forward_loop"]["seed"] == by["01:route_topk"]["seed"] == 777
    first = log.read_text().splitlines()
    again = check_notebooks([nb1], seed=777, only={"moe_forward_loop"})
    assert [r["exercise"] for r in again] == ["01:moe_forward_loop"] and again[0]["status"] == "passed"
    assert log.read_text().splitlines()[len(first):] == first   # the same inputs, call by call
    msg = by["00:axpb"]["message"]
    assert by["00:axpb"]["status"] == "failed"
    assert "cell 4, line" in msg and "tl.zeros((BLOCK, 2), tl.float32)" in msg, msg
    assert "__call__" not in msg and "interpreter.py" not in msg
    table = format_table(rows)
    assert "./course check" in table and "--seed 777" in table


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


def test_the_csv_is_complete_even_when_the_grader_itself_fails(tmp_path, monkeypatch):
    import triton_moe.grading as grading

    sol = notebook("solutions", "00")
    _variant(sol, tmp_path / "subs" / "amy" / sol.name)
    _variant(sol, tmp_path / "subs" / "ben.ipynb")

    def broken(*a, **k):
        raise RuntimeError("a bug in the grader")

    monkeypatch.setattr(grading, "grade_notebook", broken)
    out = tmp_path / "g.csv"
    grade_folder(tmp_path / "subs", out, seed=3, jobs=2, guard=grading.RepoGuard(tmp_path / "norepo"))
    rows = {r["submission"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"amy", "ben"} and all(r["00:axpb"] == "0" for r in rows.values())
    assert all("the grader failed on it: RuntimeError: a bug in the grader" in r["notes"] for r in rows.values())


def test_exec_notebook_leaves_no_cell_files(tmp_path):
    import glob
    import triton_moe.grading as grading

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "triton_moe_cells_*")))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("y = 1 + 1")])
    nbformat.write(nb, tmp_path / "t.ipynb")
    ns, errors = grading.exec_notebook(tmp_path / "t.ipynb")
    assert ns["y"] == 2 and not errors
    grading._remove_cell_dirs()  # what runs at exit
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "triton_moe_cells_*"))) <= before


@pytest.mark.slow
def test_a_checker_that_launches_the_learners_kernel_itself(tmp_path, monkeypatch):
    """Checkers may take a @triton.jit kernel and launch it (``fn[grid](...)``): the proxy supports it, and a
    kernel the notebook defines counts as the learner's own."""
    import torch
    from triton_moe import checking
    from triton_moe.checking import CheckFailure, Exercise, compare, poisoned
    from triton_moe.grading import grade_notebook

    def check(fn, seed):
        x = torch.randn(300, generator=torch.Generator().manual_seed(seed))
        out = poisoned((300 + 128,), torch.float32, "cpu")
        with checking.record_launches() as seen:  # a checker sees the child's launches as its own
            fn[lambda meta: ((meta["n"] + meta["BLOCK"] - 1) // meta["BLOCK"],)](x, out, 2.0, 1.0, 300, BLOCK=128)
        assert [(la.name, la.origin) for la in seen] == [("axpb_kernel", "learner")], seen
        if not torch.isnan(out[300:]).all():
            raise CheckFailure("wrote past the end")
        compare("y", out[:300, None], (2.0 * x.double() + 1.0)[:, None], torch.float32)
        return ["n=300"]

    monkeypatch.setitem(checking.REGISTRY, "00:axpb_kernel", Exercise("00", "axpb_kernel", check))
    sol = notebook("solutions", "00")
    _variant(sol, tmp_path / "k" / sol.name)
    _variant(sol, tmp_path / "w" / sol.name, replace=("a * x + b, mask=mask)", "a * x - b, mask=mask)"))
    good = grade_notebook(tmp_path / "k" / sol.name, seed=11, timeout=120, only={"axpb_kernel"}).results
    assert [r["status"] for r in good] == ["passed"], good
    bad = grade_notebook(tmp_path / "w" / sol.name, seed=11, timeout=120, only={"axpb_kernel"}).results
    assert bad[0]["status"] == "failed" and "relative error" in bad[0]["message"]


def test_launch_rules():
    """Which kernel launches let a checked result count (the grader's child reports them as KernelLaunch)."""
    from triton_moe.checking import Exercise, KernelLaunch

    kernel_ex = Exercise("03", "grouped_gemm", lambda fn, seed: [], kernels=("grouped_gemm_kernel",))
    torch_ex = Exercise("01", "moe_forward_loop", lambda fn, seed: [])
    mine = KernelLaunch("grouped_gemm_kernel", "learner")
    assert kernel_ex.launch_problem(None, [mine]) == ""
    assert kernel_ex.launch_problem(None, [mine, KernelLaunch("dispatch_scatter_kernel", "course", "02")]) == ""
    assert "did not launch" in kernel_ex.launch_problem(None, [])
    assert "launched only dispatch_scatter_kernel" in kernel_ex.launch_problem(
        None, [KernelLaunch("dispatch_scatter_kernel", "course", "02")])
    assert "the course's kernel grouped_gemm_kernel" in kernel_ex.launch_problem(
        None, [mine, KernelLaunch("grouped_gemm_kernel", "course", "03")])
    assert "still the exercise's stub" in kernel_ex.launch_problem(None, [KernelLaunch("grouped_gemm_kernel", "learner",
                                                                                       stub=True)])
    assert "route_dispatch_kernel" in torch_ex.launch_problem(None, [KernelLaunch("route_dispatch_kernel", "course", "05")])
    assert torch_ex.launch_problem(None, []) == ""
