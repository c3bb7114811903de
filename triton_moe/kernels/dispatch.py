"""Sorted token dispatch on the GPU (chapter 2): from "token t chose experts topk_ids[t]" to "each expert owns
a contiguous, block-aligned run of rows", in four small Triton kernels and no host synchronisation.

The contract is :func:`triton_moe.reference.sorted_dispatch_reference` (as vLLM's ``moe_align_block_size``):
slots ``s = token * top_k + j`` grouped by expert, increasing slot order inside an expert, each expert's run
padded to a multiple of ``block_m`` with the sentinel ``M * top_k``, ``expert_ids`` per block (-1 past the
end) and ``num_tokens_post_padded``. Output sizes are the static worst case
(:func:`triton_moe.reference.dispatch_sizes`), so nothing depends on a value that lives on the GPU and the
whole dispatch can be captured in a CUDA graph.

The four kernels, in launch order (one stream, so each sees the previous one's writes):

1. ``dispatch_count_kernel``   one program per chunk of slots: how many slots of the chunk chose each expert.
2. ``dispatch_offsets_kernel`` one program: prefix sums. Over chunks (where each chunk's slots of expert e
   go inside e's run) and over experts (where each padded run starts and ends), and the rows in use.
3. ``dispatch_layout_kernel``  one program per group of blocks: the expert of each block (-1 past the end)
   and the sentinel in every row of those blocks.
4. ``dispatch_scatter_kernel`` one program per chunk: each slot's row = its expert's run start + slots of
   the same expert in earlier chunks + slots of the same expert earlier in this chunk (stable order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import validate
from ..target import current as current_target
from ..reference import dispatch_sizes
from .routing import next_pow2


@triton.jit
def dispatch_count_kernel(topk_ids_ptr, chunk_counts_ptr, num_slots, num_experts,
                          CHUNK: tl.constexpr, SUB: tl.constexpr, E_P2: tl.constexpr):
    """chunk_counts[c, e] = number of slots in chunk c that chose expert e."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for s in range(0, CHUNK, SUB):
        offs = c * CHUNK + s + tl.arange(0, SUB)
        e = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=-1)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)       # [SUB, E_P2]
        counts += tl.sum(onehot, axis=0)
    tl.store(chunk_counts_ptr + c * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def dispatch_offsets_kernel(chunk_counts_ptr, expert_bounds_ptr, num_tokens_post_padded_ptr,
                            num_chunks, num_experts,
                            BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK_ROWS: tl.constexpr):
    """One program. Turns chunk_counts into chunk bases in place (slots of expert e in earlier chunks),
    writes each expert's padded run [start, end) to expert_bounds[0:E] and [E:2E], and the rows in use."""
    experts = tl.arange(0, E_P2)
    emask = experts < num_experts
    total = tl.zeros([E_P2], dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNK_ROWS):
        rows = c0 + tl.arange(0, CHUNK_ROWS)
        m = (rows[:, None] < num_chunks) & emask[None, :]
        ptrs = chunk_counts_ptr + rows[:, None] * num_experts + experts[None, :]
        cnt = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(cnt, axis=0) - cnt + total[None, :], mask=m)  # exclusive, over chunks
        total += tl.sum(cnt, axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M      # 0 for an expert with no tokens: no block
    end = tl.cumsum(padded, axis=0)
    tl.store(expert_bounds_ptr + experts, end - padded, mask=emask)
    tl.store(expert_bounds_ptr + num_experts + experts, end, mask=emask)
    tl.store(num_tokens_post_padded_ptr, tl.sum(padded, axis=0))


@triton.jit
def dispatch_layout_kernel(expert_bounds_ptr, num_tokens_post_padded_ptr, expert_ids_ptr, sorted_token_ids_ptr,
                           num_slots, num_experts, max_blocks,
                           BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr, E_P2: tl.constexpr):
    """The expert of each of this program's BLOCKS blocks, and the sentinel in all their rows."""
    pid = tl.program_id(0)
    blocks = pid * BLOCKS + tl.arange(0, BLOCKS)
    experts = tl.arange(0, E_P2)
    ### BEGIN SOLUTION
    # HINT: block b starts at row b * BLOCK_M; its expert is the number of experts whose run ENDS at or before
    # HINT: that row (runs are in expert order; empty experts end where they start). -1 once the row is past
    # HINT: num_tokens_post_padded. Then store the sentinel num_slots (= M * top_k) in every row of the blocks.
    end = tl.load(expert_bounds_ptr + num_experts + experts, mask=experts < num_experts, other=2147483647)
    rows_in_use = tl.load(num_tokens_post_padded_ptr)
    first_row = blocks * BLOCK_M
    expert = tl.sum((end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
    expert = tl.where(first_row < rows_in_use, expert, -1)
    tl.store(expert_ids_ptr + blocks, expert, mask=blocks < max_blocks)
    rows = pid * BLOCKS * BLOCK_M + tl.arange(0, BLOCKS * BLOCK_M)
    sentinel = tl.zeros([BLOCKS * BLOCK_M], dtype=tl.int32) + num_slots
    tl.store(sorted_token_ids_ptr + rows, sentinel, mask=rows < max_blocks * BLOCK_M)
    # STUB: pass
    ### END SOLUTION


@triton.jit
def dispatch_scatter_kernel(topk_ids_ptr, chunk_counts_ptr, expert_bounds_ptr, sorted_token_ids_ptr,
                            num_slots, num_experts,
                            CHUNK: tl.constexpr, SUB: tl.constexpr, E_P2: tl.constexpr):
    """Write each slot of this chunk to its row: sorted_token_ids[row] = slot, in increasing slot order."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    emask = experts < num_experts
    ### BEGIN SOLUTION
    # HINT: next_row[e] = start of expert e's run + slots of e in earlier chunks (chunk_counts now holds that);
    # HINT: inside a step of SUB slots, a slot's rank among the same expert's slots is an exclusive cumsum of
    # HINT: the one-hot [SUB, E] matrix along axis 0. Advance next_row by the step's counts.
    next_row = tl.load(expert_bounds_ptr + experts, mask=emask, other=0) \
        + tl.load(chunk_counts_ptr + c * num_experts + experts, mask=emask, other=0)
    for s in range(0, CHUNK, SUB):
        offs = c * CHUNK + s + tl.arange(0, SUB)
        valid = offs < num_slots
        e = tl.load(topk_ids_ptr + offs, mask=valid, other=-1)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)          # [SUB, E_P2]
        before = tl.cumsum(onehot, axis=0) - onehot                       # same-expert slots earlier in the step
        row = tl.sum(onehot * (before + next_row[None, :]), axis=1)
        tl.store(sorted_token_ids_ptr + row, offs, mask=valid & (e >= 0) & (e < num_experts))
        next_row += tl.sum(onehot, axis=0)
    # STUB: pass
    ### END SOLUTION


def dispatch_launch_params(num_slots: int, num_experts: int, block_m: int, for_gpu: bool | None = None) -> dict:
    """Tile sizes of the four kernels (host-side Python ints only: no GPU value is read). On a GPU one step is a
    [SUB, E] one-hot tile of about 8K values (registers) and up to ~128 chunks run in parallel; in the
    interpreter every operation costs about the same whatever its size, so few, large steps."""
    if for_gpu is None:
        for_gpu = current_target().on_gpu
    e_p2 = next_pow2(num_experts)
    tile, max_sub, max_chunks = (8192, 128, 128) if for_gpu else (1 << 17, 1024, 4)
    sub = max(16, min(max_sub, tile // e_p2))
    chunk = max(sub, triton.next_power_of_2(-(-num_slots // max_chunks)))
    return {"E_P2": e_p2, "SUB": sub, "CHUNK": chunk, "num_chunks": -(-num_slots // chunk),
            "CHUNK_ROWS": 16, "BLOCKS": max(1, min(64, 4096 // block_m))}


def sorted_dispatch_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """The same contract in plain PyTorch (argsort + bincount), for comparison: correct, static sizes, but
    about ten small kernels, and ``bincount`` may synchronise with the host on some backends."""
    M, top_k = topk_ids.shape
    num_slots = M * top_k
    size, max_blocks = dispatch_sizes(M, top_k, num_experts, block_m)
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)                 # slots grouped by expert, slot order inside
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    end = torch.cumsum(padded, 0)
    expert_of_sorted = flat[order]
    rank = torch.arange(num_slots, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert_of_sorted]
    sorted_token_ids = torch.full((size,), num_slots, dtype=torch.int32, device=flat.device)
    sorted_token_ids[(end - padded)[expert_of_sorted] + rank] = order.to(torch.int32)
    first_row = torch.arange(max_blocks, device=flat.device) * block_m
    expert_ids = torch.searchsorted(end, first_row, right=True)     # experts whose run ends at or before the row
    expert_ids = torch.where(first_row < end[-1], expert_ids, -1).to(torch.int32)
    return sorted_token_ids, expert_ids, end[-1:].to(torch.int32)


def sorted_dispatch(topk_ids: torch.Tensor, num_experts: int, block_m: int, out=None):
    """Group the [M, top_k] expert choices by expert into block_m-aligned runs, on the device.

    Returns ``(sorted_token_ids int32 [max_blocks * block_m], expert_ids int32 [max_blocks],
    num_tokens_post_padded int32 [1])``, identical to :func:`triton_moe.reference.sorted_dispatch_reference`.
    Every id must be in [0, num_experts) (checking that would need a host synchronisation; an id outside is
    dropped). Sizes are the static worst case, so no host synchronisation happens. ``out`` may hold the three
    output tensors, preallocated (e.g. buffers a CUDA graph reuses)."""
    validate.tensor("topk_ids", topk_ids, ndim=2, dtypes=validate.INDEX_DTYPES, nonempty=True)
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(block_m, int) or isinstance(block_m, bool) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two (the grouped GEMM's BLOCK_M), got {block_m!r}")
    M, top_k = topk_ids.shape
    validate.top_k(top_k, num_experts)
    num_slots = M * top_k
    size, max_blocks = dispatch_sizes(M, top_k, num_experts, block_m)
    p = dispatch_launch_params(num_slots, num_experts, block_m)
    dev = topk_ids.device
    if out is None:
        sorted_token_ids = torch.empty(size, dtype=torch.int32, device=dev)
        expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
        num_tokens_post_padded = torch.empty(1, dtype=torch.int32, device=dev)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise ValueError("out must be (sorted_token_ids, expert_ids, num_tokens_post_padded) or None")
        sorted_token_ids, expert_ids, num_tokens_post_padded = out
        for name, t, n in (("out[0] (sorted_token_ids)", sorted_token_ids, size),
                           ("out[1] (expert_ids)", expert_ids, max_blocks),
                           ("out[2] (num_tokens_post_padded)", num_tokens_post_padded, 1)):
            validate.tensor(name, t, shape=(n,), dtypes=(torch.int32,), device=dev)
    chunk_counts = torch.empty(p["num_chunks"] * num_experts, dtype=torch.int32, device=dev)
    expert_bounds = torch.empty(2 * num_experts, dtype=torch.int32, device=dev)

    dispatch_count_kernel[(p["num_chunks"],)](
        topk_ids, chunk_counts, num_slots, num_experts, CHUNK=p["CHUNK"], SUB=p["SUB"], E_P2=p["E_P2"])
    dispatch_offsets_kernel[(1,)](
        chunk_counts, expert_bounds, num_tokens_post_padded, p["num_chunks"], num_experts,
        BLOCK_M=block_m, E_P2=p["E_P2"], CHUNK_ROWS=p["CHUNK_ROWS"])
    dispatch_layout_kernel[(triton.cdiv(max_blocks, p["BLOCKS"]),)](
        expert_bounds, num_tokens_post_padded, expert_ids, sorted_token_ids, num_slots, num_experts, max_blocks,
        BLOCK_M=block_m, BLOCKS=p["BLOCKS"], E_P2=p["E_P2"])
    dispatch_scatter_kernel[(p["num_chunks"],)](
        topk_ids, chunk_counts, expert_bounds, sorted_token_ids, num_slots, num_experts,
        CHUNK=p["CHUNK"], SUB=p["SUB"], E_P2=p["E_P2"])
    return sorted_token_ids, expert_ids, num_tokens_post_padded


# --------------------------------------------------------------------------------------------------
# Example launches (for the compile check, triton_moe/tools/crosscompile.py; chapter 6)


def _example_block_ms() -> list[int]:
    """Every BLOCK_M a GPU table of the grouped GEMM or the fused gate+up kernel gives the dispatch."""
    from ..configs import load_table
    from .fused_gate_up import GPU_FALLBACK, tuned_tables
    from .grouped_gemm import DEFAULT_GPU_TABLE, TABLES

    tables = [DEFAULT_GPU_TABLE, GPU_FALLBACK["fused_gate_up"]]
    tables += [load_table(p) for p in sorted(TABLES.glob("grouped_gemm.*.json"))]
    tables += [t for v in ("nvidia", "amd") for t in tuned_tables("fused_gate_up", v).values()]
    return sorted({cfg.BLOCK_M for t in tables for _, cfg in t})


def example_launches() -> list:
    """:func:`sorted_dispatch` on ``meta`` ids for every model of :data:`triton_moe.shapes.MODELS`, every
    BLOCK_M a GPU table gives it (:func:`_example_block_ms`), every batch size of the course, int32 and int64
    ids. The dispatch reads no float data (bf16/fp16 do not apply)."""
    from ..shapes import BATCH_SIZES, MODELS

    out = []
    for key, shape in MODELS.items():
        for bm in _example_block_ms():
            for M in BATCH_SIZES:
                for dtype in (torch.int32, torch.int64):
                    ids = torch.empty(M, shape.top_k, dtype=dtype, device="meta")
                    out.append((f"{key} M={M} BLOCK_M={bm}",
                                lambda ids=ids, E=shape.experts, bm=bm: sorted_dispatch(ids, E, bm)))
    return out
