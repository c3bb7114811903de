"""Chapter 3 checker: the grouped GEMM over sorted tokens (stacked-weight indexing, gather, masks)."""
from __future__ import annotations

import torch

from ..checking import CheckFailure, compare, exercise, expect_tensor, relative_error, tolerance
from ..configs import KernelConfig
from ..kernels.grouped_gemm import grouped_gemm_reference, pick_config
from ..mode import ON_GPU, default_dtype, device
from ..reference import make_problem, sorted_dispatch_reference
from ..shapes import MODELS, MoEShape

CPU_CONFIG = KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=2)
GUARD_A, GUARD_OUT = 1.0e3, -12345.0   # values no correct kernel reads (a) or writes (out)


def _guarded(rows: int, cols: int, extra_rows: int, dtype, gen, fill: float | None = None):
    """A contiguous [rows, cols] view at the front of a buffer with ``extra_rows`` guard rows behind it, so that
    a missing mask reads guard values (or writes into the guard) instead of corrupting the heap."""
    buf = torch.empty((rows + extra_rows) * cols, dtype=dtype, device=device())
    view = buf[: rows * cols].view(rows, cols)
    if fill is None:
        view.copy_(torch.randn(rows, cols, generator=gen, device=device()).to(dtype))
    else:
        view.fill_(fill)
    return buf, view


def _cases():
    """(label, tokens, routing, N, K, experts, top_k, a_rows_per_token). On a GPU: Mixtral's projections in bf16
    (K a multiple of 16, as the NVIDIA backend needs for tl.dot); the tail cases add a few columns."""
    if ON_GPU:
        mix = MODELS["mixtral"]
        H, F = mix.hidden, mix.ffn
        return [("Mixtral w1, aligned", 16, "uniform", F, H, 8, 2, 2),
                ("Mixtral w1, decode", 1, "uniform", F, H, 8, 2, 2),
                ("N tail", 37, "empty", F + 40, H, 8, 2, 2),
                ("K tail", 29, "skewed", F, H + 48, 8, 2, 2),
                ("Mixtral w2 (a = one row per slot)", 20, "uniform", H, F, 8, 2, 1)]
    return [("aligned", 16, "uniform", 256, 128, 8, 2, 2),
            ("decode", 1, "uniform", 256, 128, 8, 2, 2),
            ("N tail", 37, "empty", 200, 128, 8, 2, 2),
            ("K tail", 29, "skewed", 256, 136, 8, 2, 2),
            ("second projection (a = one row per slot)", 20, "uniform", 128, 256, 8, 2, 1)]


@exercise("03", "grouped_gemm", points=3, kernels=("grouped_gemm_kernel",),
          hint="row of a = slot // a_rows_per_token; weights at w + expert * stride_we; mask padding rows "
               "(slot < num_slots), columns (offs_n < N) and the K tail (offs_k < K - k0*BLOCK_K); store at row slot")
def check_grouped_gemm(fn, seed):
    gen = torch.Generator(device=device()).manual_seed(seed)
    dtype = default_dtype()
    done = []
    for i, (label, M, routing, N, K, E, k, rows_per_token) in enumerate(_cases()):
        ids = make_problem(MoEShape("ids", 64, 16, E, k), M, torch.float32, device(), seed + i, routing).topk_ids
        S = M * k
        cfg = pick_config(S) if ON_GPU else CPU_CONFIG
        sorted_ids, expert_ids, ntpp = sorted_dispatch_reference(ids, E, cfg.BLOCK_M)
        padded_rows = sorted_ids.numel()
        a_rows = M if rows_per_token > 1 else S
        # Guards: a wrong gather (row = slot) or a padding row (slot = S) reads at most row padded_rows of a;
        # an expert index off by one reads one expert past the end; out rows up to padded_rows catch stores at the
        # sorted row or at the sentinel's row.
        a_buf, a = _guarded(a_rows, K, padded_rows + 2, dtype, gen)
        a_buf[a_rows * K:] = GUARD_A
        w_buf = torch.empty((E + 2) * N * K, dtype=dtype, device=device())
        w_buf.copy_(torch.randn(w_buf.numel(), generator=gen, device=device()) * K ** -0.5)
        w = w_buf[N * K:(E + 1) * N * K].view(E, N, K)   # one expert of real-looking data on each side
        out_buf, out = _guarded(S, N, padded_rows - S + 2, dtype, gen, fill=float("nan"))
        out_buf[S * N:] = GUARD_OUT
        where = f"{label}: M={M} tokens, top_k={k}, E={E}, N={N}, K={K}, {routing} routing, config {_short(cfg)}"
        if ON_GPU:
            where += " (bf16; on a GPU every K is a multiple of 16, as tl.dot needs on NVIDIA)"
        got = fn(a, w, sorted_ids, expert_ids, ntpp, rows_per_token, cfg, out=out)
        expect_tensor("grouped_gemm output", got, (S, N), dtype, device())
        guard = out_buf[S * N:].view(-1, N)
        if (guard != GUARD_OUT).any():
            written = sorted({S + int(r) for r in (guard != GUARD_OUT).any(dim=1).nonzero().flatten()})
            if written == [S]:
                raise CheckFailure(f"{where}: wrote row {S} of out, past its {S} rows: that is the padding sentinel "
                                   f"M*top_k = {S}",
                                   hint="padding rows hold the sentinel: mask the store (and the loads of a) with "
                                        "slot < num_slots")
            raise CheckFailure(f"{where}: wrote rows {written[:4]}... past the end of out ({S} rows)",
                               hint="store row `slot` (sorted_token_ids[row]), not the sorted row index, and mask "
                                    "padding rows (slot < num_slots) and columns (offs_n < N)")
        ref = grouped_gemm_reference(a, w, ids, rows_per_token)
        label_row = lambda s: f"slot {s} (token {s // k}, expert {int(ids.flatten()[s])})"  # noqa: E731
        try:
            compare("grouped_gemm output", got, ref, dtype, label_row)
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}",
                               _diagnose(got, a_buf, w_buf, w, ids, rows_per_token, K, N, cfg, dtype, exc) or exc.hint
                               ) from None
        done.append(f"{label} M={M} N={N} K={K}")
    return done


def _short(cfg: KernelConfig) -> str:
    return f"BLOCK_M={cfg.BLOCK_M} BLOCK_N={cfg.BLOCK_N} BLOCK_K={cfg.BLOCK_K}"


def _diagnose(got, a_buf, w_buf, w, ids, rows_per_token, K, N, cfg, dtype, exc) -> str:
    tol = tolerance(dtype)
    close = lambda alt: relative_error(got, alt) <= tol  # noqa: E731
    S = ids.numel()
    E = w.shape[0]
    if rows_per_token > 1:
        # Gathering row `slot` instead of `slot // top_k`: rows past the activations are the guard.
        a_ext = a_buf.view(-1, K)
        if close(grouped_gemm_reference(a_ext[:S], w, ids, 1)):
            return ("the output matches gathering row = slot: a has one row per TOKEN, so gather "
                    "token_id // top_k (slot // a_rows_per_token)")
    w_ext = w_buf.view(E + 2, N, K)
    for shift, what in ((1, "expert + 1"), (-1, "expert - 1")):
        if close(grouped_gemm_reference(a_buf.view(-1, K)[: got.shape[0]], w_ext[1 + shift: 1 + shift + E], ids,
                                        rows_per_token)):
            return (f"the output matches reading the weights of {what}: an off-by-one in the stacked-weight indexing "
                    "(expert e's matrix starts at w + e * stride_we, e = expert_ids[pid_m])")
    if "NaN" in exc.message:
        return ("rows or columns were never written: the grid must cover every (row block, column block) and the "
                "early exit must only skip blocks at or past num_tokens_post_padded")
    if K % cfg.BLOCK_K:
        return (f"K = {K} is not a multiple of BLOCK_K = {cfg.BLOCK_K}: the last K step reads past each row. Add the "
                "K mask: offs_k < K - k0 * BLOCK_K on both loads, with other=0.0")
    if N % cfg.BLOCK_N:
        return (f"N = {N} is not a multiple of BLOCK_N = {cfg.BLOCK_N}: mask the columns (offs_n < N) on the weight "
                "load and the store")
    return ""
