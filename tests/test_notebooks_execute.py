"""Every solution notebook executes top to bottom in a real Jupyter kernel, as a learner runs it: on the CPU
(interpreter, small shapes) and, marked ``gpu``, on a GPU with the checks at GPU shapes. A cell error, a
``[FAIL]`` or a ``[TODO]`` in the outputs fails the test. Set ``OUT`` to keep each notebook's text outputs.

On the offline GPU machine: ``. scripts/gpu_env.sh`` (installs the carried nbclient/ipykernel wheels), then
``python3 -m pytest -q -m gpu tests/test_notebooks_execute.py``."""
import os
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (carry its wheels: .whl/)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (carry its wheels: .whl/)")

from triton_moe.mode import ON_GPU  # noqa: E402
from triton_moe.notebooks import ROOT, solution_paths  # noqa: E402


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for o in cell.outputs:
            kind = o.get("output_type")
            parts.append(o.get("text", "") if kind == "stream" else o.get("data", {}).get("text/plain", ""))
            if o.get("output_type") == "error":
                parts.append(f"{o.get('ename')}: {o.get('evalue')}")
    return "\n".join(parts)


def execute(path: Path, timeout: int) -> str:
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("MPLBACKEND", "Agg")
    # The kernel is another process: let it import this checkout's package, not an installed copy.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + paths)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell and the traceback, on any error
    finally:
        if os.environ.get("OUT"):
            log = Path(os.environ["OUT"]) / "notebooks" / f"{path.stem}.txt"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(outputs_text(nb))
    text = outputs_text(nb)
    assert "[FAIL]" not in text, f"a checker failed while executing {path.name}:\n{text[-3000:]}"
    assert "[TODO]" not in text, f"a solution in {path.name} is still a stub:\n{text[-3000:]}"
    return text


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="on a GPU the gpu-marked test below executes them")
@pytest.mark.parametrize("path", solution_paths(), ids=lambda p: p.name)
def test_solution_notebook_executes(path: Path):
    execute(path, timeout=600)


@pytest.mark.gpu
@pytest.mark.parametrize("path", solution_paths(), ids=lambda p: p.name)
def test_gpu_solution_notebook_executes(path: Path):
    text = execute(path, timeout=900)
    assert "[PASS]" in text, f"{path.name}: no checker reported [PASS] on the GPU:\n{text[-3000:]}"
