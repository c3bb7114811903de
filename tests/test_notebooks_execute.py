"""Every solution notebook executes top to bottom in a real Jupyter kernel (as a learner runs it)."""
import os
from pathlib import Path

import nbformat
import pytest

NotebookClient = pytest.importorskip("nbclient", reason="nbclient is not installed (e.g. on the offline GPU machine)").NotebookClient

from triton_moe.notebooks import solution_paths


@pytest.mark.slow
@pytest.mark.parametrize("path", solution_paths(), ids=lambda p: p.name)
def test_solution_notebook_executes(path: Path):
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "[FAIL]" not in text, f"a checker failed while executing {path.name}:\n{text[-3000:]}"
    assert "[TODO]" not in text, f"a solution in {path.name} is still a stub"
