"""Routers (chapter 2): from router logits [M, E] to (topk_weights float32 [M, k], topk_ids int32 [M, k]).

- Mixtral and Qwen3-MoE: softmax over the experts, the k largest, optionally renormalised to sum to 1
  (:func:`topk_softmax`; Mixtral always renormalises, Qwen3 does when ``norm_topk_prob`` is set).
- DeepSeek-V3: sigmoid scores; a per-expert correction bias is added for *choosing* only; the experts form
  ``n_group`` groups, a group's score is the sum of its two best biased scores, the ``topk_group`` best groups
  survive, the top-k experts are chosen inside them; the weights are the unbiased sigmoid scores of the chosen
  experts, renormalised and multiplied by ``routed_scaling_factor`` (:func:`deepseek_v3_route`). The shared
  expert is not routed: every token uses it with weight 1 (:func:`append_shared_expert` appends it as one
  more slot, so the grouped GEMM can run it with the routed experts).

Tie breaking, everywhere: among equal scores the LOWER expert (or group) index wins, and the k slots come in
decreasing score order. The float64 references below sort stably, so they break ties the same way.
Softmax is monotonic, so :func:`topk_softmax` chooses on the raw logits (exactly the values the reference
sees) and exponentiates afterwards: its choice matches the reference exactly, ties included.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import configs, validate
from ..reference import route_reference, stable_topk
from ..configs import RouterConfig


# --------------------------------------------------------------------------------------------------
# float64 references


topk_softmax_reference = route_reference   # Mixtral / Qwen3 routing in float64 (one copy, in reference.py)


def deepseek_v3_route_reference(logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, n_group: int,
                                topk_group: int, routed_scaling_factor: float):
    """DeepSeek-V3 routing in float64 (the noaux_tc router): see the module docstring."""
    M, E = logits.shape
    scores = torch.sigmoid(logits.double())
    choice = scores + correction_bias.double().to(scores.device)[None, :]
    group_scores = choice.view(M, n_group, E // n_group).topk(2, dim=-1).values.sum(dim=-1)   # [M, n_group]
    groups = stable_topk(group_scores, topk_group)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    expert_mask = group_mask.repeat_interleave(E // n_group, dim=1)
    ids = stable_topk(choice.masked_fill(~expert_mask, float("-inf")), top_k)
    weights = scores.gather(1, ids)
    weights = weights / weights.sum(dim=-1, keepdim=True) * routed_scaling_factor
    return weights, ids


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def topk_select(x, y, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, K_P2: tl.constexpr, TOP_K: tl.constexpr,
                GATHER: tl.constexpr):
    """The TOP_K largest entries of each row of ``x`` [BLOCK_T, BLOCK_E], largest first, ties to the LOWER
    column: returns (ids int32 [BLOCK_T, K_P2], values fp32 [BLOCK_T, K_P2]), the values being the chosen
    entries of ``x``, or with GATHER those of ``y`` at the chosen columns; slots >= TOP_K hold 0. Every later
    router (DeepSeek-V3's, the decode route + dispatch of chapter 5) imports this selection."""
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, K_P2)
    ### BEGIN SOLUTION
    # HINT: k times: the row max, its LOWEST column among ties (tl.min over tl.where(x == best, cols, BLOCK_E)),
    # HINT: record it in slot j (tl.where(slots == j, ...)), then set that column of x to -inf.
    ids = tl.zeros([BLOCK_T, K_P2], dtype=tl.int32)
    vals = tl.zeros([BLOCK_T, K_P2], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(x, axis=1)
        idx = tl.min(tl.where(x == best[:, None], cols[None, :], BLOCK_E), axis=1)
        if GATHER:
            best = tl.sum(tl.where(cols[None, :] == idx[:, None], y, 0.0), axis=1)
        ids = tl.where(slots[None, :] == j, idx[:, None], ids)
        vals = tl.where(slots[None, :] == j, best[:, None], vals)
        x = tl.where(cols[None, :] == idx[:, None], float("-inf"), x)
    # STUB: ids = tl.zeros([BLOCK_T, K_P2], dtype=tl.int32)
    # STUB: vals = tl.zeros([BLOCK_T, K_P2], dtype=tl.float32)
    ### END SOLUTION
    return ids, vals


@triton.jit
def topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, M, E, stride_lm,
                        TOP_K: tl.constexpr, K_P2: tl.constexpr, RENORMALIZE: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """BLOCK_T tokens per program, all E experts of a token in one tile."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, K_P2)
    rmask = rows < M
    x = tl.load(logits_ptr + rows[:, None] * stride_lm + cols[None, :],
                mask=rmask[:, None] & (cols[None, :] < E), other=float("-inf")).to(tl.float32)
    x = tl.where(rmask[:, None], x, 0.0)   # rows past M: finite values (their results are never stored)
    # Softmax is monotonic: choose on the logits (exactly what the float64 reference compares).
    chosen_ids, best = topk_select(x, x, BLOCK_T, BLOCK_E, K_P2, TOP_K, False)
    ### BEGIN SOLUTION
    # HINT: weight = exp(logit - row max) / (sum over all experts, or over the k chosen when RENORMALIZE);
    # HINT: slots >= TOP_K must weigh 0 (they are never stored, but they must not enter the sum).
    x_max = tl.max(x, axis=1)
    chosen_w = tl.where(slots[None, :] < TOP_K, tl.exp(best - x_max[:, None]), 0.0)
    if RENORMALIZE:
        denom = tl.sum(chosen_w, axis=1)
    else:
        denom = tl.sum(tl.exp(x - x_max[:, None]), axis=1)
    weights = chosen_w / denom[:, None]
    # STUB: weights = tl.zeros([BLOCK_T, K_P2], dtype=tl.float32)
    ### END SOLUTION
    out = rows[:, None] * TOP_K + slots[None, :]
    omask = rmask[:, None] & (slots[None, :] < TOP_K)
    tl.store(ids_ptr + out, chosen_ids, mask=omask)
    tl.store(weights_ptr + out, weights, mask=omask)


@triton.jit
def deepseek_v3_route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, M, E, stride_lm, scale,
                             TOP_K: tl.constexpr, K_P2: tl.constexpr, N_GROUP: tl.constexpr,
                             G_P2: tl.constexpr, TOPK_GROUP: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Sigmoid scores, biased choice, group-limited top-k; BLOCK_T tokens per program."""
    NEG: tl.constexpr = float("-inf")
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, K_P2)
    gcols = tl.arange(0, G_P2)
    rmask = rows < M
    cmask = cols < E
    x = tl.load(logits_ptr + rows[:, None] * stride_lm + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    scores = tl.sigmoid(x)                                      # the weights come from these
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    choice = tl.where(cmask[None, :], scores + bias[None, :], NEG)   # the choice uses these
    group = cols // (E // N_GROUP)
    ### BEGIN SOLUTION
    # HINT: for each group g (tl.static_range(N_GROUP)): its two best biased scores (best, then best with that
    # HINT: column removed) summed; then keep the TOPK_GROUP best groups (ties: lower group) and set the
    # HINT: choice of every expert outside them to -inf.
    group_score = tl.full([BLOCK_T, G_P2], NEG, dtype=tl.float32)
    for g in tl.static_range(N_GROUP):
        v = tl.where(group[None, :] == g, choice, NEG)
        _, two_best = topk_select(v, v, BLOCK_T, BLOCK_E, 2, 2, False)
        group_score = tl.where(gcols[None, :] == g, tl.sum(two_best, axis=1)[:, None], group_score)
    keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    for j in tl.static_range(TOPK_GROUP):
        best = tl.max(group_score, axis=1)
        gi = tl.min(tl.where(group_score == best[:, None], gcols[None, :], G_P2), axis=1)
        keep = keep | (group[None, :] == gi[:, None])
        group_score = tl.where(gcols[None, :] == gi[:, None], NEG, group_score)
    choice = tl.where(keep, choice, NEG)
    # STUB: choice = choice
    ### END SOLUTION
    # Choose on the biased scores, weigh with the unbiased ones (gathered at the chosen columns).
    chosen_ids, chosen_w = topk_select(choice, scores, BLOCK_T, BLOCK_E, K_P2, TOP_K, True)
    weights = chosen_w / tl.sum(chosen_w, axis=1)[:, None] * scale
    out = rows[:, None] * TOP_K + slots[None, :]
    omask = rmask[:, None] & (slots[None, :] < TOP_K)
    tl.store(ids_ptr + out, chosen_ids, mask=omask)
    tl.store(weights_ptr + out, weights, mask=omask)


# --------------------------------------------------------------------------------------------------
# Host wrappers


def next_pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(int(n)))


def tokens_per_program(E: int) -> int:
    """Default tokens per program: a [BLOCK_T, BLOCK_E] tile of about 4096 scores."""
    return max(1, min(64, 4096 // next_pow2(E)))


# Keyed by the number of experts E (a token's E scores are one tile row); tuned tables:
# tables/<router>.nvidia.json (benchmarks/tune_routing.py). Without one: tiles of about 4096 scores, 4 warps.
_DEFAULT = tuple((1 << p, RouterConfig(tokens_per_program(1 << p), 4)) for p in range(1, 12)) + \
    ((1 << 31, RouterConfig(1, 4)),)
for _name in ("topk_softmax", "deepseek_v3_route"):
    configs.register(configs.Op(_name, key="experts E", cpu=_DEFAULT, portable=_DEFAULT, row=RouterConfig))


def launch_config(kernel: str, E: int) -> tuple[int, int]:
    """(BLOCK_T tokens per program, num_warps) for a router kernel over E experts."""
    cfg = configs.choose(kernel, E)
    return cfg.BLOCK_T, cfg.num_warps


def check_logits(logits) -> None:
    validate.tensor("logits", logits, ndim=2, dtypes=validate.FLOAT_DTYPES + (torch.float64,), nonempty=True)
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the experts (call .contiguous() on it first)")


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Fused softmax + top-k (Mixtral; Qwen3-MoE with ``renormalize=norm_topk_prob``).

    Returns (weights float32 [M, top_k], ids int32 [M, top_k]), slots in decreasing weight order, ties to the
    lower expert index."""
    check_logits(logits)
    M, E = logits.shape
    validate.top_k(top_k, E)
    weights = torch.empty(M, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=logits.device)
    block_t, warps = launch_config("topk_softmax", E)
    topk_softmax_kernel[(triton.cdiv(M, block_t),)](
        logits, weights, ids, M, E, logits.stride(0),
        TOP_K=top_k, K_P2=next_pow2(top_k), RENORMALIZE=bool(renormalize), BLOCK_T=block_t, BLOCK_E=next_pow2(E),
        num_warps=warps)
    return weights, ids


def deepseek_v3_route(logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, n_group: int,
                      topk_group: int, routed_scaling_factor: float):
    """DeepSeek-V3 routing (sigmoid, bias for choice only, group-limited top-k, renormalise, scale).

    DeepSeek-V3 itself: E=256, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5."""
    check_logits(logits)
    M, E = logits.shape
    validate.top_k(top_k, E)
    validate.tensor("correction_bias", correction_bias, shape=(E,), dtypes=validate.FLOAT_DTYPES + (torch.float64,),
                    device=logits.device)
    for name, v in (("n_group", n_group), ("topk_group", topk_group)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if E % n_group or E // n_group < 2:
        raise ValueError(f"n_group must divide the {E} experts into groups of at least 2, got n_group={n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group must be at most n_group ({n_group}), got {topk_group}")
    if topk_group * (E // n_group) < top_k:
        raise ValueError(f"top_k={top_k} experts cannot be chosen from {topk_group} groups of {E // n_group}")
    weights = torch.empty(M, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=logits.device)
    block_t, warps = launch_config("deepseek_v3_route", E)
    deepseek_v3_route_kernel[(triton.cdiv(M, block_t),)](
        logits, correction_bias, weights, ids, M, E, logits.stride(0), float(routed_scaling_factor),
        TOP_K=top_k, K_P2=next_pow2(top_k), N_GROUP=n_group, G_P2=next_pow2(n_group), TOPK_GROUP=topk_group,
        BLOCK_T=block_t, BLOCK_E=next_pow2(E), num_warps=warps)
    return weights, ids


def append_shared_expert(weights: torch.Tensor, ids: torch.Tensor, shared_id: int):
    """Add the shared expert (DeepSeek-V3: every token, weight 1) as one more slot [M, k + 1], so one grouped
    GEMM over E + 1 stacked experts runs it with the routed ones. Keeps dtypes and device."""
    validate.tensor("weights", weights, ndim=2)
    validate.tensor("ids", ids, shape=tuple(weights.shape), dtypes=validate.INDEX_DTYPES)
    M = weights.shape[0]
    w = torch.ones(M, 1, dtype=weights.dtype, device=weights.device)
    i = torch.full((M, 1), shared_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([weights, w], dim=1), torch.cat([ids, i], dim=1)


# --------------------------------------------------------------------------------------------------
# Example launches (for the compile check, triton_moe/tools/crosscompile.py; chapter 6)

EXAMPLE_TOKENS = (1, 4096)  # decode (a launch makes M=1 the constant 1) and prefill


def example_launches() -> list:
    """Both routers for every model of :data:`triton_moe.shapes.MODELS` at M = 1 and 4096 tokens, bf16 and
    fp16 logits, on ``meta`` tensors (Mixtral/Qwen3: topk_softmax with and without renormalisation;
    DeepSeek-V3: its grouped router, n_group=8, topk_group=4). Each GPU's launch table applies where the
    compile check simulates that GPU."""
    from ..shapes import MODELS

    out = []
    for key, shape in MODELS.items():
        E, k = shape.experts, shape.top_k
        for M in EXAMPLE_TOKENS:
            for dtype in (torch.bfloat16, torch.float16):
                logits = torch.empty(M, E, dtype=dtype, device="meta")
                if shape.router == "deepseek_v3":
                    bias = torch.empty(E, dtype=torch.float32, device="meta")
                    out.append((f"{key} M={M}", lambda l=logits, b=bias, k=k: deepseek_v3_route(l, b, k, 8, 4, 2.5)))
                else:
                    for renormalize in (True, False):
                        out.append((f"{key} M={M}", lambda l=logits, k=k, r=renormalize: topk_softmax(l, k, r)))
    return out
