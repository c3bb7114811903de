"""Chapter 9 checkers: the three rank-local pieces of expert parallelism, checked on W ranks simulated in one
process (no process group needed).

- ``all_to_all_lists(sends, splits)``: what ``all_to_all_single`` computes; rows tagged with (sender, receiver,
  index) so a misplaced row names where it went;
- ``send_plan(topk_ids, num_experts, world_size)``: counts compared exactly, order checked slot by slot: every
  slot once, sent to the rank that holds its expert, grouped by local expert (the receiver rebuilds the ids
  from the counts); a rank with no tokens must work;
- ``combine(returned, order, topk_weights)``: the returned rows put back in slot order and weighted once,
  against a float64 reference; a misplaced or doubly weighted row is recognised.
"""
from __future__ import annotations

import torch

from ..checking import CheckFailure, compare, exercise, expect_tensor, ranges, relative_error, tolerance
from ..mode import default_dtype, device
from .common import diagnose_combine

# (world size, experts, top_k, tokens per rank); one rank has no tokens in each
CASES = ((2, 8, 2, (7, 0)), (4, 16, 4, (6, 0, 9, 3)), (4, 8, 2, (0, 5, 1, 4)))


def routing(gen, M, E, k, skewed, dev):
    """[M, k] distinct expert ids per token; skewed: experts 0..k-1 weighted 20x (the first rank gets most)."""
    p = torch.ones(M, E)
    if skewed:
        p[:, :k] = 20.0
    return torch.multinomial(p, k, replacement=False, generator=gen).int().to(dev) if M else \
        torch.empty((0, k), dtype=torch.int32, device=dev)


def _call(fn, what, r, M, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except CheckFailure:
        raise
    except Exception as exc:
        where = f"rank {r}, which has no tokens (M = 0)" if M == 0 else f"rank {r} (M = {M})"
        raise CheckFailure(f"{what} on {where} raised {type(exc).__name__}: {exc}",
                           hint="with M = 0 every tensor is empty: no .max() of an empty tensor, no view(..., -1) "
                                "that cannot infer its size; it must still return correctly shaped (empty) results"
                           if M == 0 else "") from None


@exercise("09", "all_to_all_lists", points=1,
          hint="receiver d gets chunk d of every sender, in sender order; split each sender's rows by its split sizes")
def check_all_to_all_lists(fn, seed):
    gen = torch.Generator().manual_seed(seed)
    done = []
    for W in (2, 4):
        splits = torch.randint(0, 4, (W, W), generator=gen)
        splits[1, :] = 0                       # rank 1 sends nothing
        splits[0, 1] = max(1, int(splits[0, 1]))   # rank 0 sends rank 1 something (a misrouting always shows)
        sends = []
        for r in range(W):                     # row = (sender, receiver, index within the chunk, a random value)
            rows = [torch.tensor([[r, d, i, float(torch.rand(1, generator=gen))]], dtype=torch.float64)
                    for d in range(W) for i in range(int(splits[r, d]))]
            sends.append(torch.cat(rows) if rows else torch.empty((0, 4), dtype=torch.float64))
        got = fn([s.clone() for s in sends], splits.tolist())
        if not isinstance(got, (list, tuple)) or len(got) != W:
            raise CheckFailure(f"W = {W}: expected a list of {W} tensors (one per receiving rank), got "
                               f"{type(got).__name__}" + (f" of length {len(got)}" if isinstance(got, (list, tuple)) else ""))
        for d in range(W):
            want = torch.cat([sends[r][sends[r][:, 1] == d] for r in range(W)])
            out = expect_tensor(f"rank {d}'s received rows", got[d], dtype=torch.float64)
            if out.dim() != 2 or out.shape[1] != 4:
                raise CheckFailure(f"W = {W}: rank {d}'s rows have shape {tuple(out.shape)}, expected [n, 4] (the rows, unchanged)")
            wrong = (out[:, 1] != d).nonzero().flatten()
            if len(wrong):
                row = out[int(wrong[0])]
                raise CheckFailure(
                    f"W = {W}: rank {d} received rows meant for rank {int(row[1])} (from rank {int(row[0])}); "
                    f"{len(wrong)} of its {out.shape[0]} rows are another rank's: tokens would reach (and their "
                    "results return to) the wrong rank",
                    hint="recv[d] is made of chunk d of EVERY sender (a transpose of who-sends-what), not the chunks "
                         "of sender d")
            if out.shape[0] != want.shape[0]:
                raise CheckFailure(f"W = {W}: rank {d} received {out.shape[0]} rows, expected {want.shape[0]} "
                                   f"(sum over senders r of splits[r][{d}])",
                                   hint="receiver d takes chunk d of every sender: splits[r][d] rows from rank r")
            if not torch.equal(out, want):
                raise CheckFailure(f"W = {W}: rank {d} received the right rows in the wrong order",
                                   hint="sender 0's chunk first, then sender 1's, ..., each chunk in its own order: "
                                        "the receiver relies on it to know whose row is whose")
        done.append(f"W={W} with a rank sending nothing")
    return done


@exercise("09", "send_plan", points=2,
          hint="sort the slots by global expert (stable); count slots per global expert without bincount (it "
               "synchronises on a GPU) and view the counts as [world_size, num_experts // world_size]")
def check_send_plan(fn, seed):
    dev = device()
    gen = torch.Generator().manual_seed(seed)
    done = []
    for c, (W, E, k, Ms) in enumerate(CASES):
        E_local = E // W
        skewed = c == 1
        for r, M in enumerate(Ms):
            ids = routing(gen, M, E, k, skewed, dev)
            where = f"W = {W}, E = {E}, top-{k}, rank {r} with M = {M} tokens"
            res = _call(fn, "send_plan", r, M, ids.clone(), E, W)
            if not isinstance(res, (tuple, list)) or len(res) != 2:
                raise CheckFailure(f"{where}: send_plan should return (order, counts), got {type(res).__name__}")
            order, counts = res
            expect_tensor("counts", counts, (W, E_local), (torch.int64, torch.int32), dev)
            expect_tensor("order", order, (M * k,), (torch.int64, torch.int32), dev)
            flat = ids.reshape(-1).long().cpu()
            want = torch.zeros(E, dtype=torch.long).index_add_(0, flat, torch.ones_like(flat)).view(W, E_local)
            bad = (counts.cpu().long() != want).nonzero()
            if len(bad):
                d, l = (int(v) for v in bad[0])
                raise CheckFailure(
                    f"{where}: wrong send count: counts[{d}, {l}] (rows for rank {d}'s local expert {l} = global expert "
                    f"{d * E_local + l}) is {int(counts[d, l])}, expected {int(want[d, l])} (the slots that chose it); "
                    f"{len(bad)} wrong entries",
                    hint="count SLOTS (token, chosen expert) per global expert, every one of the M * top_k, then view "
                         "[world_size, E_local]: row d is what rank d receives")
            o = order.cpu().long()
            if M and (o.min() < 0 or o.max() >= M * k or torch.unique(o).numel() != M * k):
                seen = torch.zeros(M * k, dtype=torch.long).index_add_(0, o.clamp(0, M * k - 1), torch.ones_like(o))
                raise CheckFailure(f"{where}: order must list every slot 0..{M * k - 1} exactly once; slots "
                                   f"{ranges((seen != 1).nonzero().flatten().tolist())} are missing or repeated",
                                   hint="order is a permutation of the slots s = token * top_k + j")
            dest = torch.arange(W).repeat_interleave(want.sum(1))          # the rank each send row goes to
            home = flat[o] // E_local                                        # the rank holding its expert
            wrong = (dest != home).nonzero().flatten()
            if len(wrong):
                i = int(wrong[0])
                s = int(o[i])
                raise CheckFailure(
                    f"{where}: slot {s} (token {s // k}, expert {int(flat[s])}) is send row {i}, which goes to rank "
                    f"{int(dest[i])}, but expert {int(flat[s])} lives on rank {int(flat[s]) // E_local} "
                    f"(contiguous ranges of {E_local} experts); {len(wrong)} rows go to the wrong rank",
                    hint="sort the slots by their GLOBAL expert id: that groups them by destination rank (e // E_local) "
                         "in rank order, as the split sizes counts.sum(1) cut them")
            if not bool((flat[o][1:] >= flat[o][:-1]).all()):
                raise CheckFailure(f"{where}: the rows for one rank are not grouped by local expert",
                                   hint="the receiver rebuilds each row's expert from the counts alone, so the rows of "
                                        "each destination must come in local-expert order: sort by the global id")
        done.append(f"W={W} E={E} top-{k} M={list(Ms)}" + (" skewed" if skewed else ""))
    return done


@exercise("09", "combine", points=2,
          hint="scatter the rows back to slot order (row i is slot order[i]), weight each once, sum each token's k "
               "rows in float32, cast to returned's dtype")
def check_combine(fn, seed):
    dev = device()
    dtype = default_dtype()
    gen = torch.Generator().manual_seed(seed)
    done = []
    for c, (W, E, k, Ms) in enumerate(CASES):
        H = 48
        for r, M in enumerate(Ms):
            S = M * k
            order = torch.randperm(S, generator=gen).to(dev)
            returned = torch.randn(S, H, generator=gen).to(dtype).to(dev)
            if c == 2 and S:          # a capacity drop: some slots' rows came back as zeros
                returned[torch.arange(S, device=dev) % 3 == 0] = 0
            w = torch.rand(M, k, generator=gen).to(dev) + 0.1
            where = f"top-{k}, rank {r} with M = {M} tokens" + (" (some slots dropped: zero rows)" if c == 2 else "")
            got = _call(fn, "combine", r, M, returned.clone(), order.clone(), w.clone())
            expect_tensor("combine's result", got, (M, H), dtype, dev)
            y = torch.empty(S, H, dtype=torch.float64)
            y[order.cpu()] = returned.double().cpu()
            C = y.view(M, k, H) * w.double().cpu()[:, :, None]              # [M, k, H] weighted contributions
            if M == 0:
                continue
            try:
                compare("output", got, C.sum(1), dtype, lambda t: f"token {t}")
            except CheckFailure as exc:
                if "NaN" in exc.message:
                    raise CheckFailure(f"{where}: {exc.message}", exc.hint) from None
                tol = tolerance(dtype)
                gathered = returned.double().cpu()[order.cpu()].view(M, k, H) * w.double().cpu()[:, :, None]
                if relative_error(got, gathered.sum(1)) <= tol:
                    hint = ("the rows went back to the wrong tokens: row i of `returned` belongs to slot order[i], so "
                            "scatter (y[order] = returned, or index_copy_), not gather (returned[order])")
                else:
                    ids = torch.arange(k).repeat(M, 1)
                    hint = diagnose_combine(got, C, w.cpu(), ids, tol)
                raise CheckFailure(f"{where}: {exc.message}", hint or exc.hint) from None
        done.append(f"top-{k} M={list(Ms)}" + (" with dropped slots" if c == 2 else ""))
    return done
