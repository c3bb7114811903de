"""Chapter 8 checkers: per-token-group activation quantisation, the fp8 gate+up kernel (block scales in the
loop, per-channel scales in the epilogue) and the fp8 layer.

Inputs are built so that scale mistakes show: every 128x128 weight block and every 1x128 activation group is
multiplied by its own random power of two (2^-4 .. 2^4) before quantisation, so a scale taken from the wrong
block is off by up to 256x, not by the few percent that separate the blocks of plain random weights.
References are float64 from the DEQUANTISED tensors (``fp8 * scale``): the kernel's only error left is its
fp32 accumulation. Outputs are NaN-poisoned; scale tensors are views into buffers with NaN guards just past
their K and N blocks (a scale read from the wrong block index that falls outside makes NaN, not a silent
wrong answer). A mismatch is replayed in float64 against the usual mistakes (scale multiplied where it must
divide, transposed block index, the program's block instead of the column's, the running sum scaled,
fp8 where fp32 belongs, fn and fnuz confused) and the one that reproduces the output is named.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checking import CheckFailure, compare, exercise, expect_tensor, poisoned, ranges, relative_error, tolerance
from ..configs import KernelConfig
from ..mode import ON_GPU, default_dtype, device
from ..reference import make_problem, moe_reference, sorted_dispatch_reference
from ..shapes import MoEShape

GROUP = 128
# Two K blocks (hidden 256) and two N blocks of 128 (ffn 256); the odd shape has K and N tails.
TWO_BLOCKS = MoEShape("two 128-blocks each way", hidden=256, ffn=256, experts=4, top_k=2)
ODD = MoEShape("odd sizes (K and N tails)", hidden=200, ffn=160, experts=4, top_k=2)
# BLOCK_K = 64: two K steps per scale block (the step index is not the block index);
# BLOCK_N = 64: two programs per N block (the program's index is not the block index).
CASE_CONFIG = KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=3 if ON_GPU else 1)


def fp8_for_this_machine() -> torch.dtype:
    from ..kernels.fp8 import fp8_dtype

    return fp8_dtype()


# --------------------------------------------------------------------------------------------------
# Inputs with block-to-block scale spread, and float64 references


def _spread(gen, *blocks) -> torch.Tensor:
    return torch.exp2(torch.randint(-4, 5, blocks, generator=gen).double())


def spread_weights(w: torch.Tensor, gen: torch.Generator, scheme: str) -> torch.Tensor:
    """w [E, N, K] with each 128x128 block (block) or each row (channel) times its own power of two."""
    E, n, k = w.shape
    if scheme == "channel":
        f = _spread(gen, E, n)[:, :, None]
    else:
        f = _spread(gen, E, -(-n // GROUP), -(-k // GROUP)).repeat_interleave(GROUP, 1)[:, :n]
        f = f.repeat_interleave(GROUP, 2)[:, :, :k]
    return (w.double().cpu() * f).float().to(w.device)


def spread_rows(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    M, k = x.shape
    f = _spread(gen, M, -(-k // GROUP)).repeat_interleave(GROUP, 1)[:, :k]
    return (x.double().cpu() * f).float().to(x.device)


def quantize_act_reference(x: torch.Tensor, dtype: torch.dtype, group: int = GROUP):
    """torch's per-token-group quantisation (scale = amax / fp8 max, RNE cast): (q, scale)."""
    from ..kernels.fp8 import fp8_format

    fmax, _ = fp8_format(dtype)
    M, k = x.shape
    xf = x.float()
    pad = F.pad(xf, (0, -(-k // group) * group - k))
    scale = pad.view(M, -1, group).abs().amax(-1).clamp_min(1e-10) / fmax
    q = (xf / scale.repeat_interleave(group, 1)[:, :k]).clamp(-fmax, fmax).to(dtype)
    return q, scale


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A view of t inside a NaN buffer one larger in every dimension: reads past its end hit NaN."""
    buf = torch.full([s + 1 for s in t.shape], float("nan"), dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(0, s) for s in t.shape)]
    view.copy_(t)
    return view


def guarded_experts(q):
    from ..kernels.fp8 import QuantizedExperts

    return QuantizedExperts(q.w1, q.w3, q.w2, guarded(q.w1_scale), guarded(q.w3_scale), guarded(q.w2_scale),
                            q.scheme, q.block_shape)


def _slots(topk_ids):
    M, k = topk_ids.shape
    return topk_ids.reshape(-1).long().cpu(), torch.arange(M * k) // k


def block_partials(x8, xs, w8, ws, topk_ids, step: int):
    """float64 partial dots per K step of ``step`` columns: P [S, N, steps], with the activation scale
    [S, steps] and the weight scale [S, N, steps] of each step's 128-block (correct indices), for replaying."""
    flat, tok = _slots(topk_ids)
    S = flat.numel()
    E, N, K = w8.shape
    steps = -(-K // step)
    P = torch.zeros(S, N, steps, dtype=torch.float64)
    for j in range(steps):
        sl = slice(j * step, min(K, (j + 1) * step))
        P[:, :, j] = torch.einsum("sk,snk->sn", x8[tok][:, sl], w8[flat][:, :, sl])
    return P


def _scale_maps(xs, ws, topk_ids, N, K, step, block_n):
    """Activation scale per (slot, step) and weight scale per (slot, column, step) under several index maps."""
    flat, tok = _slots(topk_ids)
    steps = -(-K // step)
    kb = torch.arange(steps) * step // GROUP
    nb = torch.arange(N) // GROUP
    a = xs[tok][:, kb]                                         # [S, steps]
    w = {"right": ws[flat][:, nb][:, :, kb]}
    nK, nN = ws.shape[2], ws.shape[1]
    if nK == nN:
        w["transposed"] = ws.transpose(1, 2)[flat][:, nb][:, :, kb]
    pidn = (torch.arange(N) // block_n).clamp_max(nN - 1)
    w["program"] = ws[flat][:, pidn][:, :, kb]
    w["first K block"] = ws[flat][:, nb][:, :, kb * 0]
    return a, w


def replay_gate_up(P1, P3, a, w1s, w3s, how: str):
    """silu(g) * u from step partials, with the scales combined as ``how`` says."""
    def acc(P, ws):
        s = a[:, None, :] * ws
        if how == "divided":
            return (P / s).sum(-1)
        if how == "no scale":
            return P.sum(-1)
        if how == "weight scale only":
            return (P * ws).sum(-1)
        if how == "activation scale only":
            return (P * a[:, None, :]).sum(-1)
        if how == "running sum scaled":
            out = torch.zeros_like(P[:, :, 0])
            for j in range(P.shape[-1]):
                out = (out + P[:, :, j]) * s[:, :, j]
            return out
        if how == "fp8 accumulator":
            out = torch.zeros_like(P[:, :, 0])
            for j in range(P.shape[-1]):
                out = (out + P[:, :, j] * s[:, :, j]).float().to(torch.float8_e4m3fn).double()
            return out
        return (P * s).sum(-1)
    g, u = acc(P1, w1s), acc(P3, w3s)
    return F.silu(g) * u


BLOCK_DIAGNOSES = [
    (("right", "divided"), "the scales DIVIDE the dot: scale_inv is a multiplier (w = fp8 * scale_inv); use "
                           "tl.dot(a, w) * (a_s[:, None] * w_s[None, :])"),
    (("right", "no scale"), "no scale was applied: multiply each K step's dot by a_s[:, None] * w_s[None, :]"),
    (("right", "weight scale only"), "only the weight scale was applied: multiply by the activation's group scale too"),
    (("right", "activation scale only"), "only the activation scale was applied: multiply by the weight block's scale too"),
    (("right", "running sum scaled"), "the scale multiplies the running sum (tl.dot(a, w, acc) * s): scale only this "
                                      "step's dot, then add it: acc += tl.dot(a, w) * s"),
    (("transposed", "right"), "the weight scale was taken from the wrong block: it matches scale[k block, n block] "
                              "(transposed); the scale tensor is [E, N // 128, K // 128]: index (n // GROUP_N) * "
                              "stride_sn + kb * stride_sk"),
    (("program", "right"), "the weight scale was taken from the wrong block: it matches the PROGRAM's block index "
                           "(pid_n) instead of each column's: a column n lies in block n // GROUP_N"),
    (("first K block", "right"), "the weight scale was taken from the wrong block: every step used K block 0: the "
                                 "block of step k is kb = (k * BLOCK_K) // GROUP_K"),
    (("right", "fp8 accumulator"), "the accumulator was rounded to fp8: accumulate in fp32 (only the operands are "
                                   "fp8; tl.dot returns fp32)"),
]


def diagnose_block(got, P1, P3, a, wmaps1, wmaps3, tol) -> str:
    out = got.detach().double().cpu()
    for (wmap, how), hint in BLOCK_DIAGNOSES:
        if wmap not in wmaps1:
            continue
        if relative_error(out, replay_gate_up(P1, P3, a, wmaps1[wmap], wmaps3[wmap], how)) <= max(tol, 2e-2):
            return hint
    ref = replay_gate_up(P1, P3, a, wmaps1["right"], wmaps3["right"], "right")
    err = relative_error(out, ref)
    if 4e-3 < err < 0.5:
        return (f"the error ({err:.2g}) is the size of fp8 rounding (e4m3 keeps 3 fraction bits, 2-6% per value): "
                "something that must stay fp32 was rounded to fp8 -- the accumulator or the scaled dot; accumulate in fp32")
    return ""


def nan_hint(got) -> str:
    bad = torch.isnan(got.detach().double().cpu())
    rows = bad.any(1).nonzero().flatten().tolist()
    whole = bool(bad[rows].all()) if rows else False
    guard = ("a scale was read from the NaN guard just past a scale tensor: the K block of step k is kb = "
             "(k * BLOCK_K) // GROUP_K (BLOCK_K is 64 here: two steps share one block, for the activation scale and "
             "the weight's alike), the N block of column n is n // GROUP_N")
    if whole:
        return f"rows {ranges(rows)} hold NaN in every column: either they were never written (store mask, early exit) or {guard}"
    return f"NaN in rows {ranges(rows)} (some columns): {guard}"


# --------------------------------------------------------------------------------------------------
# Exercise 1: quantize_act


def fnuz_note(dtype) -> str:
    return ("fp8_format(dtype) gives this dtype's largest value: 448 for e4m3fn (NVIDIA, the CPU), 240 for "
            f"e4m3fnuz (AMD gfx942); the output here is {str(dtype).replace('torch.', '')}")


@exercise("08", "quantize_act", points=2, kernels=("quantize_act_kernel",),
          hint="per program (token m, group g): amax = tl.max(tl.abs(x)); scale = max(amax, 1e-10) / FP8_MAX; "
               "q = round_to_fp8(x / scale, FP8_MAX, MIN_EXP); store q (cast) and the scale")
def check_quantize_act(fn, seed):
    from ..kernels.fp8 import fp8_format

    dtype = fp8_for_this_machine()
    fmax, _ = fp8_format(dtype)
    dev = device()
    done = []
    gen = torch.Generator().manual_seed(seed)
    for name, M, K in (("two groups", 3, 256), ("K tail", 5, 200), ("one token", 1, 128)):
        x = spread_rows(torch.randn(M, K, generator=gen), gen)
        if M > 1:
            x[1, :GROUP] = 0.0                         # an all-zero group: its scale must stay finite
        x = x.to(default_dtype()).to(dev)
        qref, sref = quantize_act_reference(x, dtype)
        qbuf = torch.full((M + 1, K), 0x7F if dtype == torch.float8_e4m3fn else 0x80, dtype=torch.uint8, device=dev)
        out = qbuf.view(dtype)[:M]                      # poison (fp8 NaN) and a guard row after it
        scale = poisoned((M, -(-K // GROUP)), torch.float32, dev)
        got = fn(x, dtype, out=out, scale=scale)
        if not isinstance(got, tuple) or len(got) != 2:
            raise CheckFailure(f"quantize_act returned {type(got).__name__}, expected a tuple (q, scale)")
        q, s = got
        expect_tensor("q", q, (M, K), dtype, dev)
        expect_tensor("scale", s, (M, -(-K // GROUP)), torch.float32, dev)
        where = f"{name} (M={M}, K={K})"
        if torch.isnan(qbuf[M].view(dtype).float()).sum() != K:
            raise CheckFailure(f"{where}: the guard row after q was overwritten: a store went past row M - 1",
                               hint="mask the stores with offs < K and use program_id(0) as the row")
        s64, r64 = s.double().cpu(), sref.double().cpu()
        if torch.isnan(s64).any():
            rows = torch.isnan(s64).any(1).nonzero().flatten().tolist()
            raise CheckFailure(f"{where}: scale rows {ranges(rows)} hold NaN (never written, or 0 / 0 for an all-zero "
                               "group)", hint="store one scale per (token, group); clamp amax (tl.maximum(amax, 1e-10))")
        if not torch.allclose(s64, r64, rtol=1e-5, atol=0):
            ratio = float((s64 / r64).median())
            if abs(ratio - 448 / 240) < 1e-3 or abs(ratio - 240 / 448) < 1e-3:
                hint = f"the scale is amax / {fmax / ratio:.0f} instead of amax / {fmax:.0f}: fn/fnuz confusion -- " + fnuz_note(dtype)
            elif torch.allclose(s64, 1 / r64, rtol=1e-4):
                hint = "the stored scale is fp8 max / amax, the inverse: store scale = amax / FP8_MAX (x = q * scale)"
            else:
                hint = "scale = max(amax of the group's |x|, 1e-10) / FP8_MAX, one per (token, group of 128 columns)"
            bad = (~torch.isclose(s64, r64, rtol=1e-5, atol=0)).nonzero()[0].tolist()
            raise CheckFailure(f"{where}: scale of token {bad[0]}, group {bad[1]} is {float(s64[bad[0], bad[1]]):.4g}, "
                               f"expected {float(r64[bad[0], bad[1]]):.4g}", hint)
        qf, rf = q.float().cpu(), qref.float().cpu()
        if torch.isnan(qf).any():
            rows = torch.isnan(qf).any(1).nonzero().flatten().tolist()
            raise CheckFailure(f"{where}: q rows {ranges(rows)} still hold the NaN poison", "store every column of every group")
        # one e4m3 step (2^-3 of the value's power of two) is allowed on a few values: a GPU divides approximately
        step = torch.exp2(torch.floor(torch.log2(rf.abs().clamp_min(2.0 ** -6))) - 3)
        off = (qf - rf).abs() > step * 1.01
        if off.any() or (qf != rf).float().mean() > 0.01:
            xs = x.double().cpu() / s64.repeat_interleave(GROUP, 1)[:, :K]
            hint = "q = round_to_fp8(x / scale, ...): divide by the scale, round, then cast"
            if relative_error(qf, (x.double().cpu() * s64.repeat_interleave(GROUP, 1)[:, :K])) < 0.1:
                hint = "q was MULTIPLIED by the scale: divide (q = x / scale), since x = q * scale dequantises"
            elif relative_error(qf, xs) > 0.1:
                hint = "q must be x / scale rounded to the e4m3 grid (round_to_fp8), within [-FP8_MAX, FP8_MAX]"
            r, c = divmod(int(((qf - rf).abs() / step).argmax()), K)
            raise CheckFailure(f"{where}: q[{r}, {c}] is {float(qf[r, c]):.4g}, expected {float(rf[r, c]):.4g} "
                               f"(x = {float(x[r, c]):.4g}, scale {float(s64[r, c // GROUP]):.4g}); "
                               f"{int(off.sum())} values off by more than one fp8 step", hint)
        done.append(where)
    return done


# --------------------------------------------------------------------------------------------------
# Exercise 2: fused_gate_up_fp8


def make_case(shape, tokens, scheme, seed, routing="uniform"):
    """(problem, guarded quantised experts, spread float weights) on this machine's device."""
    from ..kernels.fp8 import quantize_experts

    dev = device()
    p = make_problem(shape, tokens, torch.float32, dev, seed, routing)
    gen = torch.Generator().manual_seed(seed + 1)
    w1, w3, w2 = (spread_weights(w, gen, scheme) for w in (p.w1, p.w3, p.w2))
    x = spread_rows(p.x, gen) if scheme == "block" else p.x
    q = quantize_experts(w1, w3, w2, scheme, fp8_for_this_machine())
    return p, x.to(default_dtype()), guarded_experts(q)


def gate_up_cases():
    return (("two blocks, block scales", TWO_BLOCKS, 6, "block", "uniform"),
            ("odd sizes, block scales", ODD, 9, "block", "empty"),
            ("odd sizes, per-channel scales", ODD, 7, "channel", "skewed"))


@exercise("08", "fused_gate_up_fp8", points=3, kernels=("fused_gate_up_fp8_kernel",),
          hint="block scales: in the K loop, kb = (k * BLOCK_K) // GROUP_K; acc += tl.dot(a, w) * (a_s[:, None] * "
               "w_s[None, :]) with a_s from xs (per row) and w_s from s_offs + kb * stride_sk; per-channel: after the "
               "loop multiply each accumulator by its column's scale")
def check_fused_gate_up_fp8(fn, seed):
    dtype = default_dtype()
    tol = tolerance(dtype)
    dev = device()
    done = []
    for i, (name, shape, tokens, scheme, routing) in enumerate(gate_up_cases()):
        p, x, q = make_case(shape, tokens, scheme, seed + 7 * i, routing)
        k, E = shape.top_k, shape.experts
        cfg = CASE_CONFIG
        d = sorted_dispatch_reference(p.topk_ids, E, cfg.BLOCK_M)
        out = poisoned((tokens * k, shape.ffn), dtype, dev)
        w1d, w3d, _ = (w.double().cpu() for w in q.dequantize())
        flat = p.topk_ids.reshape(-1).tolist()
        label = lambda s: f"slot {s} (token {s // k}, expert {flat[s]})"  # noqa: E731
        where = f"{name}, {shape.name}, M={tokens}, top-{k} of {E}, {routing} routing"
        if scheme == "block":
            xq, xs = quantize_act_reference(x, q.dtype)
            got = fn(xq, q, *d, k, x_scale=guarded(xs), config=cfg, out=out, out_dtype=dtype)
            x8, xsd = xq.double().cpu(), xs.double().cpu()
            xd = x8 * xsd.repeat_interleave(GROUP, 1)[:, :shape.hidden]
        else:
            got = fn(x, q, *d, k, config=cfg, out=out)
            xd = x.double().cpu()
        expect_tensor("fused_gate_up_fp8's result", got, (tokens * k, shape.ffn), dtype, dev)
        ids = p.topk_ids.cpu().long()
        tok = torch.arange(tokens * k) // k
        g = torch.einsum("sk,snk->sn", xd[tok], w1d[ids.reshape(-1)])
        u = torch.einsum("sk,snk->sn", xd[tok], w3d[ids.reshape(-1)])
        ref = F.silu(g) * u
        try:
            compare("intermediate h", got, ref, dtype, label)
        except CheckFailure as exc:
            if "NaN" in exc.message:
                raise CheckFailure(f"{where}: {exc.message}", nan_hint(got)) from None
            hint = ""
            if scheme == "block":
                w18, w38 = q.w1.double().cpu(), q.w3.double().cpu()
                P1 = block_partials(x8, xsd, w18, None, p.topk_ids, cfg.BLOCK_K)
                P3 = block_partials(x8, xsd, w38, None, p.topk_ids, cfg.BLOCK_K)
                N, K = shape.ffn, shape.hidden
                a, m1 = _scale_maps(xsd, q.w1_scale.double().cpu(), p.topk_ids, N, K, cfg.BLOCK_K, cfg.BLOCK_N)
                _, m3 = _scale_maps(xsd, q.w3_scale.double().cpu(), p.topk_ids, N, K, cfg.BLOCK_K, cfg.BLOCK_N)
                hint = diagnose_block(got, P1, P3, a, m1, m3, tol)
            else:
                hint = diagnose_channel(got, xd, q, p.topk_ids, tol)
            raise CheckFailure(f"{where}: {exc.message}", hint or exc.hint) from None
        done.append(f"{name} M={tokens}")
    return done


def diagnose_channel(got, xd, q, topk_ids, tol) -> str:
    out = got.detach().double().cpu()
    flat, tok = _slots(topk_ids)
    w18, w38 = q.w1.double().cpu()[flat], q.w3.double().cpu()[flat]
    s1, s3 = q.w1_scale.double().cpu()[flat], q.w3_scale.double().cpu()[flat]
    g0 = torch.einsum("sk,snk->sn", xd[tok], w18)
    u0 = torch.einsum("sk,snk->sn", xd[tok], w38)
    for cand, hint in (
        (F.silu(g0) * u0, "no per-channel scale was applied: after the loop multiply acc_gate by the w1 scale of its "
                          "column and acc_up by the w3 scale"),
        (F.silu(g0 / s1) * (u0 / s3), "the per-channel scales DIVIDE: w = fp8 * scale, so multiply"),
        (F.silu(g0 * s1) * u0, "only the gate got its scale: multiply acc_up by the w3 scale too"),
        (F.silu(g0 * s1) * (u0 * s1), "the up projection got W1's scale: acc_up takes the w3 scale"),
        (F.silu(g0) * u0 * s1 * s3, "the scales were applied after the activation: silu is not linear, scale "
                                    "acc_gate and acc_up BEFORE h = silu(acc_gate) * acc_up"),
    ):
        if relative_error(out, cand) <= max(tol, 1e-2):
            return hint
    return ""


# --------------------------------------------------------------------------------------------------
# Exercise 3: the layer (run_experts' block branch, through fused_experts_fp8)


def layer_reference(x, topk_weights, topk_ids, q, dtype):
    """float64 layer on the dequantised weights, with x and the intermediate quantised as the layer does
    (block scheme), the intermediate rounded to the activation dtype first (what the kernel stores).
    One expert at a time on x's device (real shapes fit a GPU). Returns (output [M, hidden] on the CPU,
    the intermediate the down projection saw, the activations the gate+up saw)."""
    from ..kernels.fp8 import dequantize

    dev = x.device
    M, k = topk_ids.shape
    H, ffn = x.shape[1], q.w1.shape[1]
    flat = topk_ids.reshape(-1).long()
    tok = torch.arange(M * k, device=dev) // k
    if q.scheme == "block":
        xq, xs = quantize_act_reference(x, q.dtype)
        xd = xq.double() * xs.double().repeat_interleave(GROUP, 1)[:, :H]
    else:
        xd = x.double()
    experts = [(e, (flat == e).nonzero().flatten()) for e in torch.unique(flat).tolist()]

    def w(t, s, e):
        return dequantize(t[e:e + 1], s[e:e + 1], q.scheme)[0].double()

    h = torch.zeros(M * k, ffn, dtype=torch.float64, device=dev)
    for e, s in experts:
        h[s] = F.silu(xd[tok[s]] @ w(q.w1, q.w1_scale, e).T) * (xd[tok[s]] @ w(q.w3, q.w3_scale, e).T)
    h = h.to(dtype)
    if q.scheme == "block":
        hq, hs = quantize_act_reference(h, q.dtype)
        hd = hq.double() * hs.double().repeat_interleave(GROUP, 1)[:, :ffn]
    else:
        hd = h.double()
    y = torch.zeros(M * k, H, dtype=torch.float64, device=dev)
    for e, s in experts:
        y[s] = hd[s] @ w(q.w2, q.w2_scale, e).T
    y = y * topk_weights.double().reshape(-1, 1)
    return y.view(M, k, -1).sum(1).cpu(), hd, xd


@exercise("08", "fused_experts_fp8", points=2, kernels=("run_experts",),
          hint="block scheme: quantize_act(x) -> fused_gate_up_fp8(xq, ..., x_scale=xs) -> quantize_act(h) -> "
               "down_combine_fp8(hq, ..., h_scale=hs)")
def check_fused_experts_fp8(fn, seed):
    dtype = default_dtype()
    dev = device()
    done = []
    for i, (name, shape, tokens, scheme) in enumerate((("block scales", TWO_BLOCKS, 5, "block"),
                                                        ("per-channel scales", ODD, 4, "channel"))):
        p, x, q = make_case(shape, tokens, scheme, seed + 11 * i)
        out = poisoned((tokens, shape.hidden), dtype, dev)
        got = fn(x, p.topk_weights, p.topk_ids, q, out=out)
        expect_tensor("fused_experts_fp8's result", got, (tokens, shape.hidden), dtype, dev)
        ref, hd, xd = layer_reference(x, p.topk_weights, p.topk_ids, q, dtype)
        # The intermediate's fp8 rounding can flip on values the kernel's fp32 sums put on the other side of a
        # tie: a looser tolerance for the block scheme (a missing quantisation or scale is off by far more).
        tol = max(tolerance(dtype), 1e-2) if scheme == "block" else tolerance(dtype)
        where = f"{name}, {shape.name}, M={tokens}"
        try:
            compare("output", got, ref, dtype, lambda t: f"token {t} / experts {p.topk_ids[t].tolist()}", tol=tol)
        except CheckFailure as exc:
            hint = ""
            w1, w3, w2 = q.dequantize()
            unq = moe_reference(x.double().cpu(), p.topk_weights.cpu(), p.topk_ids.cpu(), w1.cpu(), w3.cpu(), w2.cpu())
            if "NaN" not in exc.message and relative_error(got.double().cpu(), unq) < 1e-3:
                hint = ("the output matches the layer with UNquantised activations: the block scheme quantises x and "
                        "the intermediate per token group (quantize_act) and passes their scales to the kernels")
            raise CheckFailure(f"{where}: {exc.message}", hint or exc.hint) from None
        done.append(f"{name} M={tokens}")
    return done
