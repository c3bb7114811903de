"""Chapter 2 checkers: the fused softmax + top-k router, DeepSeek-V3's grouped router, and the sorted dispatch."""
from __future__ import annotations

import torch

from ..checking import CheckFailure, Guarded, compare_exact, exercise, expect_tensor, relative_error
from ..kernels.routing import deepseek_v3_route_reference, topk_softmax_reference
from ..mode import ON_GPU, device
from ..reference import dispatch_sizes, make_problem, sorted_dispatch_reference
from ..shapes import CPU_SHAPES, MODELS, MoEShape
from .memcheck import watch


def _logits(shape: MoEShape, tokens: int, seed: int, routing: str) -> torch.Tensor:
    """Router logits [M, E] float32 from a real softmax router (a narrow copy of the shape: only E matters)."""
    return make_problem(shape.scaled(hidden=64, ffn=16), tokens, torch.float32, device(), seed, routing).logits


def _shapes():
    return MODELS if ON_GPU else CPU_SHAPES


# --------------------------------------------------------------------------------------------------
# Exercise 1: fused softmax + top-k


def _plant_ties(logits: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    """Exact ties at every rank up to the k-th: in token t the experts ranked r and r+1 get the same logit, r
    cycling over 0..k (r = 0: a tie at FIRST place, where a selection that removes every column equal to the max
    drops both; r = k-1: the k-th chosen expert ties with the first one left out, so only the tie-breaking rule,
    lower index wins, decides)."""
    M, E = logits.shape
    rows = []
    for t in range(M):
        r = t % (min(k, E - 1) + 1)
        if r + 1 >= E:
            continue
        order = torch.sort(logits[t].double().cpu(), descending=True, stable=True).indices
        logits[t, order[r + 1]] = logits[t, order[r]]
        rows.append(t)
    return rows


def _sorted_pairs(w, ids):
    ids_s, order = torch.sort(ids.long().cpu(), dim=1)
    return ids_s, torch.gather(w.double().cpu(), 1, order)


@exercise("02", "topk_softmax", points=2, kernels=("topk_softmax_kernel",),
          hint="choose on the logits: k times take the row max and its lowest column (ties), then set that column "
               "to -inf; weight = exp(logit - row max) / sum(exp) over all experts, or over the k chosen if renormalising")
def check_topk_softmax(fn, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = _shapes()
    # (shape, tokens, routing, renormalize, plant ties): Mixtral at M=1; Qwen3 without renormalisation, a token
    # count no tile size divides; many experts (DeepSeek's 256 on a GPU) with skew and exact ties.
    six = MoEShape("6 experts, top-3", 64, 16, 6, 3)
    ten = MoEShape("10 experts, top-2", 64, 16, 10, 2)
    # (shape, tokens, routing, renormalize, plant ties, logit offset, dtype): Mixtral at M=1; Qwen3 without
    # renormalisation, a token count no tile size divides; many experts (DeepSeek's 256 on a GPU) with skew;
    # ties at every rank; 6 and 10 experts (no power of two); logits offset by ~120 (exp overflows float32
    # without the max subtracted); fp16 logits on the CPU (bf16 on a GPU).
    half = torch.bfloat16 if ON_GPU else torch.float16
    f32 = torch.float32
    cases = [(shapes["mixtral"], 1, "uniform", True, False, 0.0, f32),
             (shapes["qwen3"], 37, "skewed", False, False, 0.0, half),
             (shapes["mixtral"], 70, "empty", True, True, 0.0, f32),
             (MODELS["deepseek_v3"].scaled(64, 16) if not ON_GPU else MODELS["deepseek_v3"], 33, "skewed", True, True,
              0.0, f32),
             (six, 20, "uniform", True, True, 0.0, half),
             (ten, 24, "uniform", False, True, 120.0, f32)]
    done = []
    for i, (shape, M, routing, renorm, ties, offset, ldtype) in enumerate(cases):
        logits = _logits(shape, M, seed + i, routing)
        if offset:
            logits = logits + offset * (1 + torch.rand(M, 1, generator=gen)).to(logits.device)
        logits = logits.to(ldtype)
        k, E = shape.top_k, shape.experts
        tie_rows = _plant_ties(logits, k, gen) if ties else []
        where = f"M={M}, E={E}, top_k={k}, renormalize={renorm}, {str(logits.dtype).replace('torch.', '')} logits" + \
            (f" offset by ~{offset:.0f}" if offset else "")
        g_logits = Guarded("logits", logits.shape, logits.dtype, device(), before=2, after=M + 2, init=logits)
        try:
            with watch() as rec:
                got = fn(g_logits.view, k, renorm)
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}", exc.hint) from None
        g_logits.check(where)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckFailure("topk_softmax should return a pair (topk_weights, topk_ids)")
        w, ids = got
        expect_tensor("topk_weights", w, (M, k), torch.float32, device())
        expect_tensor("topk_ids", ids, (M, k), (torch.int32, torch.int64), device())
        if (ids.long().cpu() == -7777).any():
            raise CheckFailure(f"{where}: some ids were never written (still the poison)",
                               hint="store every row < M and every slot < TOP_K (mask rows and slots)")
        if torch.isnan(w).any() or torch.isinf(w).any():
            t = int((torch.isnan(w) | torch.isinf(w)).any(dim=1).nonzero()[0])
            raise CheckFailure(f"{where}: token {t} has weights {w[t].tolist()}",
                               hint="exp of a large logit overflows float32: subtract the row max before tl.exp"
                                    if offset else "NaN or inf weights: an unwritten row, a 0/0 or exp overflow")
        ref_w, ref_ids = topk_softmax_reference(logits, k, renorm)
        got_ids, got_w = _sorted_pairs(w, ids)
        exp_ids, exp_w = _sorted_pairs(ref_w, ref_ids)
        dup = [t for t in range(M) if len(set(got_ids[t].tolist())) < k]
        if dup:
            t = dup[0]
            raise CheckFailure(f"{where}: token {t} chose experts {got_ids[t].tolist()}: the same expert twice",
                               hint="after choosing a column, set it to -inf so the next round cannot pick it again")
        bad = (got_ids != exp_ids).any(dim=1).nonzero().flatten().tolist()
        if bad:
            t = bad[0]
            msg = (f"{where}: token {t} chose experts {got_ids[t].tolist()}, expected {exp_ids[t].tolist()} "
                   f"({len(bad)} of {M} tokens wrong)")
            if set(bad) <= set(tie_rows):
                raise CheckFailure(msg + "; every wrong token has two experts with EQUAL logits",
                                   hint="ties: the lower expert index wins, like the reference: among the columns "
                                        "equal to the max take tl.min of their indices, and remove only that column "
                                        "(cols == idx), not every column equal to the max")
            low = _sorted_pairs(*topk_softmax_reference(-logits, k, renorm))[0]
            if (got_ids == low).all(dim=1).float().mean() > 0.5:
                raise CheckFailure(msg + ": these are the SMALLEST logits", hint="take the max, not the min")
            raise CheckFailure(msg, hint="top-k along the experts of each token (axis=1 of a [tokens, experts] tile)")
        err = relative_error(got_w, exp_w)
        if err > 1e-5:
            sums = got_w.sum(dim=1)
            t = int((got_w - exp_w).abs().max(dim=1).values.argmax())
            msg = f"{where}: token {t} has weights {[round(v, 5) for v in got_w[t].tolist()]}, expected " \
                  f"{[round(v, 5) for v in exp_w[t].tolist()]} (relative error {err:.2g})"
            probs = torch.softmax(logits.double().cpu(), dim=-1).gather(1, got_ids)
            if renorm and relative_error(got_w, probs) <= 1e-5:
                raise CheckFailure(msg + f"; they sum to {float(sums[t]):.4f}: the plain softmax probabilities",
                                   hint="renormalize=True: divide the k chosen weights by THEIR sum (they add to 1)")
            if not renorm and relative_error(got_w, probs / probs.sum(1, keepdim=True)) <= 1e-5:
                raise CheckFailure(msg + "; they sum to 1",
                                   hint="renormalize=False (Qwen3 without norm_topk_prob): the weights are the softmax "
                                        "probabilities themselves, divided by the sum over ALL experts")
            raise CheckFailure(msg, hint="weight = exp(logit - row max) / sum of exp over the row (subtract the max "
                                         "for stability; masked columns must be -inf so they add exp(-inf) = 0)"
                               if err > 1e-3 else "a small error: is something rounded to a lower precision "
                                                  "(the weights are float32)?")
        rec.require(fn, ("topk_softmax_kernel",), "the routing")
        done.append(f"M={M} E={E} k={k} renorm={renorm} {str(ldtype).replace('torch.', '')}" + (" ties" if ties else "")
                    + (" large logits" if offset else ""))
    return done


# --------------------------------------------------------------------------------------------------
# Exercise 2: DeepSeek-V3 grouped routing


def _decision_margin(logits, bias, k, n_group, topk_group) -> torch.Tensor:
    """Per token, the smallest float64 gap at a decision (k-th vs next expert, last kept vs first dropped
    group). Tokens whose margin is below float32 resolution may legitimately choose differently."""
    M, E = logits.shape
    choice = torch.sigmoid(logits.double()) + bias.double()[None, :]
    gs = choice.view(M, n_group, -1).topk(2, dim=-1).values.sum(-1)
    g_sorted = gs.sort(dim=-1, descending=True).values
    margin = g_sorted[:, topk_group - 1] - (g_sorted[:, topk_group] if topk_group < n_group else -1e9)
    ref_w, ref_ids = deepseek_v3_route_reference(logits, bias, k, n_group, topk_group, 1.0)
    keep = torch.zeros(M, n_group, dtype=torch.bool)
    gidx = gs.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
    keep.scatter_(1, gidx, True)
    masked = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    e_sorted = masked.sort(dim=-1, descending=True).values
    margin = torch.minimum(margin, e_sorted[:, k - 1] - e_sorted[:, k])
    return margin


@exercise("02", "deepseek_v3_route", points=1, kernels=("deepseek_v3_route_kernel",),
          hint="group score = sum of the group's TWO best biased scores; keep the topk_group best groups; set every "
               "expert outside them to -inf before the top-k")
def check_deepseek_v3_route(fn, seed):
    gen = torch.Generator().manual_seed(seed)
    if ON_GPU:
        cases = [(256, 8, 8, 4, 1), (256, 8, 8, 4, 300), (64, 6, 8, 3, 50)]
    else:
        cases = [(32, 8, 4, 2, 1), (32, 8, 4, 2, 45), (64, 6, 8, 3, 20), (48, 5, 6, 4, 17)]   # 6 groups, top-5
    done = []
    for i, (E, k, n_group, topk_group, M) in enumerate(cases):
        shape = MoEShape("deepseek-like", 64, 16, E, k, "deepseek_v3")
        logits = _logits(shape, M, seed + i, "uniform")
        # A bias big enough to change choices (the real one balances load); a few groups pushed up.
        bias = (torch.randn(E, generator=gen) * 0.3).to(device())
        scale = 2.5
        where = f"E={E}, top_k={k}, n_group={n_group}, topk_group={topk_group}, M={M}"
        g_logits = Guarded("logits", logits.shape, logits.dtype, device(), before=2, after=M + 2, init=logits)
        g_bias = Guarded("correction_bias", bias.shape, bias.dtype, device(), before=8, after=E, init=bias)
        try:
            with watch() as rec:
                got = fn(g_logits.view, g_bias.view, k, n_group, topk_group, scale)
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}", exc.hint) from None
        g_logits.check(where)
        g_bias.check(where)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckFailure("deepseek_v3_route should return a pair (topk_weights, topk_ids)")
        w, ids = got
        expect_tensor("topk_weights", w, (M, k), torch.float32, device())
        expect_tensor("topk_ids", ids, (M, k), (torch.int32, torch.int64), device())
        ref_w, ref_ids = deepseek_v3_route_reference(logits, bias, k, n_group, topk_group, scale)
        got_ids, got_w = _sorted_pairs(w, ids)
        exp_ids, exp_w = _sorted_pairs(ref_w, ref_ids)
        lc, bc = logits.cpu(), bias.cpu()
        ambiguous = (_decision_margin(lc, bc, k, n_group, topk_group) < 1e-5)
        bad = [t for t in (got_ids != exp_ids).any(dim=1).nonzero().flatten().tolist() if not ambiguous[t]]
        if bad:
            t = bad[0]
            msg = (f"{where}: token {t} chose experts {got_ids[t].tolist()}, expected {exp_ids[t].tolist()} "
                   f"({len(bad)} of {M} tokens wrong)")
            alternatives = [
                (deepseek_v3_route_reference(lc, bc, k, 1, 1, scale)[1],
                 "that is the top-k over ALL experts: the group limit is missing (keep only the topk_group best groups)"),
                (deepseek_v3_route_reference(lc, torch.zeros_like(bc), k, n_group, topk_group, scale)[1],
                 "that is the choice WITHOUT the correction bias: add the bias to the scores you choose on"),
                (_route_top1_groups(lc, bc, k, n_group, topk_group),
                 "that ranks groups by their best expert only: a group's score is the sum of its TWO best biased scores"),
            ]
            for alt_ids, why in alternatives:
                if torch.equal(torch.sort(alt_ids, dim=1).values, got_ids):
                    raise CheckFailure(msg + "; " + why)
            raise CheckFailure(msg)
        ok = torch.tensor([t not in set(ambiguous.nonzero().flatten().tolist()) for t in range(M)])
        if ok.any() and relative_error(got_w[ok], exp_w[ok]) > 1e-5:
            t = int(((got_w - exp_w).abs().max(dim=1).values * ok).argmax())
            msg = (f"{where}: token {t} has weights {[round(v, 4) for v in got_w[t].tolist()]}, expected "
                   f"{[round(v, 4) for v in exp_w[t].tolist()]}")
            sums = got_w[ok].sum(dim=1)
            if (sums - 1).abs().max() < 1e-4:
                raise CheckFailure(msg + "; they sum to 1", hint="multiply the renormalised weights by routed_scaling_factor")
            biased = torch.sigmoid(lc.double()).gather(1, got_ids) + bc.double()[got_ids]
            if relative_error(got_w[ok], (biased / biased.sum(1, keepdim=True) * scale)[ok]) < 1e-5:
                raise CheckFailure(msg, hint="the bias is for choosing only: the weights are the UNBIASED sigmoid scores")
            raise CheckFailure(msg, hint="weights = sigmoid scores of the chosen experts / their sum * routed_scaling_factor")
        rec.require(fn, ("deepseek_v3_route_kernel",), "the routing")
        done.append(f"E={E} k={k} groups {topk_group}/{n_group} M={M}")
    return done


def _route_top1_groups(logits, bias, k, n_group, topk_group):
    """The classic mistake: groups ranked by their single best score (DeepSeek-V2's group_limited_greedy)."""
    M, E = logits.shape
    choice = torch.sigmoid(logits.double()) + bias.double()[None, :]
    gs = choice.view(M, n_group, -1).max(dim=-1).values
    gidx = gs.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
    keep = torch.zeros(M, n_group, dtype=torch.bool).scatter_(1, gidx, True)
    masked = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    return masked.sort(dim=-1, descending=True, stable=True).indices[:, :k]


# --------------------------------------------------------------------------------------------------
# Exercise 3: sorted dispatch


def _ids(M: int, E: int, k: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """[M, k] distinct experts per token. 'uniform'; 'skewed': expert 1 is in every token's choice and the rest
    come from the first quarter; 'empty': only the odd experts are ever chosen."""
    pool = {"uniform": list(range(E)), "skewed": list(range(max(k, E // 4))),
            "empty": list(range(1, E, 2)) if E // 2 >= k else list(range(E))}[kind]
    rows = []
    for _ in range(M):
        p = torch.tensor(pool)[torch.randperm(len(pool), generator=gen)]
        if kind == "skewed":
            p = torch.cat([torch.tensor([1]), p[p != 1]])
        rows.append(p[:k])
    return torch.stack(rows).int()


@exercise("02", "sorted_dispatch", points=3, kernels=("dispatch_layout_kernel", "dispatch_scatter_kernel"),
          hint="layout: expert of block b = number of experts whose padded run ends at or before row b*BLOCK_M "
               "(-1 past the end), sentinel M*top_k in every row; scatter: row = run start + earlier slots of the "
               "same expert (exclusive cumsum)")
def check_sorted_dispatch(fn, seed):
    gen = torch.Generator().manual_seed(seed)
    # (M, E, top_k, block_m, kind): M=1; M*top_k no multiple of block_m; 256 experts, most empty; heavy skew;
    # half the experts empty; int64 ids; (GPU) Mixtral and DeepSeek-V3 at M=4096.
    cases = [(1, 8, 2, 16, "uniform", torch.int32), (37, 8, 2, 16, "uniform", torch.int32),
             (9, 256, 8, 16, "uniform", torch.int32), (150, 16, 4, 32, "skewed", torch.int32),
             (61, 32, 8, 64, "empty", torch.int64), (1, 256, 8, 64, "uniform", torch.int32),
             (600, 256, 8, 16, "skewed", torch.int32),   # 4800 slots: several steps of SUB slots per chunk
             (23, 6, 3, 16, "uniform", torch.int32), (40, 12, 1, 32, "skewed", torch.int64)]   # no powers of two
    if ON_GPU:
        cases += [(4096, 8, 2, 64, "uniform", torch.int32), (4096, 256, 8, 16, "skewed", torch.int32)]
    done = []
    for M, E, k, bm, kind, dt in cases:
        ids = _ids(M, E, k, kind, gen).to(dt).to(device())
        S = M * k
        size, max_blocks = dispatch_sizes(M, k, E, bm)
        where = f"M={M}, top_k={k}, E={E}, block_m={bm} ({kind} routing)"
        # guards behind every output (deep enough for a row past the padded size or a block index off by a few)
        g_out = (Guarded("sorted_token_ids", (size,), torch.int32, device(), before=bm, after=size + bm),
                 Guarded("expert_ids", (max_blocks,), torch.int32, device(), before=4, after=max_blocks + 4),
                 Guarded("num_tokens_post_padded", (1,), torch.int32, device(), before=4, after=4))
        out = tuple(g.view for g in g_out)
        g_ids = Guarded("topk_ids", ids.shape, ids.dtype, device(), before=2, after=M + 2, init=ids)
        used_out = True
        try:
            with watch() as rec:
                try:
                    got = fn(g_ids.view, E, bm, out=out)
                except TypeError as exc:
                    if "out" not in str(exc):
                        raise
                    used_out = False
                    got = fn(g_ids.view, E, bm)
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}", exc.hint) from None
        for g in g_out + (g_ids,):
            g.check(where)
        if not (isinstance(got, (tuple, list)) and len(got) == 3):
            raise CheckFailure("sorted_dispatch should return (sorted_token_ids, expert_ids, num_tokens_post_padded)")
        sorted_ids, expert_ids, ntpp = got
        if used_out and any(isinstance(g, torch.Tensor) and g.data_ptr() != o.data_ptr() for g, o in zip(got, out)):
            raise CheckFailure(f"{where}: out= was given but the results are other tensors",
                               hint="when out is given, write the three results into it (a CUDA graph reuses those "
                                    "buffers) and return them")
        expect_tensor("sorted_token_ids", sorted_ids, (size,), torch.int32, device())
        expect_tensor("expert_ids", expert_ids, (max_blocks,), torch.int32, device())
        expect_tensor("num_tokens_post_padded", ntpp, (1,), torch.int32, device())
        r_sorted, r_eids, r_ntpp = (t.cpu() for t in sorted_dispatch_reference(ids, E, bm))
        sorted_ids, expert_ids, ntpp = sorted_ids.cpu(), expert_ids.cpu(), ntpp.cpu()
        try:
            compare_exact("num_tokens_post_padded", ntpp, r_ntpp)
        except CheckFailure as exc:
            raise CheckFailure(f"{where}: {exc.message}",
                               hint="rows in use = sum over experts of ceil(count / block_m) * block_m") from None
        used = int(r_ntpp)
        bad_e = (expert_ids != r_eids).nonzero().flatten()
        if len(bad_e):
            b = int(bad_e[0])
            msg = (f"{where}: expert_ids[{b}] = {int(expert_ids[b])}, expected {int(r_eids[b])} "
                   f"({len(bad_e)} of {max_blocks} blocks wrong)")
            if int(expert_ids[b]) == -7777:
                raise CheckFailure(msg + " (still the poison: never written)",
                                   hint="every block up to max_blocks needs an expert id, -1 for blocks past the end")
            counts = torch.bincount(ids.flatten().long().cpu(), minlength=E)
            end = torch.cumsum((counts + bm - 1) // bm * bm, 0)
            first = torch.arange(max_blocks) * bm
            live = first < used
            off_by_one = [torch.searchsorted(end, first, right=False), r_eids + 1, r_eids - 1]
            if any(torch.equal(expert_ids[live].long(), alt[live].long()) for alt in off_by_one):
                raise CheckFailure(msg + ": off by one", hint="off-by-one block expert id: block b belongs to the "
                                   "expert whose run contains row b*BLOCK_M; count experts whose run ENDS at or "
                                   "before that row (end <= row, not end < row)")
            if (r_eids[bad_e] == -1).all():
                raise CheckFailure(msg, hint="blocks starting at or past num_tokens_post_padded get expert id -1")
            raise CheckFailure(msg)
        pad = r_sorted == S
        wrong_pad = pad & (sorted_ids != S) & ((sorted_ids < 0) | (sorted_ids > S))
        if wrong_pad.any():
            r = int(wrong_pad.nonzero()[0])
            got_v = int(sorted_ids[r])
            what = "still the poison: never written" if got_v == -7777 else f"got {got_v}"
            raise CheckFailure(f"{where}: row {r} is padding ({'past the end' if r >= used else 'inside a run'}) "
                               f"and must hold the sentinel M*top_k = {S}; {what}",
                               hint=("rows left unwritten: the layout kernel must store the sentinel in every row of "
                                     "every block (all max_blocks * BLOCK_M rows: check its grid and store mask)")
                               if got_v == -7777 else
                               "wrong padding sentinel: fill every row of every block with num_slots = M*top_k "
                                    "(one past the last real slot, so the GEMM can mask it with slot < num_slots)")
        if not torch.equal(sorted_ids, r_sorted):
            rows = (sorted_ids != r_sorted).nonzero().flatten()
            r = int(rows[0])
            msg = (f"{where}: sorted_token_ids[{r}] = {int(sorted_ids[r])}, expected "
                   f"{'the sentinel' if bool(pad[r]) else 'slot'} {int(r_sorted[r])} ({len(rows)} rows wrong)")
            real = ~pad
            if torch.equal(torch.sort(sorted_ids[real]).values, torch.sort(r_sorted[real]).values):
                raise CheckFailure(msg + ": every slot is in its expert's run, in the wrong order",
                                   hint="keep increasing slot order inside an expert (stable): a slot's rank is the "
                                        "number of EARLIER slots of the same expert")
            inclusive = _inclusive_rank_layout(r_sorted, ids, E, bm, S)
            if torch.equal(sorted_ids, inclusive):
                raise CheckFailure(msg + ": every slot lands one row too far (the first row of each run keeps the "
                                         "sentinel)",
                                   hint="the rank must be EXCLUSIVE: cumsum(onehot) - onehot counts only the earlier "
                                        "slots of the same expert")
            missing = sorted(set(r_sorted[real].tolist()) - set(sorted_ids[real].tolist()))
            if missing:
                raise CheckFailure(msg + f"; slot(s) {missing[:5]} never placed (two slots written to one row?)",
                                   hint="row = run start + slots of the same expert in earlier chunks + earlier in this "
                                        "chunk (advance the per-expert position after every step of SUB slots)")
            raise CheckFailure(msg)
        rec.require(fn, ("dispatch_layout_kernel", "dispatch_scatter_kernel"), "the dispatch")
        done.append(f"M={M} E={E} k={k} block_m={bm} {kind}")
    return done


def _inclusive_rank_layout(r_sorted, ids, E, bm, S):
    """sorted_token_ids as an inclusive rank writes it: every real row r holds the slot of row r - 1 of the
    reference, the first row of each run keeps the sentinel (what the reader sees at the real rows)."""
    alt = torch.full_like(r_sorted, S)
    counts = torch.bincount(ids.flatten().long().cpu(), minlength=E)
    start = 0
    for e in range(E):
        n = int(counts[e])
        if n:
            run = r_sorted[start:start + n]
            alt[start + 1:start + n] = run[:-1]
            if start + n < alt.numel():   # the last slot goes one row past the run (padding or the next run)
                alt[start + n] = run[-1]
            start += -(-n // bm) * bm
    return alt
