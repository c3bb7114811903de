"""A solution cell that starts with '# mirrors: triton_moe/kernels/x.py' teaches code the package also ships:
each function it defines must be identical (same AST) to the package's, so they cannot drift apart."""
import ast

import nbformat
import pytest

from triton_moe.notebooks import ROOT, solution_paths


def mirrored_cells():
    for path in solution_paths():
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            first = cell.source.split("\n", 1)[0] if cell.cell_type == "code" else ""
            if first.startswith("# mirrors:"):
                yield pytest.param(path, cell.source, first.split(":", 1)[1].strip(), id=f"{path.name}-cell{i}")


def functions(src: str) -> dict:
    return {n.name: ast.dump(n) for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


cases = list(mirrored_cells())


@pytest.mark.skipif(not cases, reason="no mirrored cells yet")
@pytest.mark.parametrize("path,source,target", cases)
def test_mirrored_cell_matches_package(path, source, target):
    target_file = ROOT / target
    assert target_file.exists(), f"{path.name}: mirrors a missing file {target}"
    in_nb, in_pkg = functions(source), functions(target_file.read_text())
    assert in_nb, f"{path.name}: mirrored cell defines no function"
    for name, tree in in_nb.items():
        assert name in in_pkg, f"{path.name}: {name} is not defined in {target}"
        assert tree == in_pkg[name], f"{path.name}: {name} differs from {target}: edit both, or neither"
