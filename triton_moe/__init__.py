"""triton-moe: a step-by-step course on a fast Mixture-of-Experts forward pass in pure Triton.

Importing the package decides CPU or GPU mode first (see :mod:`triton_moe.mode`): on a machine without
a GPU it sets ``TRITON_INTERPRET=1`` before any Triton kernel is defined. Import it before defining
kernels in a notebook.
"""
from . import mode  # noqa: F401  (must come first: sets TRITON_INTERPRET on CPU-only machines)
from .mode import MODE, ON_GPU, default_dtype, device  # noqa: F401

__version__ = "0.1.0"
