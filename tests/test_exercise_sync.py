"""Single source of truth: chapters/ is generated from solutions/ and must not drift."""
import pytest

from triton_moe.checking import STUB_MARKER
from triton_moe.notebooks import MarkerError, generate, solution_paths, strip_solutions


def test_chapters_are_generated_from_solutions():
    stale = generate(check_only=True)
    assert not stale, ("chapters/ is out of date with solutions/ (run `python -m triton_moe sync` and commit): "
                       + ", ".join(stale))


def test_every_solution_has_an_exercise_region():
    for path in solution_paths():
        text = path.read_text()
        assert "### BEGIN SOLUTION" in text, f"{path.name} has no exercise"


def test_host_stub_raises_with_hint():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    # HINT: add one\n    return x + 1\n    ### END SOLUTION\n"
    out = strip_solutions(src)
    assert STUB_MARKER in out and "return x + 1" not in out
    ns = {}
    exec(out, ns)
    with pytest.raises(NotImplementedError, match="f: not attempted yet. Hint: add one"):
        ns["f"](1)


def test_kernel_stub_uses_stub_lines_so_it_compiles():
    src = ("def k(x):\n    acc = 0\n    ### BEGIN SOLUTION\n    # STUB: acc = acc\n    acc = acc + x\n"
           "    ### END SOLUTION\n    return acc\n")
    out = strip_solutions(src)
    assert "acc = acc\n" in out and "raise" not in out and "acc + x" not in out


def test_hidden_regions_are_dropped_and_bad_markers_rejected():
    assert "secret" not in strip_solutions("a = 1\n### BEGIN HIDDEN\nsecret = 2\n### END HIDDEN\n")
    with pytest.raises(MarkerError):
        strip_solutions("### BEGIN SOLUTION\nx = 1\n")
    with pytest.raises(MarkerError):
        strip_solutions("x = 1\n### END SOLUTION\n")


def test_committed_notebooks_have_no_outputs():
    import nbformat

    from triton_moe.notebooks import CHAPTERS, SOLUTIONS

    for path in sorted(SOLUTIONS.glob("*.ipynb")) + sorted(CHAPTERS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit without outputs"
