"""One source for everything generated: solution cells marked with a package module are that module's code,
and chapters/ is generated from solutions/. Nothing generated may drift (run `python -m triton_moe sync`)."""
import re

import nbformat
import pytest

from triton_moe.checking import STUB_MARKER
from triton_moe.notebooks import (CHAPTERS, META_KEY, SOLUTIONS, MarkerError, SourceError, generate,
                                  generated_source, solution_paths, strip_solutions, sync_solution)


def test_nothing_generated_is_stale():
    stale = generate(check_only=True)
    assert not stale, ("generated notebook content is out of date (run `python -m triton_moe sync` and commit): "
                       + ", ".join(stale))


def code_cells(folder):
    for path in sorted(folder.glob("[0-9][0-9]-*.ipynb")):
        for k, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                yield path, k, cell


def test_package_code_is_generated_not_copied():
    """No hand-kept copies: the old `# mirrors:` cells are gone, and the kernel chapters show package code."""
    generated = {path.name for path, _, cell in code_cells(SOLUTIONS) if META_KEY in cell.metadata}
    for path, k, cell in code_cells(SOLUTIONS):
        assert not cell.source.startswith("# mirrors:"), f"{path.name} cell {k}: a hand-kept copy of package code"
    assert {"01", "02", "03", "04", "05", "06"} <= {name[:2] for name in generated}


_PRIVATE_IMPORT = re.compile(r"^\s*from\s+[\w.]+\s+import\s+(.*)$", re.M)


def test_notebooks_import_only_public_names():
    for folder in (SOLUTIONS, CHAPTERS):
        for path, k, cell in code_cells(folder):
            for names in _PRIVATE_IMPORT.findall(cell.source):
                private = [n for n in re.split(r"[\s,()]+", names) if n.startswith("_")]
                assert not private, f"{path.name} cell {k} imports private names {private}"


def test_exercises_carry_no_answer_pointers():
    for path, k, cell in code_cells(CHAPTERS):
        assert META_KEY not in cell.metadata, f"{path.name} cell {k}: generation metadata leaked into an exercise"
        assert "# mirrors:" not in cell.source and "triton_moe/kernels/" not in cell.source, \
            f"{path.name} cell {k}: points at the solution's file"


def test_generated_cell_has_header_and_exact_source():
    text, bound = generated_source("triton_moe.kernels.down_combine", ["SUM_BLOCK_N", "down_combine_kernel",
                                                                       "down_combine"])
    assert text.startswith("import torch\nimport triton\nimport triton.language as tl\n\nfrom triton_moe import validate\n")
    assert "from triton_moe.kernels.fused_gate_up import " in text      # where the module itself imports it
    assert "from triton_moe.kernels.down_combine import moe_sum_kernel" in text   # a name the module defines
    assert "\n\nSUM_BLOCK_N = 1024\n\n\n@triton.jit" in text and "\n\n\ndef down_combine(" in text
    assert bound == {"SUM_BLOCK_N", "down_combine", "down_combine_kernel"}   # what it shows
    again, _ = generated_source("triton_moe.kernels.down_combine", ["down_combine"], known=bound)
    assert "down_combine_kernel" not in again.split("def down_combine(")[0], \
        "a name an earlier generated cell shows is not imported (the exercise must use the learner's)"
    assert "from triton_moe import validate" in again, "other names are imported again: each cell stands alone"


def test_generated_cell_keeps_decorators_comments_and_closing_markers():
    text, _ = generated_source("triton_moe.kernels.grouped_gemm", ["grouped_gemm_kernel"])
    assert "@triton.jit\ndef grouped_gemm_kernel(" in text
    body = text.split("def grouped_gemm_kernel(", 1)[1]
    assert body.count("### BEGIN SOLUTION") == body.count("### END SOLUTION") > 0


def test_generated_cell_refuses_private_and_unknown_names():
    with pytest.raises(SourceError, match="private"):
        generated_source("triton_moe.kernels.fused_moe", ["_vendor"])
    with pytest.raises(SourceError, match="defines no top-level"):
        generated_source("triton_moe.kernels.fused_moe", ["no_such_function"])
    with pytest.raises(SourceError, match="exercise region"):
        generated_source("triton_moe.kernels.grouped_gemm", ["grouped_gemm"])  # needs the kernel: show it
    with pytest.raises(SourceError, match="no Python source"):
        generated_source("triton_moe.no_such_module", ["x"])


def test_sync_rewrites_a_marked_cell():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("stale text")])
    nb.cells[0].metadata[META_KEY] = {"from": "triton_moe.baselines", "show": ["route_topk"]}
    assert sync_solution(nb) == [(0, "triton_moe.baselines")]
    assert "def route_topk(" in nb.cells[0].source and sync_solution(nb) == []


def test_every_solution_has_an_exercise_region():
    for path in solution_paths():
        nb = nbformat.read(path, as_version=4)
        sync_solution(nb)
        assert any("### BEGIN SOLUTION" in c.source for c in nb.cells), f"{path.name} has no exercise"


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
    for folder in (SOLUTIONS, CHAPTERS):
        for path, _, cell in code_cells(folder):
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit without outputs"


def test_every_notebook_gives_the_same_instruction_for_the_stub():
    """README: replace the whole `# YOUR CODE HERE` block (the marker and the stub lines under it)."""
    for path in sorted(SOLUTIONS.glob("*.ipynb")):
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
        assert "remove the `# YOUR CODE HERE` line" not in text, f"{path.name}: say what the README says"
        assert "replace the whole `# YOUR CODE HERE` block (the" in text.replace("\n", " "), \
            f"{path.name}: say once what to replace, in the README's words"
