"""Compile every kernel for NVIDIA and AMD targets on a machine without a GPU (chapter 6).

Each kernel module exposes ``compile_specs() -> list[CompileSpec]``: one spec per kernel, config and
dtype. The check compiles each for sm_80, sm_90, gfx942 and gfx90a with ``triton.compile`` and
``GPUTarget`` and reads registers, spills and shared memory / LDS from the results.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompileSpec:
    name: str            # e.g. "grouped_gemm[BLOCK_M=16,...] bf16"
    fn: object           # the @triton.jit function
    signature: dict      # every parameter -> "*bf16", "*fp16", "*i32", "i32", "fp32", "constexpr", ...
    constexprs: dict     # values of the constexpr parameters
    num_warps: int = 4
    num_stages: int = 3
    options: dict = field(default_factory=dict)  # extra compiler options (AMD: waves_per_eu, kpack, ...)
