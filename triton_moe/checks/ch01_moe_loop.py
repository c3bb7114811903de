"""Chapter 1 checkers: routing (softmax -> top-k -> renormalise) and the per-expert looped forward."""
from __future__ import annotations

import torch

from ..checking import CheckFailure, compare, exercise, expect_tensor, fitted_tolerance, relative_error
from ..mode import ON_GPU, default_dtype, device
from ..reference import expert_contributions, make_problem, moe_reference, route_reference
from ..shapes import MoEShape, shape_for_mode
from .common import diagnose_combine

# Non-power-of-two shapes on the CPU: 6 experts with top-3, 12 experts with top-1 (the loop must read E and k
# from the tensors, not assume Mixtral's 8 and 2).
SIX = MoEShape("6 experts, top-3", hidden=48, ffn=40, experts=6, top_k=3)
TWELVE = MoEShape("12 experts, top-1", hidden=40, ffn=24, experts=12, top_k=1)


def _moe_cases():
    """(shape, tokens, routing, dtype): M=1, a size no block divides, experts with no tokens, skew, other
    expert counts and top-k, and half precision (the output must come back in x's dtype)."""
    half = torch.float16 if not ON_GPU else default_dtype()
    return ((shape_for_mode("mixtral"), 1, "uniform", default_dtype()),
            (shape_for_mode("mixtral"), 37, "empty", default_dtype()),
            (SIX if not ON_GPU else shape_for_mode("qwen3"), 29, "skewed", default_dtype()),
            (TWELVE, 20, "uniform", half),
            (shape_for_mode("qwen3"), 64, "skewed", default_dtype()))


def _plant_ties(logits: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    """Exact ties at every rank: in token t, the experts ranked r and r+1 get the same logit, r = t mod E-1 (the
    first place included, where a selection that masks every column equal to the max drops both)."""
    M, E = logits.shape
    rows = []
    for t in range(M):
        r = t % (E - 1)
        if r > k:   # ties below the k-th place change nothing
            continue
        order = torch.sort(logits[t].double(), descending=True, stable=True).indices
        logits[t, order[r + 1]] = logits[t, order[r]]
        rows.append(t)
    return rows


@exercise("01", "route_topk", points=1,
          hint="probs = softmax(logits, dim=-1); take torch.topk(probs, top_k); divide the k weights by their sum")
def check_route_topk(fn, seed):
    gen = torch.Generator().manual_seed(seed)
    cases = []
    # (shape, tokens, routing, logit scale): tiny logits, Qwen3's 128 experts (16 on the CPU), 6 experts top-3,
    # and logits of magnitude ~100 (exp overflows float32: the softmax must subtract the row max)
    plan = ((shape_for_mode("mixtral"), 1, "uniform", 1.0), (shape_for_mode("qwen3"), 50, "skewed", 1.0),
            (SIX, 33, "empty", 1.0), (shape_for_mode("mixtral"), 24, "uniform", 120.0))
    for i, (shape, tokens, routing, scale) in enumerate(plan):
        p = make_problem(shape, tokens, torch.float32, device(), seed + i, routing)
        k, E = shape.top_k, shape.experts
        # a large common offset per row: exp overflows float32 (exp(89) > 3.4e38), the softmax does not change
        offset = scale * (1 + torch.rand(tokens, 1, generator=gen)).to(p.logits.device)
        logits = (p.logits + offset).float() if scale > 1 else p.logits.clone()
        _plant_ties(logits, k, gen)
        where = f"M={tokens}, E={E}, top_k={k}" + (f", logits up to {float(logits.abs().max()):.0f}" if scale > 1 else "")
        got = fn(logits.clone(), k)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckFailure("route_topk should return a pair (topk_weights, topk_ids)")
        w, ids = got
        expect_tensor("topk_weights", w, (tokens, k), torch.float32, device())
        expect_tensor("topk_ids", ids, (tokens, k), (torch.int32, torch.int64), device())
        if torch.isnan(w).any() or torch.isinf(w).any():
            t = int((torch.isnan(w) | torch.isinf(w)).any(dim=1).nonzero()[0])
            raise CheckFailure(f"{where}: token {t} has weights {w[t].tolist()}",
                               hint="exp of a large logit overflows float32: subtract the row max before exp "
                                    "(torch.softmax does)" if scale > 1 else "")
        ref_w, ref_ids = route_reference(logits, k)
        # Any order of the k slots is fine, and among EQUAL logits any expert is (torch.topk does not promise
        # which): a token's choice is right when its experts are distinct and their logits are the k largest.
        lg = logits.double().cpu()
        got_ids = ids.long().cpu()
        if ((got_ids < 0) | (got_ids >= E)).any():
            t = int(((got_ids < 0) | (got_ids >= E)).any(dim=1).nonzero()[0])
            raise CheckFailure(f"{where}: token {t} chose experts {got_ids[t].tolist()}: ids must be in [0, {E})")
        got_vals, order = torch.sort(torch.gather(lg, 1, got_ids), dim=1, descending=True)
        exp_vals = torch.sort(torch.gather(lg, 1, ref_ids.cpu()), dim=1, descending=True).values
        dup = torch.tensor([len(set(r.tolist())) < k for r in got_ids], dtype=torch.bool)
        bad = ((got_vals != exp_vals).any(dim=1) | dup).nonzero().flatten()
        if len(bad):
            t = int(bad[0])
            row = lg[t]
            tied = len(set(row.tolist())) < E
            raise CheckFailure(f"{where}: token {t} chose experts {sorted(got_ids[t].tolist())}, expected "
                               f"{sorted(ref_ids[t].tolist())} ({len(bad)} of {tokens} tokens wrong)" +
                               ("; the same expert twice" if bool(dup[t]) else "") +
                               ("; this token has experts with EQUAL logits: a tie must not remove both (or pick "
                                "one twice)" if tied else ""),
                               hint="top-k of the softmax probabilities along the expert dimension (dim=-1)")
        # weights matched by value: sorted in decreasing order on both sides
        got_w = torch.gather(w.double().cpu(), 1, order)
        exp_w = torch.sort(ref_w.cpu(), dim=1, descending=True).values
        got_ids = torch.gather(got_ids, 1, order)
        err = relative_error(got_w, exp_w)
        if err > 1e-5:
            t = int((got_w - exp_w).abs().max(dim=1).values.argmax())
            sums = got_w.sum(dim=1)
            raw = torch.gather(torch.softmax(logits.double(), -1).cpu(), 1, got_ids)
            msg = (f"{where}: token {t} has weights {[round(v, 6) for v in got_w[t].tolist()]}, expected "
                   f"{[round(v, 6) for v in exp_w[t].tolist()]} (relative error {err:.2g}; they sum to "
                   f"{float(sums[t]):.6f})")
            if relative_error(got_w, raw) <= 1e-5:
                raise CheckFailure(msg, hint="these are the softmax probabilities themselves: renormalise, divide the "
                                             "k chosen probabilities by their sum")
            raise CheckFailure(msg, hint="")
        cases.append(f"M={tokens} E={E} k={k} {routing}" + (" large logits" if scale > 1 else ""))
    return cases


@exercise("01", "moe_forward_loop", points=2,
          hint="for each expert e: find (token, slot) pairs with topk_ids == e, run the SwiGLU MLP on those "
               "tokens, multiply by their topk_weights and index_add_ into the output")
def check_moe_forward_loop(fn, seed):
    cases, failures = [], []
    for i, (shape, tokens, routing, dtype) in enumerate(_moe_cases()):
        p = make_problem(shape, tokens, dtype, device(), seed + i, routing)
        out = fn(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
        where = f"M={tokens}, E={shape.experts}, top_k={shape.top_k}, {str(dtype).replace('torch.', '')}, {routing} routing"
        try:
            expect_tensor("output", out, (tokens, p.shape.hidden), dtype, device())
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}", exc.hint) from None
        ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
        label = lambda t: f"token {t} / experts {p.topk_ids[t].tolist()}"  # noqa: E731
        try:
            compare("output", out, ref, dtype, label, tol=fitted_tolerance(dtype))
        except CheckFailure as exc:
            if "NaN" in exc.message:
                raise CheckFailure(f"{where}: {exc.message}", exc.hint) from None
            failures.append((f"{where}: {exc.message}", p, out, exc.hint, dtype))
            continue
        cases.append(f"M={tokens} E={shape.experts} k={shape.top_k} {str(dtype).replace('torch.', '')} {routing}")
    if failures:
        # Report the first (simplest) failing case; diagnose on the largest one, where one token's story
        # ("token 0 lacks expert 7") and a whole expert's ("expert 7 is never added") can be told apart.
        message = failures[0][0]
        _, p, out, hint, dtype = max(failures, key=lambda f: f[1].tokens)
        raise CheckFailure(message, _diagnose(p, out, dtype))
    return cases


def _diagnose(p, out, dtype) -> str:
    tol = max(fitted_tolerance(dtype), 1e-4)
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
