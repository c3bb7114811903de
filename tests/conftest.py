"""GPU tests are marked ``@pytest.mark.gpu`` and skip cleanly (with the reason) on CPU-only machines."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MPLBACKEND", "Agg")
# The GPU compile check of learner kernels after an interpreter pass (triton_moe/tools/learner_compile.py) costs a
# worker process per new kernel: off in tests unless they turn it on (tests/test_learner_compile.py does).
os.environ.setdefault("TRITON_MOE_COMPILE_CHECK", "0")

import triton_moe  # noqa: E402,F401  (decides the mode before any kernel is defined)
from triton_moe.mode import ON_GPU  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="GPU only: needs a CUDA or ROCm GPU (this run is in CPU interpreter mode)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
