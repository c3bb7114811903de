"""``fused_moe``: the whole Mixture-of-Experts layer forward, for a kernel engineer to import.

    from triton_moe.kernels.fused_moe import fused_moe, fused_experts, FusedMoEBlock

    out = fused_moe(x, router_logits, w1, w3, w2, top_k)          # Mixtral / Qwen3-MoE routing
    out = fused_experts(x, topk_weights, topk_ids, w1, w3, w2)    # any router (e.g. DeepSeek-V3's)
    block = FusedMoEBlock.from_hf(hf_block)                        # a Hugging Face style MoE block

The forward, in launches (no host synchronisation anywhere, so a CUDA graph can hold all of it):

1. router: ``topk_softmax`` (chapter 2) -> topk_weights fp32 [M, k], topk_ids int32 [M, k];
2. dispatch: ``sorted_dispatch`` (chapter 2) -> slots grouped by expert in BLOCK_M blocks, static sizes;
3. ``fused_gate_up`` (chapter 4) -> silu(x W1^T) * (x W3^T), [M * k, ffn] in x's dtype;
4. ``down_combine`` (chapter 5) -> h W2^T times the routing weight, top-k rows added per token, [M, hidden].

Decode (``M * top_k <= SMALL_SLOTS``): steps 1 and 2 and the zeroing of the fp32 combine buffer are one
launch, :func:`route_dispatch_kernel` (one program routes all tokens and lays out the dispatch from an
[S, S] comparison of the S slots; the others zero the buffer), so a forward is 4 launches instead of 9: at
decode the kernels are a few microseconds each and every launch in a CUDA graph costs about as much.

Weights are stacked ``[E, N, K]``: ``w1, w3: [E, ffn, hidden]`` (gate, up), ``w2: [E, hidden, ffn]`` (down),
all contiguous, in x's dtype (bf16 or fp16 on a GPU; fp32 works too, with tf32 dots; fp32 or fp16 on the
CPU interpreter). Launch configs come from the tables of :mod:`triton_moe.kernels.fused_gate_up`, keyed by M.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from .. import validate
from ..mode import check_interpreter_dtype
from ..reference import dispatch_sizes
from .down_combine import down_combine
from .fused_gate_up import fused_gate_up, pick_config, with_block_m
from .dispatch import sorted_dispatch
from .routing import topk_select, topk_softmax

__all__ = ["fused_moe", "fused_experts", "FusedMoEBlock", "route", "dispatch"]


# --------------------------------------------------------------------------------------------------
# Router and dispatch: chapter 2's kernels


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """softmax -> top-k -> (optionally) renormalise: (weights fp32 [M, k], ids int32 [M, k]), chapter 2's
    :func:`~triton_moe.kernels.routing.topk_softmax`."""
    return topk_softmax(router_logits, top_k, renormalize)


def dispatch(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_token_ids, expert_ids, num_tokens_post_padded): chapter 2's ``sorted_dispatch``."""
    return sorted_dispatch(topk_ids, num_experts, block_m)


# --------------------------------------------------------------------------------------------------
# Decode: routing, dispatch and zeroing in one launch

SMALL_SLOTS = 64      # M * top_k up to this takes the one-launch routing + dispatch
SMALL_EXPERTS = 256   # and E up to this (one program holds a [tokens, E] tile of logits)
ZERO_BLOCK = 2048     # fp32 values of the combine buffer each zeroing program clears


@triton.jit(do_not_specialize=["M", "acc_numel", "size", "max_blocks"])
def route_dispatch_kernel(logits_ptr, weights_ptr, ids_ptr, sorted_token_ids_ptr, expert_ids_ptr,
                          num_tokens_post_padded_ptr, acc_ptr,
                          M, E, stride_lm, acc_numel, size, max_blocks,
                          TOP_K: tl.constexpr, K_P2: tl.constexpr, RENORMALIZE: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, S_P2: tl.constexpr,
                          BLOCK_M: tl.constexpr, FILL: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    """Program 0: softmax top-k of the M <= BLOCK_T tokens (chapter 2's ``topk_softmax``), then the sorted
    dispatch of their S = M * TOP_K slots (chapter 2's contract), computed from an [S, S] comparison:
    a slot's rank among the slots of its expert, its expert's count, and where its expert's padded run
    starts. Programs 1..: zero ZERO_BLOCK values each of the fp32 combine buffer (acc_numel of them)."""
    pid = tl.program_id(0)
    if pid > 0:
        offs_z = (pid - 1) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        tl.store(acc_ptr + offs_z, tl.zeros([ZERO_BLOCK], dtype=tl.float32), mask=offs_z < acc_numel)
    else:
        # Routing, as topk_softmax_kernel: choose on the logits (softmax is monotonic), ties to the lower id.
        rows = tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        kslots = tl.arange(0, K_P2)
        rmask = rows < M
        x = tl.load(logits_ptr + rows[:, None] * stride_lm + cols[None, :],
                    mask=rmask[:, None] & (cols[None, :] < E), other=float("-inf")).to(tl.float32)
        x = tl.where(rmask[:, None], x, 0.0)
        x_max = tl.max(x, axis=1)
        chosen_ids, best = topk_select(x, x, BLOCK_T, BLOCK_E, K_P2, TOP_K, False)
        chosen_w = tl.where(kslots[None, :] < TOP_K, tl.exp(best - x_max[:, None]), 0.0)
        if RENORMALIZE:
            denom = tl.sum(chosen_w, axis=1)
        else:
            denom = tl.sum(tl.exp(x - x_max[:, None]), axis=1)
        out = rows[:, None] * TOP_K + kslots[None, :]
        omask = rmask[:, None] & (kslots[None, :] < TOP_K)
        tl.store(ids_ptr + out, chosen_ids, mask=omask)
        tl.store(weights_ptr + out, chosen_w / denom[:, None], mask=omask)
        # Sentinels everywhere, -1 for every block (the unused tail stays so, as the contract says).
        for r0 in range(0, size, FILL):
            r = r0 + tl.arange(0, FILL)
            tl.store(sorted_token_ids_ptr + r, tl.zeros([FILL], dtype=tl.int32) + M * TOP_K, mask=r < size)
        for b0 in range(0, max_blocks, FILL):
            b = b0 + tl.arange(0, FILL)
            tl.store(expert_ids_ptr + b, tl.zeros([FILL], dtype=tl.int32) - 1, mask=b < max_blocks)
        tl.debug_barrier()   # the ids above, and the fills, before the reads and overwrites below
        # Dispatch from the [S, S] comparison of the slots' experts.
        num_slots = M * TOP_K
        s = tl.arange(0, S_P2)
        valid = s < num_slots
        e = tl.load(ids_ptr + s, mask=valid, other=-1)
        same = (e[:, None] == e[None, :]) & valid[:, None] & valid[None, :]
        rank = tl.sum((same & (s[None, :] < s[:, None])).to(tl.int32), axis=1)   # earlier slots, same expert
        count = tl.sum(same.to(tl.int32), axis=1)                               # slots of this expert
        padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        first = valid & (rank == 0)                                             # one slot per active expert
        lower = first[None, :] & (e[None, :] < e[:, None])                      # runs of lower experts
        start = tl.sum(tl.where(lower, padded[None, :], 0), axis=1)
        row = start + rank
        tl.store(sorted_token_ids_ptr + row, s, mask=valid)
        tl.store(expert_ids_ptr + row // BLOCK_M, e, mask=valid & (rank % BLOCK_M == 0))
        tl.store(num_tokens_post_padded_ptr, tl.sum(tl.where(first, padded, 0), axis=0))


def route_dispatch_warps(block_t: int, block_e: int, s_p2: int, vendor_name: str) -> int:
    """NVIDIA: one warp (the top-k is TOP_K rounds of row reductions; across warps each round goes through
    shared memory and barriers: chapter 2's tuning measured the DeepSeek-V3 router at 4.1 µs with one warp,
    22 µs with four), two for the largest tiles. AMD: 8 warps from a [tokens, E] tile of 1024 logits or 32
    slots on (fewer spill SGPRs on gfx942/gfx90a there), else 4."""
    if vendor_name == "nvidia":
        return 2 if block_t * block_e >= 2048 else 1
    return 8 if block_t * block_e >= 1024 or s_p2 >= 32 else 4


def _vendor() -> str:
    from ..target import current

    return current().vendor


def small_path(M: int, E: int, top_k: int) -> bool:
    """Whether :func:`fused_moe` takes the one-launch routing + dispatch (decode sizes)."""
    return M * top_k <= SMALL_SLOTS and E <= SMALL_EXPERTS


def route_dispatch(router_logits: torch.Tensor, top_k: int, renormalize: bool, block_m: int,
                   acc: torch.Tensor | None = None):
    """Routing and dispatch of a decode-sized batch in one launch (and, given ``acc``, its zeroing):
    returns ``(topk_weights, topk_ids, sorted_token_ids, expert_ids, num_tokens_post_padded)`` exactly as
    :func:`route` then :func:`dispatch` would (chapter 2's contract). Needs ``M * top_k <= SMALL_SLOTS``
    and at most ``SMALL_EXPERTS`` experts."""
    from .routing import check_logits, next_pow2

    check_logits(router_logits)
    M, E = router_logits.shape
    validate.top_k(top_k, E)
    if not small_path(M, E, top_k):
        raise ValueError(f"route_dispatch serves M * top_k <= {SMALL_SLOTS} and E <= {SMALL_EXPERTS}, "
                         f"got M={M}, top_k={top_k}, E={E}")
    dev = router_logits.device
    size, max_blocks = dispatch_sizes(M, top_k, E, block_m)
    weights = torch.empty(M, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=dev)
    sorted_token_ids = torch.empty(size, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    acc_numel = 0 if acc is None else acc.numel()
    acc_arg = weights if acc is None else acc   # never written when acc_numel == 0
    route_dispatch_kernel[(1 + triton.cdiv(acc_numel, ZERO_BLOCK),)](
        router_logits, weights, ids, sorted_token_ids, expert_ids, num_post, acc_arg,
        M, E, router_logits.stride(0), acc_numel, size, max_blocks,
        TOP_K=top_k, K_P2=next_pow2(top_k), RENORMALIZE=bool(renormalize), BLOCK_T=next_pow2(M),
        BLOCK_E=next_pow2(E), S_P2=next_pow2(M * top_k), BLOCK_M=block_m, FILL=1024, ZERO_BLOCK=ZERO_BLOCK,
        num_warps=route_dispatch_warps(next_pow2(M), next_pow2(E), next_pow2(M * top_k), _vendor()))
    return weights, ids, sorted_token_ids, expert_ids, num_post


def fused_moe_small(x, router_logits, w1, w3, w2, top_k, renormalize, deterministic, out):
    """:func:`fused_moe` at decode sizes: routing + dispatch + zeroing (one launch), gate+up, down+combine,
    and the cast (or the ordered sum): 4 launches."""
    M, H, E, F = check_weights(x, w1, w3, w2)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    cfg_up = pick_config("fused_gate_up", M, H, F, E, top_k)
    cfg_down = with_block_m(pick_config("down_combine", M, H, F, E, top_k), cfg_up.BLOCK_M)
    acc = None if deterministic else torch.empty((M, H), dtype=torch.float32, device=x.device)
    topk_weights, _, sorted_token_ids, expert_ids, num_post = route_dispatch(
        router_logits, top_k, renormalize, cfg_up.BLOCK_M, acc)
    h = fused_gate_up(x, w1, w3, sorted_token_ids, expert_ids, num_post, top_k, cfg_up)
    return down_combine(h, w2, topk_weights, sorted_token_ids, expert_ids, num_post, deterministic, cfg_down, out,
                        acc=acc)


# --------------------------------------------------------------------------------------------------
# The public functions


def check_weights(x, w1, w3, w2):
    """Validate x: [M, hidden] and the stacked w1, w3: [E, ffn, hidden], w2: [E, hidden, ffn]; return
    (M, hidden, E, ffn)."""
    validate.tensor("x", x, ndim=2, dtypes=validate.FLOAT_DTYPES, nonempty=True)
    M, H = x.shape
    check_interpreter_dtype("x", x.dtype)
    validate.tensor("w1", w1, ndim=3, device=x.device)
    E, F = w1.shape[0], w1.shape[1]
    validate.tensor("w1", w1, shape=(E, F, H), dtypes=(x.dtype,), device=x.device)
    validate.tensor("w3", w3, shape=(E, F, H), dtypes=(x.dtype,), device=x.device)
    validate.tensor("w2", w2, shape=(E, H, F), dtypes=(x.dtype,), device=x.device)
    if E < 1 or F < 1:
        raise ValueError(f"w1 must hold at least one expert with ffn >= 1, got shape {list(w1.shape)}")
    return M, H, E, F


def fused_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w1: torch.Tensor,
                  w3: torch.Tensor, w2: torch.Tensor, *, deterministic: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The experts' part of the layer, for routing computed elsewhere.

    x: [M, hidden]; topk_weights: [M, top_k] (float; fp32 recommended); topk_ids: [M, top_k] int32/int64,
    every id in [0, E) (not checked: that would need a host synchronisation); w1, w3: [E, ffn, hidden];
    w2: [E, hidden, ffn]. Returns [M, hidden] in x's dtype (into ``out`` if given).
    ``deterministic=True``: bit-identical results run to run (no atomics; a little slower)."""
    M, H, E, F = check_weights(x, w1, w3, w2)
    validate.tensor("topk_ids", topk_ids, ndim=2, dtypes=validate.INDEX_DTYPES, device=x.device)
    top_k = topk_ids.shape[1]
    validate.top_k(top_k, E)
    validate.tensor("topk_ids", topk_ids, shape=(M, top_k))
    validate.tensor("topk_weights", topk_weights, shape=(M, top_k), dtypes=validate.FLOAT_DTYPES + (torch.float64,),
                    device=x.device)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    cfg_up = pick_config("fused_gate_up", M, H, F, E, top_k)
    cfg_down = with_block_m(pick_config("down_combine", M, H, F, E, top_k), cfg_up.BLOCK_M)
    ### BEGIN SOLUTION
    # HINT: one dispatch with the gate+up config's BLOCK_M: dispatch(topk_ids, E, cfg_up.BLOCK_M) -> 3 tensors
    # HINT: h = fused_gate_up(x, w1, w3, <the 3 tensors>, top_k, cfg_up)
    # HINT: return down_combine(h, w2, topk_weights, <the 3 tensors>, deterministic, cfg_down, out)
    sorted_token_ids, expert_ids, num_post = dispatch(topk_ids, E, cfg_up.BLOCK_M)
    h = fused_gate_up(x, w1, w3, sorted_token_ids, expert_ids, num_post, top_k, cfg_up)
    return down_combine(h, w2, topk_weights, sorted_token_ids, expert_ids, num_post, deterministic, cfg_down, out)
    ### END SOLUTION


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
              w2: torch.Tensor, top_k: int, *, renormalize: bool = True, deterministic: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """One MoE layer: softmax top-k routing on ``router_logits`` ([M, E], any float dtype), then
    ``sum_j w_j * W2[e_j] (silu(W1[e_j] x) * W3[e_j] x)`` per token.

    Mixtral: ``renormalize=True``; Qwen3-MoE: ``renormalize=config.norm_topk_prob``. For other routers
    (DeepSeek-V3's grouped sigmoid router) compute the top-k yourself and call :func:`fused_experts`.
    Shapes as in :func:`fused_experts`. No host synchronisation: capturable in a CUDA graph."""
    M, H, E, F = check_weights(x, w1, w3, w2)
    validate.tensor("router_logits", router_logits, shape=(M, E), dtypes=validate.FLOAT_DTYPES + (torch.float64,),
                    device=x.device)
    validate.top_k(top_k, E)
    if small_path(M, E, top_k):  # decode: routing, dispatch and zeroing in one launch (4 launches in all)
        return fused_moe_small(x, router_logits, w1, w3, w2, top_k, bool(renormalize), deterministic, out)
    topk_weights, topk_ids = route(router_logits, top_k, bool(renormalize))
    return fused_experts(x, topk_weights, topk_ids, w1, w3, w2, deterministic=deterministic, out=out)


# --------------------------------------------------------------------------------------------------
# Example launches (for the compile check, triton_moe/tools/crosscompile.py; chapter 6): :func:`fused_moe` at
# every decode batch size that takes the one-launch routing + dispatch, for every model shape, bf16 and fp16
# activations, logits in the activations' dtype and in fp32 (the router often runs in fp32), atomic and
# deterministic combine. The forward's other launches (gate+up, down, combine) are listed under their own
# kernels' modules, whose examples cover every batch size.


def example_launches() -> list:
    from ..shapes import BATCH_SIZES, MODELS

    def launch(s, M, dtype, logits_dtype, deterministic):
        meta = dict(device="meta")
        x = torch.empty(M, s.hidden, dtype=dtype, **meta)
        w13 = torch.empty(s.experts, s.ffn, s.hidden, dtype=dtype, **meta)
        w2 = torch.empty(s.experts, s.hidden, s.ffn, dtype=dtype, **meta)
        logits = torch.empty(M, s.experts, dtype=logits_dtype, **meta)
        fused_moe(x, logits, w13, w13, w2, s.top_k, deterministic=deterministic)

    out = []
    for key, s in MODELS.items():
        for M in BATCH_SIZES:
            if not small_path(M, s.experts, s.top_k):
                continue
            for dtype, logits_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                        (torch.float16, torch.float16)):
                for det in (False, True):
                    out.append((f"{key} M={M}{', deterministic' if det else ''}",
                                lambda s=s, M=M, dt=dtype, lt=logits_dtype, det=det: launch(s, M, dt, lt, det)))
    return out


# --------------------------------------------------------------------------------------------------
# nn.Module wrapper


class FusedMoEBlock(nn.Module):
    """A sparse MoE block (router + experts) running :func:`fused_moe`.

    ``forward(hidden_states [..., hidden]) -> [..., hidden]`` (the output only; Hugging Face's Mixtral block
    also returns the router logits). Build it from stacked weights, or from a Hugging Face style block with
    :meth:`from_hf` (plain modules and tensors: nothing is downloaded)."""

    def __init__(self, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                 top_k: int, renormalize: bool = True, deterministic: bool = False):
        super().__init__()
        validate.tensor("router_weight", router_weight, ndim=2, dtypes=validate.FLOAT_DTYPES)
        E, H = router_weight.shape
        validate.tensor("w1", w1, shape=(E, None, H), dtypes=validate.FLOAT_DTYPES, device=router_weight.device)
        F = w1.shape[1]
        validate.tensor("w3", w3, shape=(E, F, H), dtypes=(w1.dtype,), device=router_weight.device)
        validate.tensor("w2", w2, shape=(E, H, F), dtypes=(w1.dtype,), device=router_weight.device)
        validate.top_k(top_k, E)
        self.router_weight = nn.Parameter(router_weight, requires_grad=False)
        self.w1 = nn.Parameter(w1, requires_grad=False)
        self.w3 = nn.Parameter(w3, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.top_k = top_k
        self.renormalize = bool(renormalize)
        self.deterministic = bool(deterministic)

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @classmethod
    def from_hf(cls, block: nn.Module, top_k: int | None = None, renormalize: bool | None = None,
                deterministic: bool = False) -> "FusedMoEBlock":
        """Copy the weights of a Hugging Face style sparse MoE block:

        - Mixtral (``MixtralSparseMoeBlock``): ``gate`` (Linear hidden -> E) and ``experts[i].w1`` (gate),
          ``.w3`` (up), ``.w2`` (down), each an ``nn.Linear`` without bias; ``top_k`` from ``block.top_k``;
          always renormalised;
        - Qwen3-MoE (``Qwen3MoeSparseMoeBlock``): ``gate`` and ``experts[i].gate_proj``, ``.up_proj``,
          ``.down_proj``; ``top_k`` from ``block.top_k``; renormalised when ``block.norm_topk_prob``.

        The weights keep the block's dtype and device (move the block first, or the result after)."""
        gate = getattr(block, "gate", None)
        experts = getattr(block, "experts", None)
        if not isinstance(gate, nn.Linear) or experts is None or len(experts) == 0:
            raise ValueError("block must have a `gate` nn.Linear (hidden -> experts) and a non-empty `experts` "
                             "list (Mixtral's block_sparse_moe or Qwen3-MoE's mlp)")
        names = None
        for candidate in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
            if all(isinstance(getattr(experts[0], n, None), nn.Linear) for n in candidate):
                names = candidate
                break
        if names is None:
            raise ValueError("block.experts[0] must have nn.Linear w1/w3/w2 (Mixtral) or gate_proj/up_proj/"
                             "down_proj (Qwen3-MoE)")
        for i, e in enumerate(experts):
            for n in names:
                if getattr(e, n).bias is not None:
                    raise ValueError(f"block.experts[{i}].{n} has a bias; fused_moe's experts have none")
        if gate.bias is not None:
            raise ValueError("block.gate has a bias; the router here is a plain projection")
        if top_k is None:
            top_k = getattr(block, "top_k", None)
            if top_k is None:
                raise ValueError("block has no `top_k` attribute: pass top_k=")
        if renormalize is None:
            renormalize = bool(getattr(block, "norm_topk_prob", True)) if names[0] == "gate_proj" else True
        with torch.no_grad():
            stack = lambda n: torch.stack([getattr(e, n).weight for e in experts]).contiguous()  # noqa: E731
            w1, w3, w2 = stack(names[0]), stack(names[1]), stack(names[2])
            router = gate.weight.detach().clone().contiguous()
        return cls(router, w1, w3, w2, int(top_k), renormalize, deterministic)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if not x.is_contiguous():
            x = x.contiguous()
        logits = nn.functional.linear(x, self.router_weight)
        out = fused_moe(x, logits, self.w1, self.w3, self.w2, self.top_k, renormalize=self.renormalize,
                        deterministic=self.deterministic)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        E, F, H = self.w1.shape
        return (f"experts={E}, hidden={H}, ffn={F}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"deterministic={self.deterministic}, dtype={self.w1.dtype}")
