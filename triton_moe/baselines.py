"""Chapter 1's solutions as importable baselines: the benchmarks of later chapters time the naive loop
beside their kernels. The chapter 1 notebook shows these definitions (``python -m triton_moe sync`` copies
them into it); the ``### BEGIN/END SOLUTION`` and ``# HINT:`` comments mark its exercises (docs/authoring.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route_topk(logits: torch.Tensor, top_k: int):
    """logits: [M, E] router scores. Returns (topk_weights float32 [M, top_k], topk_ids [M, top_k])."""
    ### BEGIN SOLUTION
    # HINT: torch.softmax(logits.float(), dim=-1), then torch.topk(..., top_k, dim=-1), then divide by the sum
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids
    ### END SOLUTION


def moe_forward_loop(x, topk_weights, topk_ids, w1, w3, w2):
    """x: [M, hidden]; topk_weights: [M, k] float32; topk_ids: [M, k];
    w1, w3: [E, ffn, hidden] (gate, up); w2: [E, hidden, ffn] (down). Returns [M, hidden] in x.dtype."""
    ### BEGIN SOLUTION
    # HINT: out = zeros(float32); for e in range(E): token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
    # HINT: y = (silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T; out.index_add_(0, token, y * weight[:, None])
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if token.numel() == 0:
            continue  # an expert nobody chose costs nothing
        h = x[token]
        y = (F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None])
    return out.to(x.dtype)
    ### END SOLUTION


def grouped_mm_experts(x, topk_weights, topk_ids, w1t, w3t, w2t):
    """PyTorch's own grouped GEMM (``torch._grouped_mm``), the baseline of chapters 3 and 5: stable argsort of
    the slots by expert, gather the rows, gate and up GEMMs, SwiGLU, down GEMM, routing weight, ``index_add_``.

    ``w1t, w3t, w2t``: ``[E, K, N]`` views (``w.transpose(1, 2)`` of the stacked ``[E, N, K]`` weights). With
    ``w3t=None``, ``w1t`` is the concatenated ``[E, hidden, 2 * ffn]`` (gate columns, then up): one GEMM."""
    M, k = topk_ids.shape
    E = w1t.shape[0]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)              # slots grouped by expert, slot order inside
    token = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[token]
    if w3t is None:
        gu = torch._grouped_mm(xs, w1t, offs=offs)
        h = F.silu(gu[:, : gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2:]
    else:
        h = F.silu(torch._grouped_mm(xs, w1t, offs=offs)) * torch._grouped_mm(xs, w3t, offs=offs)
    y = torch._grouped_mm(h, w2t, offs=offs).float() * topk_weights.reshape(-1)[order, None]
    return torch.zeros(M, w2t.shape[2], dtype=torch.float32, device=x.device).index_add_(0, token, y).to(x.dtype)
