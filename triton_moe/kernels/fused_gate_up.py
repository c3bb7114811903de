"""Chapter 4: the fused gate+up SwiGLU kernel of a Mixture-of-Experts layer.

For every (token, chosen expert) slot, in the expert-sorted order of the dispatch (chapter 2), one kernel
computes ``silu(x @ W1[e].T) * (x @ W3[e].T)`` and writes only that intermediate ``[slots, ffn]``.

Why two fp32 accumulators, not an interleaved ``w13`` layout: both read the same bytes and do the same
FLOPs (an interleaved [E, 2*ffn, hidden] tile of 2*BLOCK_N columns *is* a gate tile next to an up tile),
but two accumulators keep the weights in the layout models ship (W1 and W3 as separate [ffn, hidden]
matrices, as Hugging Face stores them), so nothing is repacked or copied at load time, and gate and up
columns pair up trivially in registers (column n of one accumulator with column n of the other) instead of
through a split/reshape of an interleaved tile. The x tile is loaded once per K step and feeds both dots.

Grid: one program per (dispatch block of BLOCK_M slots, BLOCK_N columns of ffn), over the dispatch's
*static* worst-case number of blocks; programs past ``num_tokens_post_padded`` return at once, so inactive
experts cost nothing and no host synchronisation is needed (a CUDA graph can hold the launch).

Launch configs come from tables keyed by M (:mod:`triton_moe.configs`): a CPU table here (large tiles for
the interpreter), and an NVIDIA table written by ``scripts/tune_fused_moe.py``
(``triton_moe/tables/fused_gate_up.nvidia.json``), with per-model-shape rows where they were tuned.
"""
from __future__ import annotations

import dataclasses
import json

import torch
import triton
import triton.language as tl

from .. import configs, validate
from ..configs import KernelConfig
from ..mode import check_interpreter_dtype
from .grouped_gemm import grouped_launch_order

TABLES = configs.TABLES
INF = configs.INF

# --------------------------------------------------------------------------------------------------
# Config tables

# The interpreter costs about 7 ms per (program x K-iteration) whatever the tile: big tiles, few programs.
CPU_TABLES = {
    "fused_gate_up": [
        (8, KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)),
        (INF, KernelConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)),
    ],
    "down_combine": [
        (8, KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=1,
                         extra={"SPLIT_K": 1})),
        (INF, KernelConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=1,
                           extra={"SPLIT_K": 1})),
    ],
}

# A portable GPU fallback (AMD, or an NVIDIA shape the tuning run never saw): small BLOCK_M for decode,
# growing with M. The tuned NVIDIA tables replace it where they exist.
GPU_FALLBACK = {
    "fused_gate_up": [
        (16, KernelConfig(16, 64, 128, 8, 4, 4)),
        (64, KernelConfig(32, 64, 128, 8, 4, 4)),
        (512, KernelConfig(64, 64, 64, 8, 4, 4)),
        (INF, KernelConfig(128, 64, 64, 8, 8, 3)),
    ],
    "down_combine": [
        (16, KernelConfig(16, 64, 128, 8, 4, 4, extra={"SPLIT_K": 2})),
        (64, KernelConfig(32, 64, 128, 8, 4, 4, extra={"SPLIT_K": 1})),
        (512, KernelConfig(64, 64, 64, 8, 4, 4, extra={"SPLIT_K": 1})),
        (INF, KernelConfig(128, 128, 64, 8, 8, 3, extra={"SPLIT_K": 1})),
    ],
}


# Keyed by tokens M; tuned tables (scripts/tune_fused_moe.py) carry rows per model shape. Tuned on an H100:
# their large two-accumulator tiles spill registers on sm_80 (no warpgroup MMA there), which runs GPU_FALLBACK.
for _kernel, _tiles in (("fused_gate_up", 2), ("down_combine", 1)):
    configs.register(configs.Op(_kernel, key="tokens M", cpu=tuple(CPU_TABLES[_kernel]),
                                portable=tuple(GPU_FALLBACK[_kernel]), weight_tiles=_tiles, nvidia_min_sm=90,
                                amd_borrows=True))
shape_key = configs.shape_key


def tuned_tables(kernel: str, vendor_name: str) -> dict:
    """{shape key or "default": table} of ``tables/<kernel>.<vendor>.json``; empty if never tuned."""
    path = configs.table_path(kernel, vendor_name)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {"default": configs.load_table(path), **{k: configs.load_table(path, k) for k in data.get("shapes", {})}}


def pick_config(kernel: str, M: int, hidden: int, ffn: int, experts: int, top_k: int) -> KernelConfig:
    """The launch config for ``kernel`` ("fused_gate_up" or "down_combine") at M tokens of this shape."""
    return configs.choose(kernel, M, shape_key(hidden, ffn, experts, top_k))


def dispatch_block_m(M: int, hidden: int, ffn: int, experts: int, top_k: int) -> int:
    """BLOCK_M of the dispatch for a forward at M tokens: the fused gate+up table decides, and the down
    projection reuses the same sorted blocks."""
    return pick_config("fused_gate_up", M, hidden, ffn, experts, top_k).BLOCK_M


def with_block_m(cfg: KernelConfig, block_m: int) -> KernelConfig:
    return cfg if cfg.BLOCK_M == block_m else dataclasses.replace(cfg, BLOCK_M=block_m)


def fit_shared(cfg: KernelConfig, kernel: str, elem_bytes: int) -> KernelConfig:
    """The tables are tuned for 2-byte inputs: fit wider ones into shared memory (:func:`configs.fit_shared`)."""
    return configs.fit_shared(cfg, kernel, elem_bytes)


def blocks_bound(num_slots: int, experts: int, block_m: int, max_blocks: int) -> int:
    """How many dispatch blocks can hold slots, from host ints only (no synchronisation): at most
    min(E, num_slots) experts are active and each wastes fewer than block_m padding slots, so
    ceil((num_slots + min(E, num_slots) * (block_m - 1)) / block_m) blocks. The dispatch arrays are sized for
    all E experts (``reference.dispatch_sizes``); launching only this many row blocks drops programs that
    could never find work (at M = 1 with 256 experts: 8 blocks instead of 241)."""
    return min(max_blocks, -(-(num_slots + min(experts, num_slots) * (block_m - 1)) // block_m))


def check_dispatch(sorted_token_ids, expert_ids, num_tokens_post_padded, device) -> int:
    """Validate the dispatch tensors (chapter 2's contract) and return their block size."""
    validate.tensor("sorted_token_ids", sorted_token_ids, ndim=1, dtypes=(torch.int32,), device=device)
    validate.tensor("expert_ids", expert_ids, ndim=1, dtypes=(torch.int32,), device=device, nonempty=True)
    validate.tensor("num_tokens_post_padded", num_tokens_post_padded, shape=(1,), dtypes=(torch.int32,),
                    device=device)
    if sorted_token_ids.numel() % expert_ids.numel():
        raise ValueError(f"sorted_token_ids has {sorted_token_ids.numel()} entries, not a multiple of the "
                         f"{expert_ids.numel()} blocks of expert_ids")
    return sorted_token_ids.numel() // expert_ids.numel()


# --------------------------------------------------------------------------------------------------
# The kernel


@triton.jit(do_not_specialize=["num_slots", "top_k"])
def fused_gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, out_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, EM, num_slots, top_k,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[slot, n] = silu(x[slot // top_k] . w1[e, n]) * (x[slot // top_k] . w3[e, n]) for the slots of
    each dispatch block (expert e); N = ffn, K = hidden. top_k and num_slots (= M * top_k) are run-time
    ints (not specialised), so one compiled kernel serves every M and every model's top_k."""
    # Programs of GROUP_M consecutive row blocks share a column block, so its weight tile is read from
    # memory once and from L2 by the others (chapter 3's launch order).
    pid_m, pid_n = grouped_launch_order(tl.program_id(0), EM // BLOCK_M, tl.cdiv(N, BLOCK_N), GROUP_M)

    # Skip the blocks past the end of the dispatch: inactive experts launch nothing that works.
    num_post = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_token_ids_ptr + offs_m)
    row_mask = slot < num_slots                       # padding slots hold the sentinel num_slots
    token = tl.where(row_mask, slot // top_k, 0)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n_safe = offs_n % N                          # loads stay in bounds; the store is masked
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_offs = expert * stride_we + offs_n_safe[None, :] * stride_wn + offs_k[:, None] * stride_wk
    w1_ptrs = w1_ptr + w_offs                         # [BLOCK_K, BLOCK_N] tiles of W1[e].T and W3[e].T
    w3_ptrs = w3_ptr + w_offs

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        ### BEGIN SOLUTION
        # HINT: k_remaining = K - k * BLOCK_K; load the x tile ONCE (mask: row_mask and offs_k < k_remaining, other=0)
        # HINT: then a W1 tile and a W3 tile through w1_ptrs / w3_ptrs (mask offs_k < k_remaining)
        # HINT: and accumulate two products: acc_gate = tl.dot(a, gate_tile, acc_gate), the same for acc_up
        # STUB: pass
        k_remaining = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_remaining), other=0.0)
        w_gate = tl.load(w1_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        w_up = tl.load(w3_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        acc_gate = tl.dot(a, w_gate, acc_gate)
        acc_up = tl.dot(a, w_up, acc_up)
        ### END SOLUTION
        a_ptrs += BLOCK_K * stride_xk
        w1_ptrs += BLOCK_K * stride_wk
        w3_ptrs += BLOCK_K * stride_wk

    # Epilogue: the activation, in fp32 registers, once the K sum is complete.
    ### BEGIN SOLUTION
    # HINT: silu(g) = g * sigmoid(g); h = silu(acc_gate) * acc_up (tl.sigmoid exists)
    # STUB: h = acc_gate
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    ### END SOLUTION
    out_ptrs = out_ptr + slot[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_n[None, :] < N))


def fused_gate_up(x, w1, w3, sorted_token_ids, expert_ids, num_tokens_post_padded, top_k, config=None,
                  out=None):
    """silu(x W1[e]^T) * (x W3[e]^T) for every slot of the dispatch: returns ``[M * top_k, ffn]`` in
    x's dtype, row ``slot`` for slot ``token * top_k + j`` (the j-th expert chosen by ``token``).

    x: [M, hidden]; w1, w3: [E, ffn, hidden]; the dispatch tensors follow chapter 2's contract
    (``reference.sorted_dispatch_reference``), and its block size is the kernel's BLOCK_M."""
    validate.tensor("x", x, ndim=2, dtypes=validate.FLOAT_DTYPES, nonempty=True)
    M, H = x.shape
    validate.tensor("w1", w1, ndim=3, dtypes=(x.dtype,), device=x.device, shape=(None, None, H))
    E, F, _ = w1.shape
    validate.tensor("w3", w3, dtypes=(x.dtype,), device=x.device, shape=(E, F, H))
    check_interpreter_dtype("x", x.dtype)
    validate.top_k(top_k, E)
    block_m = check_dispatch(sorted_token_ids, expert_ids, num_tokens_post_padded, x.device)
    cfg = with_block_m(config or pick_config("fused_gate_up", M, H, F, E, top_k), block_m)
    cfg = fit_shared(cfg, "fused_gate_up", x.element_size())
    if out is None:
        out = torch.empty((M * top_k, F), dtype=x.dtype, device=x.device)
    else:
        validate.tensor("out", out, shape=(M * top_k, F), dtypes=(x.dtype,), device=x.device)
    num_blocks = blocks_bound(M * top_k, E, block_m, expert_ids.numel())
    EM = num_blocks * block_m
    grid = (num_blocks * triton.cdiv(F, cfg.BLOCK_N),)
    fused_gate_up_kernel[grid](
        x, w1, w3, out, sorted_token_ids, expert_ids, num_tokens_post_padded,
        F, H, EM, M * top_k, top_k,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), out.stride(0), out.stride(1),
        **cfg.meta())
    return out


# --------------------------------------------------------------------------------------------------
# Example launches (for the compile check, triton_moe/tools/crosscompile.py; chapter 6)


def _example_problem(shape, M: int, dtype, block_m: int):
    """Meta tensors of one forward: x, w1, w3 and a dispatch of M tokens built for ``block_m``."""
    from ..reference import dispatch_sizes

    size, max_blocks = dispatch_sizes(M, shape.top_k, shape.experts, block_m)
    meta = dict(device="meta")
    x = torch.empty(M, shape.hidden, dtype=dtype, **meta)
    w = torch.empty(shape.experts, shape.ffn, shape.hidden, dtype=dtype, **meta)
    d = (torch.empty(size, dtype=torch.int32, **meta), torch.empty(max_blocks, dtype=torch.int32, **meta),
         torch.empty(1, dtype=torch.int32, **meta))
    return x, w, d


def example_launches() -> list:
    """:func:`fused_gate_up` as :func:`triton_moe.kernels.fused_moe.fused_experts` calls it (the dispatch built
    with the table's BLOCK_M, the config from the table of the GPU the compile check simulates, per model
    shape) on ``meta`` tensors, for every model of :data:`triton_moe.shapes.MODELS` at every batch size of
    the course, bf16 and fp16. The CPU table is never compiled (only the interpreter runs it)."""
    from ..shapes import BATCH_SIZES, MODELS

    def launch(shape, M, dtype):
        bm = dispatch_block_m(M, shape.hidden, shape.ffn, shape.experts, shape.top_k)
        x, w, d = _example_problem(shape, M, dtype, bm)
        fused_gate_up(x, w, w, *d, shape.top_k)

    return [(f"{key} M={M}", lambda s=shape, M=M, dt=dtype: launch(s, M, dt))
            for key, shape in MODELS.items() for M in BATCH_SIZES for dtype in (torch.bfloat16, torch.float16)]
