"""Random MoE problems and float64 references.

Everything a checker compares against is computed here in float64 from the same (rounded) inputs the
learner's code sees, so the only error left is the learner's own arithmetic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .shapes import MoEShape


@dataclass
class MoEProblem:
    shape: MoEShape
    x: torch.Tensor              # [M, hidden] activations
    router_weight: torch.Tensor  # [E, hidden] router (gate) projection
    w1: torch.Tensor             # [E, ffn, hidden] gate projection
    w3: torch.Tensor             # [E, ffn, hidden] up projection
    w2: torch.Tensor             # [E, hidden, ffn] down projection
    logits: torch.Tensor         # [M, E] router logits, float32
    topk_weights: torch.Tensor   # [M, top_k] renormalised routing weights, float32
    topk_ids: torch.Tensor       # [M, top_k] chosen experts, int32
    seed: int
    routing: str

    @property
    def tokens(self) -> int:
        return self.x.shape[0]


_seed_counter = 0


def new_seed() -> int:
    """A fresh seed for every check, printed with the result so a failure can be replayed.

    With ``TRITON_MOE_SEED`` set (the teacher's ``grade --seed``), seeds are a fixed sequence derived
    from it, so every submission sees the same inputs and learners never saw them."""
    global _seed_counter
    base = os.environ.get("TRITON_MOE_SEED")
    if base:
        _seed_counter += 1
        return (int(base) * 1_000_003 + _seed_counter * 7919) % (2**31 - 1)
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, largest first; equal scores: the LOWER index first (the
    tie rule of every router in the course)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def route_reference(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Mixtral / Qwen3 routing in float64: softmax over the experts, the top-k (ties to the lower index),
    optionally renormalised to sum to 1. Returns (weights float64 [M, k], ids int64 [M, k])."""
    probs = torch.softmax(logits.double(), dim=-1)
    ids = stable_topk(probs, top_k)
    weights = probs.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _routing_bias(routing: str, experts: int, gen: torch.Generator) -> torch.Tensor:
    bias = torch.zeros(experts, dtype=torch.float64)
    if routing == "uniform":
        return bias
    if routing == "skewed":  # a few experts take most tokens
        hot = torch.randperm(experts, generator=gen)[: max(1, experts // 8)]
        bias[hot] = 4.0
        return bias
    if routing == "empty":  # half the experts receive no token at all
        cold = torch.randperm(experts, generator=gen)[: experts // 2]
        bias[cold] = -1e4
        return bias
    raise ValueError(f"routing must be 'uniform', 'skewed' or 'empty', got {routing!r}")


def make_problem(shape: MoEShape, tokens: int, dtype=torch.float32, device="cpu", seed: int | None = None,
                 routing: str = "uniform") -> MoEProblem:
    """Random (never zero) inputs with unit-scale outputs; routing from a real softmax router."""
    if seed is None:
        seed = new_seed()
    # Draw on the target device: full Mixtral weights (1.4 G values) take seconds on a GPU, minutes on a CPU.
    gen = torch.Generator(device=device).manual_seed(seed)
    E, H, F = shape.experts, shape.hidden, shape.ffn

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float32, device=device) * scale).to(dtype)

    x = rnd(tokens, H)
    router_weight = rnd(E, H, scale=H ** -0.5)
    w1 = rnd(E, F, H, scale=H ** -0.5)
    w3 = rnd(E, F, H, scale=H ** -0.5)
    w2 = rnd(E, H, F, scale=F ** -0.5)
    bias = _routing_bias(routing, E, torch.Generator().manual_seed(seed)).to(device)
    logits = x.double() @ router_weight.double().T + bias
    weights, ids = route_reference(logits, shape.top_k)
    return MoEProblem(shape, x, router_weight, w1, w3, w2, logits.float(), weights.float(), ids.int(), seed, routing)


def expert_mlp_reference(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP in float64: W2 (silu(W1 x) * W3 x)."""
    x = x.double()
    gate = x @ w1.double().T
    up = x @ w3.double().T
    return (torch.nn.functional.silu(gate) * up) @ w2.double().T


def swiglu_intermediate_reference(x, w1, w3) -> torch.Tensor:
    """silu(W1 x) * W3 x in float64: what the fused gate+up kernel writes."""
    x = x.double()
    return torch.nn.functional.silu(x @ w1.double().T) * (x @ w3.double().T)


def moe_reference(x, topk_weights, topk_ids, w1, w3, w2) -> torch.Tensor:
    """The MoE layer's output in float64: sum over each token's k experts of weight * expert_mlp(x).
    Weights are cast one expert at a time so full Mixtral shapes fit on a GPU."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64, device=x.device)
    ids = topk_ids.long()
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        y = expert_mlp_reference(x[token], w1[e], w3[e], w2[e])
        out.index_add_(0, token, y * topk_weights[token, slot].double()[:, None])
    return out


def expert_contributions(x, topk_weights, topk_ids, w1, w3, w2) -> torch.Tensor:
    """[M, top_k, hidden] float64: each (token, slot)'s weighted expert output, for diagnosing which
    expert a wrong row is missing."""
    M, k = topk_ids.shape
    out = torch.zeros(M, k, w2.shape[1], dtype=torch.float64, device=x.device)
    ids = topk_ids.long()
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel():
            y = expert_mlp_reference(x[token], w1[e], w3[e], w2[e])
            out[token, slot] = y * topk_weights[token, slot].double()[:, None]
    return out


def dispatch_sizes(tokens: int, top_k: int, experts: int, block_m: int) -> tuple[int, int]:
    """Worst-case (static) sizes of the sorted dispatch: every expert's segment can waste up to
    block_m - 1 padding slots. Static sizes mean no host synchronisation, so a CUDA graph can hold it."""
    max_padded = tokens * top_k + experts * (block_m - 1)
    max_blocks = -(-max_padded // block_m)
    return max_blocks * block_m, max_blocks


def sorted_dispatch_reference(topk_ids: torch.Tensor, experts: int, block_m: int):
    """The dispatch contract every kernel from chapter 2 on uses (as in vLLM's moe_align_block_size).

    Flatten the [M, top_k] choices to slots ``s = token * top_k + k``. Group the slots by expert, in
    increasing slot order inside each expert; pad each expert's segment to a multiple of ``block_m``
    with the sentinel ``M * top_k``; experts with no tokens get no block. Returns

    - ``sorted_token_ids`` int32 [max_blocks * block_m]: slots, sentinel for padding and the unused tail;
    - ``expert_ids`` int32 [max_blocks]: the expert of each block, -1 for blocks past the end;
    - ``num_tokens_post_padded`` int32 [1]: rows in use (a multiple of block_m).
    """
    M, k = topk_ids.shape
    size, max_blocks = dispatch_sizes(M, k, experts, block_m)
    sentinel = M * k
    flat = topk_ids.reshape(-1).long().cpu()
    sorted_ids = torch.full((size,), sentinel, dtype=torch.int32)
    expert_ids = torch.full((max_blocks,), -1, dtype=torch.int32)
    pos = 0
    for e in range(experts):
        slots = torch.nonzero(flat == e).flatten()
        n = slots.numel()
        if n == 0:
            continue
        padded = -(-n // block_m) * block_m
        sorted_ids[pos: pos + n] = slots.int()
        expert_ids[pos // block_m: (pos + padded) // block_m] = e
        pos += padded
    dev = topk_ids.device
    return sorted_ids.to(dev), expert_ids.to(dev), torch.tensor([pos], dtype=torch.int32, device=dev)
