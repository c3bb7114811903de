"""Chapter 5: the down projection with the routing weight and the combine in its epilogue.

``out[t] = sum_j topk_weights[t, j] * (h[t * top_k + j] @ W2[e_j].T)``: a grouped GEMM over the expert-sorted
dispatch blocks whose epilogue multiplies each row by its routing weight and adds the top-k rows of each
token together. Two ways to add them (both measured in ``benchmarks/ch05_fused_moe.py``):

- **atomic** (default): every program adds its weighted tile into an fp32 ``[M, hidden]`` buffer with
  ``tl.atomic_add``; a small kernel casts the buffer to the output dtype. Only ``M * hidden`` fp32 values
  reach memory, and split-K is free (each K slice adds its partial sum too), which keeps enough programs
  streaming W2 at decode. The order of the additions changes from run to run: results can differ in the
  last bits.
- **deterministic** (``deterministic=True``): every program stores its weighted rows ``[M * top_k, hidden]``
  (fp32, each slot written exactly once, no split-K), then :func:`moe_sum_kernel` adds each token's
  ``top_k`` rows in a fixed order. Bit-identical from run to run, at the cost of writing and reading
  ``top_k`` fp32 rows per token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import validate
from ..mode import check_interpreter_dtype
from .grouped_gemm import grouped_launch_order
from .fused_gate_up import blocks_bound, check_dispatch, fit_shared, pick_config, with_block_m


@triton.jit(do_not_specialize=["num_slots", "top_k", "split_k"])
def down_combine_kernel(
    h_ptr, w2_ptr, topk_weights_ptr, acc_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, EM, num_slots, top_k, split_k,
    stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_am, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """acc[slot // top_k] += w * (h[slot] . w2[e, n]) (ATOMIC), or acc[slot] = w * (h[slot] . w2[e, n])
    (per-slot rows); N = hidden, K = ffn. Program axis 1 is the K slice (split_k > 1 only with ATOMIC)."""
    pid_m, pid_n = grouped_launch_order(tl.program_id(0), EM // BLOCK_M, tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)

    num_post = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_token_ids_ptr + offs_m)
    row_mask = slot < num_slots
    slot = tl.where(row_mask, slot, 0)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n_safe = offs_n % N
    # This program's K slice: k_per_split columns of ffn, starting at pid_k * k_per_split.
    k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + slot[:, None] * stride_hm + (k_start + offs_k[None, :]) * stride_hk
    w_ptrs = w2_ptr + expert * stride_we + offs_n_safe[None, :] * stride_wn + (k_start + offs_k[:, None]) * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = min(K, k_start + k_per_split)
    for k in range(0, tl.cdiv(k_end - k_start, BLOCK_K)):
        k_remaining = k_end - k_start - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_remaining), other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: routing weight, then combine the top-k rows of each token.
    mask = row_mask[:, None] & (offs_n[None, :] < N)
    ### BEGIN SOLUTION
    # HINT: load each row's routing weight: topk_weights is flat [M * top_k] fp32, indexed by slot (mask row_mask)
    # HINT: scale the rows once: acc * weight[:, None]
    # HINT: ATOMIC: tl.atomic_add into acc_ptr at row token = slot // top_k (sem="relaxed"); else tl.store at row slot
    # STUB: pass
    weight = tl.load(topk_weights_ptr + slot, mask=row_mask, other=0.0)
    acc = acc * weight[:, None]
    if ATOMIC:
        token = slot // top_k
        tl.atomic_add(acc_ptr + token[:, None] * stride_am + offs_n[None, :] * stride_an, acc, mask=mask,
                      sem="relaxed")
    else:
        tl.store(acc_ptr + slot[:, None] * stride_am + offs_n[None, :] * stride_an, acc, mask=mask)
    ### END SOLUTION


@triton.jit
def moe_sum_kernel(src_ptr, out_ptr, N, stride_sm, stride_om, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = sum_{j < TOP_K} src[t * TOP_K + j], added in order j = 0, 1, ... (deterministic), cast to
    out's dtype. With TOP_K = 1 it is the cast of the atomic buffer."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(src_ptr + (t * TOP_K + j) * stride_sm + offs, mask=mask, other=0.0)
    tl.store(out_ptr + t * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


SUM_BLOCK_N = 1024


def down_combine(h, w2, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                 deterministic=False, config=None, out=None, acc=None):
    """The MoE output ``[M, hidden]`` in h's dtype: each slot's row of ``h @ W2[e].T`` times its routing
    weight, summed over each token's top-k slots.

    h: [M * top_k, ffn] (fused gate+up output, slot order); w2: [E, hidden, ffn]; topk_weights: [M, top_k]
    (fp32, or any float dtype); the dispatch tensors follow chapter 2's contract. ``deterministic=True``
    gives bit-identical results from run to run (per-slot rows + an ordered sum) instead of atomics.
    ``acc``: an fp32 [M, hidden] buffer, already zero, for the atomic adds (saves the zeroing launch when
    an earlier kernel cleared it); ignored when deterministic."""
    validate.tensor("h", h, ndim=2, dtypes=validate.FLOAT_DTYPES, nonempty=True)
    check_interpreter_dtype("h", h.dtype)
    validate.tensor("topk_weights", topk_weights, ndim=2, dtypes=validate.FLOAT_DTYPES, device=h.device)
    M, top_k = topk_weights.shape
    S, F = h.shape
    if S != M * top_k:
        raise ValueError(f"h must have shape [M * top_k, ffn] = [{M * top_k}, *] for topk_weights of shape "
                         f"{list(topk_weights.shape)}, got {list(h.shape)}")
    validate.tensor("w2", w2, ndim=3, dtypes=(h.dtype,), device=h.device, shape=(None, None, F))
    E, H, _ = w2.shape
    validate.top_k(top_k, E)
    block_m = check_dispatch(sorted_token_ids, expert_ids, num_tokens_post_padded, h.device)
    cfg = with_block_m(config or pick_config("down_combine", M, H, F, E, top_k), block_m)
    cfg = fit_shared(cfg, "down_combine", h.element_size())
    meta = cfg.meta()
    split_k = 1 if deterministic else int(meta.pop("SPLIT_K", 1))
    meta.pop("SPLIT_K", None)
    if out is None:
        out = torch.empty((M, H), dtype=h.dtype, device=h.device)
    else:
        validate.tensor("out", out, shape=(M, H), dtypes=(h.dtype,), device=h.device)
    weights = topk_weights.float().reshape(-1)  # a view when already fp32 and contiguous
    if deterministic:
        acc = torch.empty((M * top_k, H), dtype=torch.float32, device=h.device)  # every slot row is written
    elif acc is None:
        acc = torch.zeros((M, H), dtype=torch.float32, device=h.device)
    else:
        validate.tensor("acc", acc, shape=(M, H), dtypes=(torch.float32,), device=h.device)
    num_blocks = blocks_bound(M * top_k, E, block_m, expert_ids.numel())
    EM = num_blocks * block_m
    grid = (num_blocks * triton.cdiv(H, cfg.BLOCK_N), split_k)
    down_combine_kernel[grid](
        h, w2, weights, acc, sorted_token_ids, expert_ids, num_tokens_post_padded,
        H, F, EM, M * top_k, top_k, split_k,
        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), acc.stride(0), acc.stride(1),
        ATOMIC=not deterministic, **meta)
    rows = top_k if deterministic else 1
    block = min(SUM_BLOCK_N, triton.next_power_of_2(H))
    moe_sum_kernel[(M, triton.cdiv(H, block))](acc, out, H, acc.stride(0), out.stride(0), TOP_K=rows,
                                               BLOCK_N=block)
    return out


# --------------------------------------------------------------------------------------------------
# Example launches (for the compile check, triton_moe/tools/crosscompile.py; chapter 6)


def example_launches() -> list:
    """:func:`down_combine` (its kernel and the combine ``moe_sum_kernel``) as
    :func:`triton_moe.kernels.fused_moe.fused_experts` calls it: the dispatch built with the fused gate+up
    table's BLOCK_M, the config from the down table of the GPU the compile check simulates, atomic and
    deterministic; on ``meta`` tensors for every model of :data:`triton_moe.shapes.MODELS` at every batch
    size of the course, bf16 and fp16."""
    from ..shapes import BATCH_SIZES, MODELS
    from .fused_gate_up import _example_problem, dispatch_block_m

    def launch(shape, M, dtype, deterministic):
        bm = dispatch_block_m(M, shape.hidden, shape.ffn, shape.experts, shape.top_k)
        _, _, d = _example_problem(shape, M, dtype, bm)
        h = torch.empty(M * shape.top_k, shape.ffn, dtype=dtype, device="meta")
        w2 = torch.empty(shape.experts, shape.hidden, shape.ffn, dtype=dtype, device="meta")
        weights = torch.empty(M, shape.top_k, dtype=torch.float32, device="meta")
        down_combine(h, w2, weights, *d, deterministic)

    return [(f"{key} M={M}{', deterministic' if det else ''}",
             lambda s=shape, M=M, dt=dtype, det=det: launch(s, M, dt, det))
            for key, shape in MODELS.items() for M in BATCH_SIZES for dtype in (torch.bfloat16, torch.float16)
            for det in (False, True)]
