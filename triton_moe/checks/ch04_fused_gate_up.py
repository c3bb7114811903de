"""Chapter 4 checker: the fused gate+up SwiGLU kernel (its K loop and its epilogue).

The learner's host function ``fused_gate_up(x, w1, w3, sorted_token_ids, expert_ids, num_tokens_post_padded,
top_k, config=None, out=None)`` runs on a reference dispatch into a NaN-poisoned output; every slot's row is
compared with ``silu(x W1[e]^T) * (x W3[e]^T)`` in float64. On a mismatch the checker tries the usual
mistakes (gate and up swapped, silu on the wrong operand, the activation inside the K loop, the wrong
expert) and names the one that reproduces the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checking import (CheckFailure, Guarded, compare_facts, exercise, expect_tensor, fitted_tolerance, ranges,
                        relative_error)
from ..configs import KernelConfig
from ..mode import ON_GPU, default_dtype, device
from ..reference import make_problem, sorted_dispatch_reference
from ..shapes import MoEShape, shape_for_mode
from .memcheck import watch

# K and N tails: hidden = 80 is no multiple of BLOCK_K, ffn = 96 none of BLOCK_N.
ODD = MoEShape("odd sizes (K and N tails)", hidden=80, ffn=96, experts=4, top_k=2)
BLOCK_K = 64 if ON_GPU else 32   # several K steps, so an activation inside the loop shows


def case_config(block_m: int = 16) -> KernelConfig:
    """The launch config the checker passes (several K iterations on purpose)."""
    return KernelConfig(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=BLOCK_K, GROUP_M=4, num_warps=4,
                        num_stages=3 if ON_GPU else 1)


# No power of two anywhere: 6 experts, top-3, hidden 72 (K tail), ffn 40 (N tail); fp16 on the CPU.
ODD6 = MoEShape("6 experts, top-3, odd sizes", hidden=72, ffn=40, experts=6, top_k=3)


def cases():
    """(name, shape, tokens, routing, dtype)."""
    dt = default_dtype()
    return (("mixtral", shape_for_mode("mixtral"), 1, "uniform", dt),
            ("odd", ODD, 37, "empty", dt),
            ("odd6", ODD6, 13, "skewed", torch.float16),
            ("qwen3", shape_for_mode("qwen3"), 24, "skewed", dt))


def projections(x, w1, w3, topk_ids):
    """float64 gate and up projections of every slot: ([S, ffn], [S, ffn])."""
    M, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    tok = torch.arange(M * k, device=x.device) // k
    xd = x.detach().double()
    g = torch.zeros(M * k, w1.shape[1], dtype=torch.float64, device=x.device)
    u = torch.zeros_like(g)
    for e in torch.unique(flat).tolist():
        s = (flat == e).nonzero().flatten()
        g[s] = xd[tok[s]] @ w1[e].double().T
        u[s] = xd[tok[s]] @ w3[e].double().T
    return g.cpu(), u.cpu()


def chunked(x, w1, w3, topk_ids, block_k: int):
    """The activation applied inside the K loop: per K block c, silu(g_c) * u_c summed over the blocks
    (``h += ...`` in the loop), and the last block's alone (``h = ...`` in the loop)."""
    H = x.shape[1]
    total = last = None
    for k0 in range(0, H, block_k):
        sl = slice(k0, min(H, k0 + block_k))
        g, u = projections(x[:, sl], w1[:, :, sl], w3[:, :, sl], topk_ids)
        part = F.silu(g) * u
        total = part if total is None else total + part
        last = part
    return total, last


def diagnose(out, x, w1, w3, topk_ids, tol, block_k: int) -> str:
    got = out.detach().double().cpu()
    g, u = projections(x, w1, w3, topk_ids)
    candidates = [
        (F.silu(u) * g, "gate and up are swapped: silu belongs on the gate projection W1 x (acc_gate), which then "
                        "multiplies the up projection W3 x (acc_up) -- silu was applied to up (or w1/w3 swapped)"),
        (F.silu(g) * F.silu(u), "silu was applied to the up projection too: only the gate gets silu, h = silu(gate) * up"),
        (F.silu(g * u), "silu was applied to the product: h = silu(gate) * up, not silu(gate * up)"),
        (g * u, "the output is gate * up with no silu: apply silu(g) = g * sigmoid(g) to the gate accumulator"),
        (F.silu(g), "the output is silu(gate) alone: multiply it by the up accumulator"),
        (g, "the output is the gate projection alone: no activation, no up"),
    ]
    for cand, hint in candidates:
        if relative_error(got, cand) <= tol:
            return hint
    for bk in sorted({block_k, 16, 32, 64, 128}):
        if bk >= x.shape[1]:
            continue
        total, last = chunked(x, w1, w3, topk_ids, bk)
        if relative_error(got, total) <= tol or relative_error(got, last) <= tol:
            return (f"the output matches silu applied to partial sums inside the K loop (BLOCK_K = {bk}): silu is "
                    "not linear, so accumulate acc_gate and acc_up over ALL of K first and apply the activation "
                    "once, after the loop (the epilogue)")
    E = w1.shape[0]
    for shift in (1, -1):
        g2, u2 = projections(x, w1, w3, (topk_ids.long() + shift) % E)
        if relative_error(got, F.silu(g2) * u2) <= tol:
            return f"the output matches expert e{shift:+d}'s weights for expert e: an off-by-one expert index"
    return ""


@exercise("04", "fused_gate_up", points=3, kernels=("fused_gate_up_kernel",),
          hint="in the K loop load the x tile once and a W1 and a W3 tile, accumulate two tl.dot products in fp32; "
               "after the loop h = silu(acc_gate) * acc_up")
def check_fused_gate_up(fn, seed):
    dev = device()
    done = []
    for i, (name, shape, tokens, routing, dtype) in enumerate(cases()):
        tol = fitted_tolerance(dtype)
        p = make_problem(shape, tokens, dtype, dev, seed + i, routing)
        k, E = shape.top_k, shape.experts
        cfg = case_config()
        st, ei, npp = sorted_dispatch_reference(p.topk_ids, E, cfg.BLOCK_M)
        S = tokens * k
        # NaN guards: a read past x, w1 or w3 shows as NaN in h; a write past h lands in its guard. Deep enough
        # for a gather of row `slot` (top_k times too far), the sentinel row and one expert too far.
        gx = Guarded("x", p.x.shape, dtype, dev, before=cfg.BLOCK_M, after=S + cfg.BLOCK_M, init=p.x)
        g1 = Guarded("w1", p.w1.shape, dtype, dev, before=1, after=1, init=p.w1)
        g3 = Guarded("w3", p.w3.shape, dtype, dev, before=1, after=1, init=p.w3)
        out = Guarded("out", (S, shape.ffn), dtype, dev, before=cfg.BLOCK_M, after=st.numel() + 2)
        where = f"{name}, M={tokens}, top-{k} of {E} experts, hidden={shape.hidden}, ffn={shape.ffn}, " \
                f"{str(dtype).replace('torch.', '')}, {routing} routing"
        try:
            with watch() as rec:
                got = fn(gx.view, g1.view, g3.view, st, ei, npp, k, config=cfg, out=out.view)
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}", _fault_hint(exc)) from None
        expect_tensor("fused_gate_up's result", got, (S, shape.ffn), dtype, dev)
        if got.data_ptr() != out.view.data_ptr():
            raise CheckFailure(f"{where}: the result is not the out= tensor that was passed",
                               hint="when out is given, the kernel must write into it and the function return it")
        for g in (out, gx, g1, g3):
            g.check(where, hint="store row `slot`, mask padding rows (slot < num_slots) and columns (offs_n < N)")
        g, u = projections(p.x, p.w1, p.w3, p.topk_ids)
        ref = F.silu(g) * u
        flat = p.topk_ids.reshape(-1).tolist()
        label = lambda s: f"slot {s} (token {s // k}, expert {flat[s]})"  # noqa: E731
        try:
            compare_facts("intermediate h", got, ref, dtype, label, tol=tol)
        except CheckFailure as exc:
            if "NaN" in exc.message:
                nan_slots = torch.isnan(got.detach().double().cpu()).any(dim=1).nonzero().flatten().tolist()
                experts = sorted({flat[s] for s in nan_slots})
                whole = [e for e in experts if all(s in set(nan_slots) for s in range(len(flat)) if flat[s] == e)]
                hint = exc.hint
                if whole:
                    hint = (f"every slot of expert(s) {whole} was left unwritten (slots {ranges(nan_slots)}): is the grid "
                            "or the early exit skipping their blocks, or the store mask dropping rows? " + exc.hint)
                raise CheckFailure(f"{where}: {exc.message}", hint) from None
            hint = diagnose(got, p.x, p.w1, p.w3, p.topk_ids, max(tol, 1e-4), cfg.BLOCK_K)
            raise CheckFailure(f"{where}: {exc.message}", hint) from None
        rec.require(fn, ("fused_gate_up_kernel",), "the intermediate h")
        done.append(f"{name} M={tokens} E={E} k={k} {str(dtype).replace('torch.', '')} {routing}")
    return done


def _fault_hint(exc: CheckFailure) -> str:
    kind, msg = getattr(exc, "kind", ""), exc.message
    if kind == "columns":
        return ("mask the columns past N (offs_n < N) on the W1/W3 loads and the store, and the K tail "
                "(offs_k < K - k * BLOCK_K) on every load, with other=0.0")
    if "x_ptr" in msg and "read" in msg:
        return "x has one row per TOKEN: gather row slot // top_k, and mask padding rows (slot < num_slots)"
    if ("w1_ptr" in msg or "w3_ptr" in msg) and "read" in msg:
        return "is the expert index off-by-one? expert e's matrix starts at w + e * stride_we, e = expert_ids[pid_m]"
    if "out_ptr" in msg or "h_ptr" in msg:
        return "store row `slot` (not the sorted row), and mask padding rows (slot < num_slots) and columns (offs_n < N)"
    return exc.hint
