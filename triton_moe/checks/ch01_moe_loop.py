"""Chapter 1 checkers: routing (softmax -> top-k -> renormalise) and the per-expert looped forward."""
from __future__ import annotations

import torch

from ..checking import CheckFailure, compare, exercise, expect_tensor, relative_error, tolerance
from ..mode import default_dtype, device
from ..reference import expert_contributions, make_problem, moe_reference, route_reference
from ..shapes import shape_for_mode
from .common import diagnose_combine

# (tokens, routing): M=1, a size that is no multiple of any block, experts with no tokens, skew.
MOE_CASES = ((1, "uniform"), (37, "empty"), (64, "skewed"), (64, "uniform"))


@exercise("01", "route_topk", points=1,
          hint="probs = softmax(logits, dim=-1); take torch.topk(probs, top_k); divide the k weights by their sum")
def check_route_topk(fn, seed):
    cases = []
    for i, (tokens, routing) in enumerate(((1, "uniform"), (50, "skewed"), (33, "empty"))):
        p = make_problem(shape_for_mode("mixtral"), tokens, torch.float32, device(), seed + i, routing)
        k = p.shape.top_k
        got = fn(p.logits.clone(), k)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckFailure("route_topk should return a pair (topk_weights, topk_ids)")
        w, ids = got
        expect_tensor("topk_weights", w, (tokens, k), device=device())
        expect_tensor("topk_ids", ids, (tokens, k), (torch.int32, torch.int64), device())
        ref_w, ref_ids = route_reference(p.logits, k)
        # Any order of the k slots is fine: compare (expert, weight) pairs sorted by expert id.
        got_ids, order = torch.sort(ids.long().cpu(), dim=1)
        got_w = torch.gather(w.double().cpu(), 1, order)
        exp_ids, exp_order = torch.sort(ref_ids.cpu(), dim=1)
        exp_w = torch.gather(ref_w.cpu(), 1, exp_order)
        bad = (got_ids != exp_ids).any(dim=1).nonzero().flatten()
        if len(bad):
            t = int(bad[0])
            raise CheckFailure(f"token {t}: chose experts {got_ids[t].tolist()}, expected {exp_ids[t].tolist()} "
                               f"({len(bad)} of {tokens} tokens wrong)",
                               hint="top-k of the softmax probabilities along the expert dimension (dim=-1)")
        if relative_error(got_w, exp_w) > 1e-5:
            sums = got_w.sum(dim=1)
            if (sums - 1).abs().max() > 1e-4:
                raise CheckFailure(f"token 0: routing weights sum to {float(sums[0]):.4f}, not 1",
                                   hint="renormalise: divide the top-k probabilities by their sum")
            t = int((got_w - exp_w).abs().max(dim=1).values.argmax())
            raise CheckFailure(f"token {t}: weights {got_w[t].tolist()}, expected {exp_w[t].tolist()}",
                               hint="softmax first (over all experts), then top-k, then renormalise")
        cases.append(f"M={tokens} {routing}")
    return cases


@exercise("01", "moe_forward_loop", points=2,
          hint="for each expert e: find (token, slot) pairs with topk_ids == e, run the SwiGLU MLP on those "
               "tokens, multiply by their topk_weights and index_add_ into the output")
def check_moe_forward_loop(fn, seed):
    dtype = default_dtype()
    cases, failures = [], []
    for i, (tokens, routing) in enumerate(MOE_CASES):
        p = make_problem(shape_for_mode("mixtral"), tokens, dtype, device(), seed + i, routing)
        out = fn(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
        expect_tensor("output", out, (tokens, p.shape.hidden), dtype, device())
        ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
        label = lambda t: f"token {t} / experts {p.topk_ids[t].tolist()}"  # noqa: E731
        try:
            compare("output", out, ref, dtype, label)
        except CheckFailure as exc:
            if "NaN" in exc.message:
                raise
            failures.append((f"M={tokens}, {routing} routing: {exc.message}", p, out, exc.hint))
            continue
        cases.append(f"M={tokens} {routing}")
    if failures:
        # Report the first (simplest) failing case; diagnose on the largest one, where one token's story
        # ("token 0 lacks expert 7") and a whole expert's ("expert 7 is never added") can be told apart.
        message = failures[0][0]
        _, p, out, hint = max(failures, key=lambda f: f[1].tokens)
        raise CheckFailure(message, _diagnose(p, out, dtype) or hint)
    return cases


def _diagnose(p, out, dtype) -> str:
    tol = tolerance(dtype)
    contrib = expert_contributions(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    hint = diagnose_combine(out, contrib, p.topk_weights, p.topk_ids, tol)
    if hint:
        return hint
    for shift in (1, -1):
        alt = moe_reference(p.x, p.topk_weights, (p.topk_ids + shift) % p.shape.experts, p.w1, p.w3, p.w2)
        if relative_error(out, alt) <= tol:
            return f"the output matches using expert e{shift:+d}'s weights for expert e: an off-by-one expert index"
    swapped = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w3, p.w1, p.w2)
    if relative_error(out, swapped) <= tol:
        return "gate and up are swapped: silu goes on W1 x (the gate), then multiply by W3 x (the up)"
    return ""
