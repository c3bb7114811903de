"""Chapter 6's example kernel: one tiled matmul, the same source for NVIDIA and AMD.

``tiled_matmul(a, w)`` computes ``a @ w.T`` with ``a: [M, K]`` and ``w: [N, K]`` (the ``[N, K]`` layout of
one expert's weight in the course's ``[E, N, K]`` stacks). It is the inner loop of every GEMM in the MoE
forward, small enough to read in one screen, and its launch config decides whether it fits a target:

- the shared memory (NVIDIA) / LDS (AMD) a config needs grows with ``num_stages * (BLOCK_M + BLOCK_N) *
  BLOCK_K * bytes``: H100 gives a block 227 KB, MI300X a workgroup 64 KB;
- the fp32 accumulator is ``BLOCK_M * BLOCK_N`` values spread over ``num_warps * warp_size`` threads: a
  warp is 32 threads on NVIDIA and a wavefront 64 on AMD, so the same ``num_warps`` gives each AMD thread
  half as many accumulator registers to hold.

Configs come from per-vendor tables (:mod:`triton_moe.vendor`): ``triton_moe/tables/tiled_matmul.<vendor>.json``.
``example_launches()`` launches it as each GPU would for the cross-compilation check
(:mod:`triton_moe.tools.crosscompile`); ``planted_*_launches()`` launch configs that must fail it (tests and
chapter 6).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs, validate
from ..configs import KernelConfig
from .grouped_gemm import grouped_launch_order

KERNEL = "tiled_matmul"
# Tables: tables/tiled_matmul.<device>.json (benchmarks/ch06_portability.py --tune), .<vendor>.json (chosen
# from the compile report), .cpu.json. This portable table (small tiles, 2 stages: fits any target) serves a
# GPU none of them covers.
_PORTABLE = ((64, KernelConfig(32, 64, 32, 8, 4, 2)), (1 << 30, KernelConfig(64, 64, 32, 8, 4, 2)))
configs.register(configs.Op(KERNEL, key="rows M of a", cpu=_PORTABLE, portable=_PORTABLE, amd_borrows=True))


@triton.jit
def tiled_matmul_kernel(a_ptr, w_ptr, c_ptr, M, N, K,
                        stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    # Grouped program order (chapter 3): GROUP_M row blocks share each column block of W while it is in L2.
    pid_m, pid_n = grouped_launch_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak      # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk      # [BLOCK_K, BLOCK_N] = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < k_left), other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def tiled_matmul(a: torch.Tensor, w: torch.Tensor, config: KernelConfig | None = None) -> torch.Tensor:
    """``a @ w.T`` for ``a: [M, K]``, ``w: [N, K]``; the config comes from this device's vendor table
    unless given. On the CPU (interpreter) use float16 or float32."""
    from ..mode import check_interpreter_dtype

    validate.tensor("a", a, ndim=2, dtypes=validate.FLOAT_DTYPES, nonempty=True, contiguous=False)
    validate.tensor("w", w, ndim=2, dtypes=validate.FLOAT_DTYPES, device=a.device, contiguous=False)
    validate.same_dtype(a=a, w=w)
    if w.shape[1] != a.shape[1]:
        raise ValueError(f"w must have shape [N, {a.shape[1]}] (K of a), got {list(w.shape)}")
    check_interpreter_dtype("tiled_matmul", a.dtype)
    M, K = a.shape
    N = w.shape[0]
    cfg = config or configs.choose(KERNEL, M)
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    tiled_matmul_kernel[grid](a, w, c, M, N, K, a.stride(0), a.stride(1), w.stride(0), w.stride(1),
                              c.stride(0), c.stride(1), **cfg.meta())
    return c


# --------------------------------------------------------------------------------------------------
# Example launches (for the compile check, triton_moe/tools/crosscompile.py; chapter 6)

EXAMPLE_NK = 4096  # N and K of the example launches (multiples of 16, as every model shape in the course)


def _launch(M: int, config: KernelConfig | None = None, dtype=torch.bfloat16):
    a = torch.empty(M, EXAMPLE_NK, dtype=dtype, device="meta")
    w = torch.empty(EXAMPLE_NK, EXAMPLE_NK, dtype=dtype, device="meta")
    return lambda: tiled_matmul(a, w, config)


def example_launches() -> list:
    """:func:`tiled_matmul` on ``meta`` tensors at the largest M of every row of every table of this kernel
    (4096 for the last), bf16 and fp16; the compile check simulates each GPU, so each runs the config its own
    table gives it (a device with its own table, such as the H100's, runs that one)."""
    from ..vendor import vendor_tables

    ms = sorted({min(4096, m) for _, _, _, table in vendor_tables(KERNEL) for m, _ in table})
    return [(f"M={M}", _launch(M, dtype=dtype)) for M in ms for dtype in (torch.bfloat16, torch.float16)]


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def specs_for_config(BLOCK_M: int, BLOCK_N: int, BLOCK_K: int, GROUP_M: int = 8, num_warps: int = 4,
                     num_stages: int = 2, extra: dict | None = None, dtype: str = "bf16", M: int = 4096) -> list:
    """One config as example launches, for compile-check sources like
    ``"triton_moe.kernels.portability_demo:specs_for_config|{json kwargs}"`` (chapter 6's checker)."""
    cfg = KernelConfig(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, dict(extra or {}))
    return [(f"chosen config, M={M}", _launch(M, cfg, _DTYPES[dtype]))]


# Configs that must fail the check, kept as lessons for chapter 6 and as tests of the check itself. What each
# does on each target is in docs/compile-report.md ("Lessons"); the tests prove the check rejects them.
SPILL_CONFIG = KernelConfig(BLOCK_M=256, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=2)
NVIDIA_SPILL_CONFIG = KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=4, num_stages=2)
LDS_OVERFLOW_CONFIG = KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
COMPILE_ERROR_CONFIG = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=8, num_warps=4, num_stages=2)


def planted_spill_launches() -> list:
    """A 256x256 fp32 accumulator over only 4 warps: 65536 values for 128 NVIDIA threads (512 each; a
    thread has at most 255 registers) or 256 AMD lanes (256 each, plus everything else). Spills everywhere."""
    return [("planted spill", _launch(4096, SPILL_CONFIG))]


def planted_nvidia_spill_launches() -> list:
    """128x256 over 4 warps: 256 accumulator registers per NVIDIA thread (spills), 128 per AMD lane, whose
    512 VGPRs (256 architectural + 256 accumulation) hold it. Spills on one vendor, not the other."""
    return [("planted spill on NVIDIA", _launch(4096, NVIDIA_SPILL_CONFIG))]


def planted_overflow_launches() -> list:
    """The NVIDIA table's large-M tile with 4 stages: 96-128 KB of shared memory. Fits an H100 block (227 KB)
    and an A100 block (163 KB), not the 64 KB LDS of an MI300X / MI250X workgroup."""
    return [("planted LDS overflow", _launch(4096, LDS_OVERFLOW_CONFIG))]


def planted_error_launches() -> list:
    """BLOCK_K=8: the interpreter runs it, but ``tl.dot`` needs K >= 16 on the GPU backends."""
    return [("planted compile error", _launch(4096, COMPILE_ERROR_CONFIG))]
