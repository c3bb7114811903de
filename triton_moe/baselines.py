"""Chapter 1's solutions as importable baselines: the benchmarks of later chapters time the naive loop
beside their kernels. The chapter 1 notebook mirrors these definitions (tests/test_mirrors.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route_topk(logits: torch.Tensor, top_k: int):
    """logits: [M, E] router scores. Returns (topk_weights float32 [M, top_k], topk_ids [M, top_k])."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def moe_forward_loop(x, topk_weights, topk_ids, w1, w3, w2):
    """x: [M, hidden]; topk_weights: [M, k] float32; topk_ids: [M, k];
    w1, w3: [E, ffn, hidden] (gate, up); w2: [E, hidden, ffn] (down). Returns [M, hidden] in x.dtype."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue  # an expert nobody chose costs nothing
        h = x[token]
        y = (F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None])
    return out.to(x.dtype)
