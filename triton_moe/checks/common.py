"""Diagnoses shared by the checkers of chapters that combine expert outputs (1 and 5)."""
from __future__ import annotations

import torch

from ..checking import relative_error


def diagnose_combine(out: torch.Tensor, contributions: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, tol: float) -> str:
    """Given a wrong combined output [M, H] and the float64 weighted contributions [M, k, H] of each
    (token, slot), recognise the usual bugs and say which one it looks like. Empty string if none fits."""
    out = out.detach().double().cpu()
    C = contributions.cpu()
    w = topk_weights.detach().double().cpu()[:, :, None]
    ids = topk_ids.cpu()
    unweighted = C / w
    ref = C.sum(1)
    close = lambda cand: relative_error(out, cand) <= tol  # noqa: E731
    if close(unweighted.sum(1)):
        return "the output matches the expert outputs WITHOUT the routing weights: multiply each expert's output by its topk_weight"
    if close((C * w).sum(1)):
        return "the output matches each expert's output times its routing weight SQUARED: the weight is applied twice"
    if close(2 * ref) or close(ref / 2):
        return "the output is off by a factor of 2: check that each (token, expert) pair is added exactly once"
    # One expert's contribution missing everywhere (e.g. range(E - 1))?
    for e in torch.unique(ids).tolist():
        if int((ids == e).any(dim=1).sum()) >= 2 and close(ref - (C * (ids == e)[:, :, None]).sum(1)):
            return f"the output matches the reference with expert {e}'s contribution left out: is a loop skipping expert {e}?"
    # Per-token: which slots are missing? (any subset: top_k is at most 8 here)
    bad = ((out - ref).norm(dim=1) > tol * ref.norm(dim=1).clamp_min(1e-12)).nonzero().flatten().tolist()
    k = C.shape[1]
    for t in bad[:1]:
        for mask in range(1, 2 ** k - 1):
            kept = [s for s in range(k) if mask >> s & 1]
            if relative_error(out[t], C[t, kept].sum(0)) <= tol:
                missing = [s for s in range(k) if s not in kept]
                experts = [int(ids[t, s]) for s in missing]
                return (f"token {t} is missing the contribution of expert(s) {experts} (its slot(s) {missing}); "
                        f"{len(bad)} token(s) are wrong in all: is every (token, slot) pair with that expert found?")
    return ""
