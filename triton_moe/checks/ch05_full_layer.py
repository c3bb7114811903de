"""Chapter 5 checkers: the down projection's epilogue (routing weight + combine, atomic and deterministic) and
the whole layer assembled from the chapters' pieces (``fused_experts``).

``down_combine(h, w2, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded, deterministic,
config, out)`` runs on a float64-exact intermediate (the SwiGLU reference rounded to the input dtype) and a
reference dispatch, into a NaN-poisoned output, in both combine modes; it is compared with
``sum_j w_j * h[slot_j] W2[e_j]^T`` in float64. A mismatch is matched against the usual bugs: a missing or
doubled routing weight, a dropped expert, slot or token, rows that overwrite instead of adding.
"""
from __future__ import annotations

import torch

from ..checking import (CheckFailure, Guarded, compare, compare_facts, exercise, expect_tensor, fitted_tolerance,
                        ranges, relative_error)
from ..configs import KernelConfig
from ..mode import ON_GPU, default_dtype, device
from ..reference import expert_contributions, make_problem, moe_reference, sorted_dispatch_reference
from ..shapes import MoEShape, shape_for_mode
from .ch04_fused_gate_up import ODD, projections
from .common import diagnose_combine
from .memcheck import watch

BLOCK_K = 64 if ON_GPU else 32


def case_config(split_k: int = 1, block_m: int = 16) -> KernelConfig:
    return KernelConfig(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=BLOCK_K, GROUP_M=4, num_warps=4,
                        num_stages=3 if ON_GPU else 1, extra={"SPLIT_K": split_k})


def intermediate(p):
    """The SwiGLU intermediate of every slot, rounded to the input dtype (what chapter 4's kernel writes)."""
    g, u = projections(p.x, p.w1, p.w3, p.topk_ids)
    return (torch.nn.functional.silu(g) * u).to(p.x.dtype).to(p.x.device)


def weighted_rows(h, w2, topk_weights, topk_ids):
    """float64 [M, k, hidden]: routing weight * (h[slot] @ W2[e].T) for every (token, slot j)."""
    M, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    y = torch.zeros(M * k, w2.shape[1], dtype=torch.float64, device=h.device)
    for e in torch.unique(flat).tolist():
        s = (flat == e).nonzero().flatten()
        y[s] = h[s].double() @ w2[e].double().T
    return (y.view(M, k, -1) * topk_weights.double()[:, :, None]).cpu()


def diagnose_down(got, C, topk_weights, topk_ids, tol) -> str:
    out = got.detach().double().cpu()
    C = C.cpu()
    ref = C.sum(1)
    zero = (out.abs().amax(dim=1) == 0) & (ref.abs().amax(dim=1) > 0)
    if zero.any():
        t = zero.nonzero().flatten().tolist()
        return (f"token(s) {ranges(t)} received no contribution at all (their rows are exactly 0): rows were dropped; "
                "check the epilogue's mask and the row each slot goes to (token = slot // top_k for the atomic add)")
    M, k = topk_ids.shape
    # most tokens holding, element by element, one of their contributions: rows overwrote each other (on a GPU
    # the last writer can differ from one column block to the next, so compare element-wise)
    closest = (out[:, None, :] - C).abs().amin(dim=1)
    one = closest.norm(dim=1) <= tol * ref.norm(dim=1).clamp_min(1e-12)
    if k > 1 and M >= 4 and one.float().mean() > 0.5:
        return ("most tokens hold exactly ONE of their top-k contributions: the rows of a token overwrite each other "
                "(tl.store where they must be added: tl.atomic_add into row slot // top_k, or per-slot rows + the sum)")
    return diagnose_combine(out, C, topk_weights, topk_ids, tol)


# Non-powers of two everywhere: 6 experts, top-3, hidden 72 (no multiple of BLOCK_N), ffn 48 (K tail), fp16.
ODD6 = MoEShape("6 experts, top-3, odd sizes", hidden=72, ffn=48, experts=6, top_k=3)
# on a GPU: the same structure at sizes tl.dot takes (K a multiple of 16), no power of two
ODD6_GPU = MoEShape("6 experts, top-3", hidden=1040, ffn=720, experts=6, top_k=3)


def cases():
    """(name, shape, tokens, routing, split_k, dtype)."""
    half = torch.float16 if not ON_GPU else default_dtype()
    return (("mixtral", shape_for_mode("mixtral"), 1, "uniform", 1, default_dtype()),
            ("odd", ODD, 37, "empty", 2, default_dtype()),
            ("odd6", ODD6 if not ON_GPU else ODD6_GPU, 13, "skewed", 1, half),
            ("qwen3", shape_for_mode("qwen3"), 24, "skewed", 1, default_dtype()))


def guarded_inputs(p, h, cfg):
    """h, w2 and the routing weights inside NaN-poisoned guard memory: a read past any of them (the padding
    sentinel's row of h, one expert too far in w2, slot instead of flat index) returns NaN into the result."""
    dev = h.device
    S = h.shape[0]
    gh = Guarded("h", h.shape, h.dtype, dev, before=cfg.BLOCK_M, after=S + cfg.BLOCK_M, init=h)
    gw = Guarded("w2", p.w2.shape, p.w2.dtype, dev, before=1, after=1, init=p.w2)
    gt = Guarded("topk_weights", p.topk_weights.shape, p.topk_weights.dtype, dev, before=4, after=S + 4,
                 init=p.topk_weights)
    return gh, gw, gt


def _call_down(fn, where, h, w2, tw, d, det, cfg, out, acc):
    """Run the learner's down_combine under the memory checks; ``acc`` (a guarded zero buffer) only where the
    signature has it."""
    try:
        with watch(races=True) as rec:
            try:
                got = fn(h, w2, tw, *d, det, config=cfg, out=out, acc=acc)
            except TypeError as exc:
                if "acc" not in str(exc):
                    raise
                got = fn(h, w2, tw, *d, det, config=cfg, out=out)
    except CheckFailure as exc:
        hint = exc.hint
        if "acc_ptr" in exc.message and "past the end" in exc.message and getattr(exc, "kind", "") != "columns":
            hint = ("the atomic combine adds each slot's row into its TOKEN's row: token = slot // top_k (acc has "
                    "one row per token, M rows; slot goes up to M * top_k - 1)")
        raise CheckFailure(f"{where}: {exc.message}", hint) from None
    return got, rec


@exercise("05", "down_combine", points=3, kernels=("down_combine_kernel",),
          hint="after the K loop: weight = tl.load(topk_weights_ptr + slot, mask=row_mask, other=0.0); acc *= weight[:, None]; "
               "ATOMIC: tl.atomic_add at row slot // top_k, else tl.store at row slot")
def check_down_combine(fn, seed):
    dev = device()
    done, failures = [], []
    for i, (name, shape, tokens, routing, split_k, dtype) in enumerate(cases()):
        tol = fitted_tolerance(dtype)
        p = make_problem(shape, tokens, dtype, dev, seed + i, routing)
        k, H = shape.top_k, shape.hidden
        h = intermediate(p)
        cfg = case_config(split_k)
        d = sorted_dispatch_reference(p.topk_ids, shape.experts, cfg.BLOCK_M)
        C = weighted_rows(h, p.w2, p.topk_weights, p.topk_ids)
        ref = C.sum(1)
        gh, gw, gt = guarded_inputs(p, h, cfg)
        dname = str(dtype).replace("torch.", "")
        for det in (False, True):
            mode = "deterministic (per-slot rows + ordered sum)" if det else f"atomic combine, split-K {split_k}"
            where = f"{name}, M={tokens}, top-{k} of {shape.experts} experts, hidden={H}, ffn={shape.ffn}, {dname}, " \
                    f"{routing} routing, {mode}"
            # guards deep enough for row `slot` instead of `token` (top_k times too far) and for a sentinel row
            out = Guarded("out", (tokens, H), dtype, dev, before=cfg.BLOCK_M, after=tokens * k + cfg.BLOCK_M)
            acc = Guarded("acc", (tokens, H), torch.float32, dev, before=cfg.BLOCK_M, after=tokens * k + cfg.BLOCK_M,
                          guard_value=7777.0)
            acc.view.zero_()   # an output (the atomic adds' target), zero as down_combine's acc= promises
            got, rec = _call_down(fn, where, gh.view, gw.view, gt.view, d, det, cfg, out.view,
                                  None if det else acc.view)
            expect_tensor("down_combine's result", got, (tokens, H), dtype, dev)
            for g in (out, acc, gh, gw, gt):
                g.check(where, hint="token = slot // top_k for the atomic add; mask padding rows (slot < num_slots) "
                                    "and columns (offs_n < N)")
            label = lambda t, ids=p.topk_ids: f"token {t} / experts {ids[t].tolist()}"  # noqa: E731
            try:
                compare_facts("output", got, ref, dtype, label, tol=tol)
            except CheckFailure as exc:
                failures.append((tokens, where, exc, got, C, p.topk_weights, p.topk_ids, tol))
                break
            rec.require(fn, ("down_combine_kernel",), "the combined output")
            if det and i == 0:
                with watch():
                    again = fn(h, p.w2, p.topk_weights, *d, True, config=cfg)
                if not torch.equal(again, got):
                    raise CheckFailure(f"{where}: two runs on the same input differ "
                                       f"(max difference {float((again.double() - got.double()).abs().max()):.3g})",
                                       hint="deterministic mode must not use atomics: store each slot's row, then sum "
                                            "each token's rows in a fixed order")
        else:
            done.append(f"{name} M={tokens} E={shape.experts} k={k} {dname} {routing} (atomic + deterministic)")
    if failures:
        # diagnose the largest failing case first: with one token, a dropped row and an overwrite look alike
        failures.sort(key=lambda f: -f[0])
        others = f" ({len(failures)} of {len(cases())} cases fail)" if len(failures) > 1 else ""
        for tokens, where, exc, got, C, tw, ti, tol in failures:
            if "NaN" in exc.message:
                raise CheckFailure(f"{where}: {exc.message}", exc.hint)
            hint = diagnose_down(got, C, tw, ti, tol)
            if hint:
                raise CheckFailure(f"{where}: {exc.message}{others}", hint)
        tokens, where, exc = failures[0][:3]
        raise CheckFailure(f"{where}: {exc.message}{others}", "")
    return done


@exercise("05", "fused_experts", points=1,
          hint="dispatch with the gate+up config's BLOCK_M, then fused_gate_up, then down_combine on the same dispatch")
def check_fused_experts(fn, seed):
    dev = device()
    done = []
    # (shape, tokens, routing, dtype, deterministic, pass out=): Mixtral, Qwen3, 6 experts top-3 in fp16 with the
    # deterministic combine and an out= buffer (every option of the signature)
    half = torch.float16 if not ON_GPU else default_dtype()
    plan = ((shape_for_mode("mixtral"), 5, "uniform", default_dtype(), False, False),
            (shape_for_mode("qwen3"), 20, "skewed", default_dtype(), False, True),
            (ODD6 if not ON_GPU else ODD6_GPU, 9, "uniform", half, True, True))
    for i, (shape, tokens, routing, dtype, det, pass_out) in enumerate(plan):
        tol = fitted_tolerance(dtype)
        p = make_problem(shape, tokens, dtype, dev, seed + i, routing)
        where = (f"{shape.name}, M={tokens}, E={shape.experts}, top_k={shape.top_k}, "
                 f"{str(dtype).replace('torch.', '')}, {routing} routing, deterministic={det}"
                 + (", out= given" if pass_out else ""))
        out = Guarded("out", (tokens, shape.hidden), dtype, dev, before=16, after=tokens * shape.top_k + 16)
        kwargs = {"deterministic": det} if det else {}
        if pass_out:
            kwargs["out"] = out.view
        try:
            with watch():
                got = fn(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2, **kwargs)
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}", exc.hint) from None
        expect_tensor("fused_experts' result", got, (tokens, shape.hidden), dtype, dev)
        out.check(where)
        if pass_out and got.data_ptr() != out.view.data_ptr():
            raise CheckFailure(f"{where}: the result is not the out= tensor that was passed",
                               hint="pass out through to down_combine (its last argument) and return it")
        ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
        try:
            compare("output", got, ref, dtype, lambda t: f"token {t} / experts {p.topk_ids[t].tolist()}", tol=tol)
        except CheckFailure as exc:
            if "NaN" in exc.message:
                raise CheckFailure(f"{where}: {exc.message}", exc.hint) from None
            C = expert_contributions(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
            dtol = max(tol, 1e-4)
            hint = diagnose_down(got, C, p.topk_weights, p.topk_ids, dtol)
            if not hint and relative_error(got, moe_reference(p.x, p.topk_weights, p.topk_ids, p.w3, p.w1, p.w2)) <= dtol:
                hint = "gate and up are swapped: fused_gate_up takes (x, w1, w3, ...): W1 is the gate, W3 the up"
            raise CheckFailure(f"{where}: {exc.message}", hint) from None
        done.append(f"{shape.name} M={tokens} {routing} {str(dtype).replace('torch.', '')}"
                    + (" deterministic" if det else "") + (" out=" if pass_out else ""))
    return done
