"""Chapter 3 checker: the grouped GEMM over sorted tokens (stacked-weight indexing, gather, masks)."""
from __future__ import annotations

import torch

from ..checking import (CheckFailure, Guarded, compare_facts, exercise, expect_tensor, fitted_tolerance, ranges,
                        relative_error)
from ..configs import KernelConfig
from ..kernels.grouped_gemm import grouped_gemm_reference, pick_config
from ..mode import ON_GPU, device
from ..reference import make_problem, sorted_dispatch_reference
from ..shapes import MODELS, MoEShape
from .memcheck import watch

CPU_CONFIG = KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=2)


def _cases():
    """(label, tokens, routing, N, K, experts, top_k, a_rows_per_token, dtype). On a GPU: Mixtral's projections in
    bf16 (K a multiple of 16, as the NVIDIA backend needs for tl.dot); the tail cases add a few columns. On the
    CPU: fp32 and one fp16 case; 6 experts with top-3 (no power of two); N and K tails."""
    if ON_GPU:
        mix = MODELS["mixtral"]
        H, F = mix.hidden, mix.ffn
        bf = torch.bfloat16
        return [("Mixtral w1, aligned", 16, "uniform", F, H, 8, 2, 2, bf),
                ("Mixtral w1, decode", 1, "uniform", F, H, 8, 2, 2, bf),
                ("N tail", 37, "empty", F + 40, H, 8, 2, 2, bf),
                ("K tail", 29, "skewed", F, H + 48, 8, 2, 2, bf),
                ("6 experts, top-3", 11, "skewed", 1552, 1040, 6, 3, 3, torch.float16),
                ("Mixtral w2 (a = one row per slot)", 20, "uniform", H, F, 8, 2, 1, bf)]
    f32 = torch.float32
    return [("aligned", 16, "uniform", 256, 128, 8, 2, 2, f32),
            ("decode", 1, "uniform", 256, 128, 8, 2, 2, f32),
            ("N tail", 37, "empty", 200, 128, 8, 2, 2, f32),
            ("K tail", 29, "skewed", 256, 136, 8, 2, 2, f32),
            ("6 experts, top-3, fp16, N and K tails", 11, "skewed", 72, 80, 6, 3, 3, torch.float16),
            ("second projection (a = one row per slot)", 20, "uniform", 128, 256, 8, 2, 1, f32)]


def _fault_hint(exc: CheckFailure, S: int) -> str:
    """A chapter-3 reading of a memory fault (CPU) by the tensor and the part of the tile it hit."""
    kind, msg = getattr(exc, "kind", ""), exc.message
    if kind == "columns":
        return ("the columns past N or the K tail are not masked: offs_n < N on the weight load and the store, "
                "offs_k < K - k0 * BLOCK_K on both loads (other=0.0)")
    if "a_ptr" in msg and "read" in msg:
        return ("a has one row per TOKEN (a_rows_per_token slots each): gather row slot // a_rows_per_token, and mask "
                "padding rows (slot < num_slots: the sentinel M*top_k is no row of a)")
    if "w_ptr" in msg and "read" in msg:
        return ("is the expert index off-by-one? expert e's [N, K] matrix starts at w + e * stride_we with "
                "e = expert_ids[pid_m]; columns past N must be masked")
    if "out_ptr" in msg:
        return ("store row `slot` (sorted_token_ids[row]), not the sorted row index, and mask padding rows "
                f"(slot < num_slots: the sentinel {S} is one past the last row)")
    return exc.hint


@exercise("03", "grouped_gemm", points=3, kernels=("grouped_gemm_kernel",),
          hint="row of a = slot // a_rows_per_token; weights at w + expert * stride_we; mask padding rows "
               "(slot < num_slots), columns (offs_n < N) and the K tail (offs_k < K - k0*BLOCK_K); store at row slot")
def check_grouped_gemm(fn, seed):
    gen = torch.Generator(device=device()).manual_seed(seed)
    done = []
    for i, (label, M, routing, N, K, E, k, rows_per_token, dtype) in enumerate(_cases()):
        ids = make_problem(MoEShape("ids", 64, 16, E, k), M, torch.float32, device(), seed + i, routing).topk_ids
        S = M * k
        cfg = pick_config(S) if ON_GPU else CPU_CONFIG
        sorted_ids, expert_ids, ntpp = sorted_dispatch_reference(ids, E, cfg.BLOCK_M)
        padded_rows = sorted_ids.numel()
        a_rows = M if rows_per_token > 1 else S
        # NaN guards around every input (a read past one shows as NaN in the result) and output (a write past it
        # shows in the guard): deep enough for a gather of row `slot` (top_k times too far), the sentinel's row,
        # the sorted row index, and one expert too far either side.
        a = Guarded("a", (a_rows, K), dtype, device(), before=cfg.BLOCK_M, after=padded_rows + 2,
                    init=torch.randn(a_rows, K, generator=gen, device=device()).to(dtype))
        w = Guarded("w", (E, N, K), dtype, device(), before=1, after=1,
                    init=(torch.randn(E, N, K, generator=gen, device=device()) * K ** -0.5).to(dtype))
        out = Guarded("out", (S, N), dtype, device(), before=cfg.BLOCK_M, after=padded_rows - S + 2)
        where = f"{label}: M={M} tokens, top_k={k}, E={E}, N={N}, K={K}, {str(dtype).replace('torch.', '')}, " \
                f"{routing} routing, config {_short(cfg)}"
        if ON_GPU:
            where += " (on a GPU every K is a multiple of 16, as tl.dot needs on NVIDIA)"
        pass_out = i != 1   # the decode case lets the function allocate its output (out=None)
        try:
            with watch() as rec:
                if pass_out:
                    got = fn(a.view, w.view, sorted_ids, expert_ids, ntpp, rows_per_token, cfg, out=out.view)
                else:
                    got = fn(a.view, w.view, sorted_ids, expert_ids, ntpp, rows_per_token, cfg)
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}", _fault_hint(exc, S)) from None
        expect_tensor("grouped_gemm output", got, (S, N), dtype, device())
        if pass_out and got.data_ptr() != out.view.data_ptr():
            raise CheckFailure(f"{where}: the result is not the out= tensor that was passed",
                               hint="when out is given, the kernel must write into it and the function return it")
        _check_out_guard(out, where, S, N, cfg)
        a.check(where)
        w.check(where)
        ref = grouped_gemm_reference(a.view, w.view, ids, rows_per_token)
        label_row = lambda s: f"slot {s} (token {s // k}, expert {int(ids.flatten()[s])})"  # noqa: E731
        try:
            compare_facts("grouped_gemm output", got, ref, dtype, label_row, tol=fitted_tolerance(dtype))
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}",
                               _diagnose(got, a.view, w.view, ids, rows_per_token, K, N, cfg, dtype, exc)) from None
        rec.require(fn, ("grouped_gemm_kernel",), "the GEMM output")
        done.append(f"{label} M={M} N={N} K={K}")
    return done


def _check_out_guard(out, where, S, N, cfg):
    """Writes past out (GPU: the interpreter's bounds check catches them first on the CPU): the sentinel's row,
    columns past N (a missing N mask spills into the next row, and past the last), or other rows."""
    tail = out.buf[(out.before + S) * N:].view(-1, N)
    hit = ~torch.isnan(tail)
    if not hit.any():
        out.check(where)
        return
    rows = sorted({S + int(r) for r in hit.any(dim=1).nonzero().flatten()})
    cols = hit.any(dim=0).nonzero().flatten().tolist()
    spill = -(-N // cfg.BLOCK_N) * cfg.BLOCK_N - N
    if rows == [S] and max(cols) < spill:
        raise CheckFailure(f"{where}: wrote columns {ranges(cols)} of row {S}, past the end of out ({S} rows of {N}): "
                           "the columns past N of the last row",
                           hint="mask the store's columns: offs_n < N (BLOCK_N does not divide N)")
    if rows == [S]:
        raise CheckFailure(f"{where}: wrote row {S} of out, past its {S} rows: the padding sentinel M*top_k = {S}",
                           hint="padding rows hold the sentinel: mask the store (and the loads of a) with "
                                "slot < num_slots")
    raise CheckFailure(f"{where}: wrote rows {ranges(rows[:64])} past the end of out ({S} rows)",
                       hint="store row `slot` (sorted_token_ids[row]), not the sorted row index, and mask "
                            "padding rows (slot < num_slots) and columns (offs_n < N)")


def _short(cfg: KernelConfig) -> str:
    return f"BLOCK_M={cfg.BLOCK_M} BLOCK_N={cfg.BLOCK_N} BLOCK_K={cfg.BLOCK_K}"


def _diagnose(got, a, w, ids, rows_per_token, K, N, cfg, dtype, exc) -> str:
    """Name a bug only when the output matches its simulation; otherwise the facts of the message stand."""
    tol = fitted_tolerance(dtype)
    close = lambda alt: relative_error(got, alt) <= max(tol, 1e-4)  # noqa: E731
    S = ids.numel()
    E = w.shape[0]
    if "NaN" in exc.message:
        return ("rows or columns hold NaN: never written (the grid must cover every (row block, column block) and "
                "the early exit only skip blocks at or past num_tokens_post_padded), or read from outside a tensor "
                "(the checker's guard memory is NaN)")
    for shift, what in ((1, "expert + 1"), (-1, "expert - 1")):
        alt_ids = (ids.long() + shift) % E
        if close(grouped_gemm_reference(a, w, alt_ids, rows_per_token)):
            return (f"the output matches reading the weights of {what}: an off-by-one in the stacked-weight indexing "
                    "(expert e's matrix starts at w + e * stride_we, e = expert_ids[pid_m])")
    if rows_per_token > 1:
        rows = torch.arange(S, device=a.device)
        alt = torch.zeros_like(grouped_gemm_reference(a, w, ids, rows_per_token))
        ok = rows < a.shape[0]
        flat = ids.reshape(-1).long()
        for e in torch.unique(flat).tolist():
            sel = ((flat == e) & ok).nonzero().flatten()
            alt[sel] = a[rows[sel]].double() @ w[e].double().T
        if close(alt):
            return ("the output matches gathering row = slot: a has one row per TOKEN, so gather "
                    "slot // a_rows_per_token")
    if K % cfg.BLOCK_K and close(_k_tail_unmasked(a, w, ids, rows_per_token, cfg.BLOCK_K)):
        return (f"the output matches a K loop whose last step reads past each row (K = {K} is no multiple of "
                f"BLOCK_K = {cfg.BLOCK_K}): mask offs_k < K - k0 * BLOCK_K on both loads, with other=0.0")
    return ""


def _k_tail_unmasked(a, w, ids, rows_per_token, block_k):
    """The output of a kernel that loads the K tail without a mask: row r's elements past K are the next row's."""
    K = a.shape[1]
    Kp = -(-K // block_k) * block_k
    def pad_rows(t2d):
        flat = torch.cat([t2d.reshape(-1), torch.zeros(Kp, dtype=t2d.dtype, device=t2d.device)])
        return flat.as_strided((t2d.shape[0], Kp), (K, 1))
    ap = pad_rows(a)
    wp = torch.stack([pad_rows(w[e]) for e in range(w.shape[0])])
    return grouped_gemm_reference(ap, wp, ids, rows_per_token)
