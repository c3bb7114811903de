"""Grouped GEMM over sorted tokens (chapter 3): every expert's matmul in one launch.

``out[slot] = a[slot // a_rows_per_token] @ w[expert(slot)].T`` for every slot ``s = token * top_k + j`` that
the dispatch (:func:`triton_moe.kernels.dispatch.sorted_dispatch`) placed in a block of its expert.

- Each program computes one (block of BLOCK_M sorted rows, block of BLOCK_N output columns) tile. All rows of a
  block belong to one expert (the dispatch padded each expert's run to a multiple of BLOCK_M), so the program
  reads one expert id and one weight tile per K step.
- Rows are gathered straight from the unsorted activations: input row = slot // a_rows_per_token (top_k for the
  first projection on token activations; 1 when ``a`` already has one row per slot). No permuted copy.
- Weights are one stacked ``[E, N, K]`` tensor: expert e's tile starts at ``w + e * stride_we`` (int64: E*N*K
  exceeds 2**31 for DeepSeek-V3). No pointer tables (the interpreter cannot follow them).
- fp32 accumulation with ``tl.dot``; padding rows (the sentinel ``num_slots``) and the N and K tails masked;
  results written to row ``slot`` of ``out`` ([num_slots, N], slot order).
- Launch order: GROUP_M row blocks share a column block before moving on (the weight tile is then still in L2
  when the next row block of the same expert needs it).

Configs come from a table keyed by the number of GEMM rows ``num_slots = tokens * top_k`` (never autotune):
a CPU table with large tiles (the interpreter costs ~7 ms per program x K step) and a GPU table written by
``benchmarks/tune_grouped_gemm.py`` (``triton_moe/tables/grouped_gemm.nvidia.json``).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .. import configs, validate
from ..configs import KernelConfig
from ..mode import check_interpreter_dtype
from .dispatch import sorted_dispatch

TABLES = configs.TABLES

# Interpreter: few, large programs. BLOCK_K * BLOCK_N tiles small enough for AMD's 64 KiB LDS at 2 stages.
CPU_TABLE = [
    (64, KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=2)),
    (1 << 31, KernelConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=2)),
]

# GPU fallback when no tuned table exists for the vendor (AMD, or before the tuning run): decode wants a
# small BLOCK_M (few rows per expert: padding is wasted work) and a large BLOCK_K (long K loop, few rows).
DEFAULT_GPU_TABLE = [
    (32, KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)),
    (512, KernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)),
    (2048, KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)),
    (1 << 31, KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)),
]


@triton.jit
def grouped_launch_order(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block): GROUP_M row blocks walk a column block together."""
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def grouped_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
                        N, K, num_slots, a_rows_per_token,
                        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    pid_m, pid_n = grouped_launch_order(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
        return                                           # a block past the end of the padded runs
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_token_ids_ptr + offs_m)       # [BLOCK_M] slots, num_slots for padding rows
    row_ok = slots < num_slots
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    ### BEGIN SOLUTION
    # HINT: input row of a slot = slot // a_rows_per_token (a holds tokens, a slot is token * top_k + j).
    # HINT: a_ptrs: [BLOCK_M, BLOCK_K]; w_ptrs: [BLOCK_K, BLOCK_N] inside expert `expert`'s [N, K] matrix,
    # HINT: i.e. w_ptr + expert * stride_we + offs_n * stride_wn + offs_k * stride_wk (w is read transposed).
    a_rows = slots // a_rows_per_token
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    # STUB: a_ptrs = a_ptr + offs_m[:, None] * 0 + offs_k[None, :] * 0
    # STUB: w_ptrs = w_ptr + offs_n[None, :] * 0 + offs_k[:, None] * 0
    ### END SOLUTION
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        ### BEGIN SOLUTION
        # HINT: mask the loads: padding rows (row_ok), columns past N, and the K tail (offs_k < K - k0 * BLOCK_K),
        # HINT: with other=0.0 so masked elements add nothing; then acc = tl.dot(a, w, acc).
        k_ok = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, w, acc)
        # STUB: pass
        ### END SOLUTION
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    ### BEGIN SOLUTION
    # HINT: write row `slot` (not the sorted row) of out; skip padding rows and columns past N.
    # HINT: (row offsets in int64: M * top_k * N can pass 2**31 at prefill sizes)
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))
    # STUB: pass
    ### END SOLUTION


# Keyed by the GEMM rows num_slots = tokens * top_k. The tuned NVIDIA table (grouped_gemm.nvidia.json,
# benchmarks/tune_grouped_gemm.py) was tuned on an H100 and runs on Hopper and newer: on sm_80 (A100) its
# 128x256 8-warp tile spills registers (docs/compile-report.md), so older NVIDIA GPUs, and AMD GPUs until a
# grouped_gemm.amd.json is tuned, run DEFAULT_GPU_TABLE.
TUNED_MIN_SM = 90
configs.register(configs.Op("grouped_gemm", key="GEMM rows num_slots = tokens * top_k", cpu=tuple(CPU_TABLE),
                            portable=tuple(DEFAULT_GPU_TABLE), nvidia_min_sm=TUNED_MIN_SM))


def gpu_table_for(target: str):
    """The table a GPU of compile target ``target`` (``"sm_90"``, ``"sm_80"``, ``"gfx942"``, ...) runs."""
    return list(configs.table("grouped_gemm", target=target).rows)


def config_table():
    """The table this machine uses (CPU_TABLE in interpreter mode)."""
    return list(configs.table("grouped_gemm").rows)


def pick_config(num_slots: int) -> KernelConfig:
    """Config for a grouped GEMM of ``num_slots = tokens * top_k`` rows. Run the dispatch with its BLOCK_M."""
    return configs.choose("grouped_gemm", num_slots)


def grouped_gemm(a, w, sorted_token_ids, expert_ids, num_tokens_post_padded, a_rows_per_token, config=None,
                 out=None):
    """``out[slot] = a[slot // a_rows_per_token] @ w[expert of slot].T`` for the slots of a sorted dispatch.

    a: [rows, K]; w: [E, N, K] (stacked, same dtype); the dispatch tensors of
    :func:`triton_moe.kernels.dispatch.sorted_dispatch` built with ``block_m == config.BLOCK_M`` for
    ``num_slots = a.shape[0] * a_rows_per_token`` slots. ``config=None`` takes :func:`pick_config` (with the
    dispatch's BLOCK_M). ``out`` ([num_slots, N], a's dtype) may be passed, e.g. a buffer a CUDA graph reuses.
    Returns out [num_slots, N] in slot order (slot = token * top_k + j)."""
    validate.tensor("a", a, ndim=2, dtypes=validate.FLOAT_DTYPES, nonempty=True)
    validate.tensor("w", w, ndim=3, dtypes=validate.FLOAT_DTYPES, device=a.device)
    validate.same_dtype(a=a, w=w)
    check_interpreter_dtype("grouped_gemm", a.dtype)
    E, N, K = w.shape
    if a.shape[1] != K:
        raise ValueError(f"a has {a.shape[1]} columns but w is [E, N, K] = {list(w.shape)}: K must match")
    validate.tensor("sorted_token_ids", sorted_token_ids, ndim=1, dtypes=(torch.int32,), device=a.device)
    validate.tensor("expert_ids", expert_ids, ndim=1, dtypes=(torch.int32,), device=a.device, nonempty=True)
    validate.tensor("num_tokens_post_padded", num_tokens_post_padded, shape=(1,), dtypes=(torch.int32,),
                    device=a.device)
    if not isinstance(a_rows_per_token, int) or isinstance(a_rows_per_token, bool) or a_rows_per_token < 1:
        raise ValueError(f"a_rows_per_token must be a positive int (top_k, or 1), got {a_rows_per_token!r}")
    block_m, rem = divmod(sorted_token_ids.numel(), expert_ids.numel())
    if rem or block_m < 1:
        raise ValueError(f"sorted_token_ids ({sorted_token_ids.numel()}) must hold expert_ids.numel() "
                         f"({expert_ids.numel()}) blocks of BLOCK_M rows: pass the three dispatch outputs together")
    num_slots = a.shape[0] * a_rows_per_token
    if config is None:
        config = dataclasses.replace(pick_config(num_slots), BLOCK_M=block_m)
    if not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a triton_moe.configs.KernelConfig, got {type(config).__name__}")
    if config.BLOCK_M != block_m:
        raise ValueError(f"config.BLOCK_M={config.BLOCK_M} but the dispatch was built with block_m={block_m}: "
                         "run sorted_dispatch with the config's BLOCK_M")
    if out is None:
        out = torch.empty(num_slots, N, dtype=a.dtype, device=a.device)
    else:
        validate.tensor("out", out, shape=(num_slots, N), dtypes=(a.dtype,), device=a.device)
    grid = (expert_ids.numel() * triton.cdiv(N, config.BLOCK_N),)
    grouped_gemm_kernel[grid](
        a, w, out, sorted_token_ids, expert_ids, num_tokens_post_padded,
        N, K, num_slots, a_rows_per_token,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        **config.meta())
    return out


def moe_forward_grouped(x, topk_weights, topk_ids, w1, w3, w2, config=None):
    """The MoE layer from chapter 3's pieces: dispatch, three grouped GEMMs (gate, up, down), SwiGLU and the
    weighted sum in PyTorch. Chapters 4 and 5 fuse what is left in PyTorch here."""
    import torch.nn.functional as F

    M, k = topk_ids.shape
    cfg = config or pick_config(M * k)
    d = sorted_dispatch(topk_ids, w1.shape[0], cfg.BLOCK_M)
    gate = grouped_gemm(x, w1, *d, k, cfg)                    # [M * k, ffn], slot order
    up = grouped_gemm(x, w3, *d, k, cfg)
    h = F.silu(gate) * up                                     # in x's dtype, like torch._grouped_mm pipelines
    y = grouped_gemm(h, w2, *d, 1, cfg)                       # [M * k, hidden]: h has one row per slot
    return (y.view(M, k, -1).float() * topk_weights[:, :, None].float()).sum(dim=1).to(x.dtype)


def grouped_gemm_reference(a, w, topk_ids, a_rows_per_token):
    """float64 [num_slots, N]: row slot = a[slot // a_rows_per_token] @ w[topk_ids.flatten()[slot]].T."""
    experts = topk_ids.reshape(-1).long()
    rows = torch.arange(experts.numel(), device=a.device) // a_rows_per_token
    out = torch.zeros(experts.numel(), w.shape[1], dtype=torch.float64, device=a.device)
    for e in torch.unique(experts).tolist():
        sel = (experts == e).nonzero().flatten()
        out[sel] = a[rows[sel]].double() @ w[e].double().T
    return out


# --------------------------------------------------------------------------------------------------
# Example launches (for the compile check, triton_moe/tools/crosscompile.py; chapter 6)


def example_launches() -> list:
    """:func:`moe_forward_grouped` (dispatch, gate, up and down GEMMs; configs from the table of the GPU the
    compile check simulates, :func:`config_table`) on ``meta`` tensors for Mixtral-8x7B (the shape the
    tables are tuned for) at every batch size of the course, in bf16 and fp16. The CPU table is never
    compiled: only the interpreter runs it, and the interpreter compiles nothing."""
    from ..shapes import BATCH_SIZES, MODELS

    s = MODELS["mixtral"]
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        w13 = torch.empty(s.experts, s.ffn, s.hidden, dtype=dtype, device="meta")
        w2 = torch.empty(s.experts, s.hidden, s.ffn, dtype=dtype, device="meta")
        for M in BATCH_SIZES:
            x = torch.empty(M, s.hidden, dtype=dtype, device="meta")
            weights = torch.empty(M, s.top_k, dtype=torch.float32, device="meta")
            ids = torch.empty(M, s.top_k, dtype=torch.int32, device="meta")
            out.append((f"{s.name} M={M}", lambda x=x, wt=weights, ids=ids, w13=w13, w2=w2:
                        moe_forward_grouped(x, wt, ids, w13, w13, w2)))
    return out
