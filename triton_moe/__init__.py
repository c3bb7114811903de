"""triton-moe: a step-by-step course on a fast Mixture-of-Experts forward pass in pure Triton.

Importing the package decides CPU or GPU mode first (see :mod:`triton_moe.mode`): on a machine without
a GPU it sets ``TRITON_INTERPRET=1`` before any Triton kernel is defined. Import it before defining
kernels in a notebook.
"""
from . import mode  # noqa: F401  (must come first: sets TRITON_INTERPRET on CPU-only machines)
from .mode import MODE, ON_GPU, default_dtype, device  # noqa: F401

__version__ = "0.1.0"

# The course's final kernel, for kernel engineers: `from triton_moe import fused_moe`.
from .kernels.fused_moe import FusedMoEBlock, fused_experts, fused_moe  # noqa: E402,F401
