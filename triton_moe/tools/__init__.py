"""Tools that work on the kernels from outside: nothing in ``triton_moe.kernels`` imports this package.

- :mod:`triton_moe.tools.crosscompile`: compile every kernel's example launches for NVIDIA and AMD targets on
  a machine without a GPU (``python -m triton_moe.tools.crosscompile``; chapter 6 and CI).
- :mod:`triton_moe.tools.learner_compile`: compile a learner's ``@triton.jit`` kernels, as their checker
  launched them, for sm_90 and gfx942 after an interpreter pass.
"""
