"""Expert parallelism (chapter 9): one MoE layer's experts spread over the ranks of a ``torch.distributed``
process group; each token's hidden state goes to the ranks of its chosen experts and its results come back,
with ``all_to_all_single`` (NCCL on GPUs, gloo on CPUs underneath).

    ep = ExpertParallelMoE.shard(w1, w3, w2)              # full [E, ...] weights -> this rank's E / W experts
    out = ep(x, topk_weights, topk_ids)                   # any router; x: this rank's [M, hidden] tokens
    out = ep.moe(x, router_logits, top_k)                 # softmax top-k routing (Mixtral, Qwen3-MoE)

Layout: ``E`` experts, ``W`` ranks, ``E_local = E / W`` experts per rank in contiguous ranges: global expert
``e`` lives on rank ``e // E_local`` as its local expert ``e % E_local``. Every rank calls the forward (the
collectives need all of them), each with its own tokens; ``M = 0`` on a rank is allowed.

One forward (exact sizes, the default), on every rank:

1. plan (:func:`send_plan`): the ``[M, k]`` choices flattened to slots ``s = t * k + j``; ``order`` = slots
   sorted by global expert (stable), hence by destination rank, then local expert; ``counts[d, l]`` = slots
   for expert ``d * E_local + l``. One row is sent per (token, chosen expert) pair: a token whose two experts
   live on one rank goes there twice. The alternative (one row per (token, rank), fanned out on the receiver
   with a per-rank local top-k, as DeepEP's normal kernels do) sends fewer bytes when ``k > W`` but needs a
   second index on both sides; per pair keeps every step a plain gather / scatter.
2. counts exchange: ``all_to_all_single`` of ``counts`` -> ``recv_counts[s, l]`` = rows rank ``s`` sends for
   my local expert ``l``. Then **the one host synchronisation** of the forward: ``all_to_all_single`` takes
   variable split sizes as Python ints (they size the receive buffer), so the host waits for the counts
   (``.tolist()`` of ``W`` send and ``W`` receive sizes, in one copy).
3. token exchange: ``all_to_all_single`` of ``x[order // k]`` with those splits. Local expert ids are not
   sent: a chunk from rank ``s`` is grouped by local expert with sizes ``recv_counts[s]``, so
   :func:`receive_ids` rebuilds them on the device. Routing weights are not sent either (step 6).
4. experts: :func:`~triton_moe.kernels.fused_moe.fused_experts` on the received rows, ``top_k = 1``, local ids,
   weight 1 (the project's kernels, unchanged).
5. return: ``all_to_all_single`` back with the split sizes swapped: row ``i`` of what comes back is the
   result of sent row ``i`` (the collective keeps the order inside each chunk).
6. combine (:func:`combine`): rows put back in slot order, ``out[t] = sum_j w[t, j] * y[t * k + j]`` in
   fp32, cast once. The routing weight is applied exactly once, here, on the token's own rank, where it was
   computed: it never travels.

Collectives: 3 (counts, tokens, results); host synchronisations: 1 (the split sizes).

**How serving engines avoid that synchronisation** (and make decode capturable in a CUDA graph): they fix the
sizes in advance. Every (sender, receiver) pair exchanges a buffer of a static capacity ``C`` rows, padded;
rows past it are dropped (or the capacity is the worst case, so nothing ever is). DeepEP's low-latency kernels
do that with a static ``num_max_dispatch_tokens_per_rank`` and buffers registered once, writing straight into
the peer's memory (NVLink / RDMA) with no separate count exchange; vLLM and SGLang use them for decode.
``capacity=C`` here is that variant on top of ``all_to_all_single``: equal splits of ``C`` rows, the local
ids travel in a fixed ``[W, C]`` int32 exchange (``-1`` in padding: the kernels drop invalid ids), no host
synchronisation, 3 collectives (ids, rows, results). Slots past a pair's capacity are dropped (they
contribute zero) and counted in :attr:`ExpertParallelMoE.dropped` (a device tensor: reading it synchronises,
the forward does not). ``C = M * min(k, E_local)`` never drops. The price: every forward moves ``W * C`` rows
per rank, padding included, and sizes the experts' launch for them (padding rows are skipped).

``W = 1`` is the single-GPU layer exactly (``fused_experts``, no collective). Without an initialised process
group the module runs as ``W = 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import validate
from .kernels.fused_moe import fused_experts, route

__all__ = ["ExpertParallelMoE", "send_plan", "receive_ids", "combine", "run_local_experts", "all_to_all_lists",
           "simulate_expert_parallel", "experts_per_rank", "world_and_rank"]


def experts_per_rank(num_experts: int, world_size: int) -> int:
    """E / W, refusing a split that is not even (every rank holds the same number of experts)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(num_experts, int) or num_experts < 1 or num_experts % world_size:
        raise ValueError(f"num_experts ({num_experts!r}) must be a positive multiple of world_size ({world_size})")
    return num_experts // world_size


# --------------------------------------------------------------------------------------------------
# The rank-local steps: plain torch ops, no host synchronisation (also used by the one-process simulation)


def send_plan(topk_ids: torch.Tensor, num_experts: int, world_size: int):
    """Where this rank's slots go. ``topk_ids`` [M, k] global expert ids (M may be 0). Returns

    - ``order`` int64 [M * k]: the slots ``s = t * k + j`` sorted by global expert, stable (slot order inside
      an expert), so grouped by destination rank, then by local expert: send row ``i`` is token
      ``order[i] // k``;
    - ``counts`` int64 [world_size, num_experts // world_size]: ``counts[d, l]`` = slots for global expert
      ``d * E_local + l`` (rows sent to rank ``d`` for its local expert ``l``).

    No host synchronisation (``torch.bincount`` would have one on a GPU: it reads the largest id to size its
    output)."""
    ### BEGIN SOLUTION
    # HINT: flatten the choices to slots; sorting the slots by their global expert id (stable) groups them by
    # HINT: destination rank, then by local expert. Count slots per global expert without torch.bincount (it
    # HINT: synchronises on a GPU): index_add_ ones into zeros; then view the counts as [world_size, E_local]
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    counts = counts.view(world_size, num_experts // world_size)
    ### END SOLUTION
    return order, counts


def receive_ids(recv_counts: torch.Tensor, total: int) -> torch.Tensor:
    """Local expert id of every received row (int32 [total]): the chunk from rank ``s`` comes grouped by local
    expert with sizes ``recv_counts[s]`` ([W, E_local]); ``total`` = their sum, known on the host already
    (``output_size`` spares ``repeat_interleave`` a host synchronisation)."""
    W, E_local = recv_counts.shape
    ids = torch.arange(E_local, dtype=torch.int32, device=recv_counts.device).repeat(W)
    return ids.repeat_interleave(recv_counts.reshape(-1), output_size=total)


def run_local_experts(recv_x: torch.Tensor, recv_ids: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                      w2: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """This rank's experts on the received rows: ``fused_experts`` with ``top_k = 1`` and weight 1 (the routing
    weight is applied in :func:`combine`). Ids outside ``[0, E_local)`` (padding) give zero rows. No rows: an
    empty result (the kernels need at least one token)."""
    R = recv_x.shape[0]
    if R == 0:
        return recv_x.new_empty((0, w2.shape[1]))
    ones = torch.ones((R, 1), dtype=torch.float32, device=recv_x.device)
    return fused_experts(recv_x, ones, recv_ids.reshape(R, 1), w1, w3, w2, deterministic=deterministic)


def combine(returned: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Back to the tokens. ``returned`` [M * k, H]: row ``i`` is the (unweighted) expert output for slot
    ``order[i]`` (zero for a dropped slot); ``topk_weights`` [M, k]. Returns [M, H] in ``returned``'s dtype:
    ``out[t] = sum_j topk_weights[t, j] * y[t * k + j]`` with ``y`` the rows in slot order, summed in fp32 in
    the order ``j = 0, 1, ...`` (deterministic); the routing weight is applied here and only here."""
    M, k = topk_weights.shape
    H = returned.shape[1]
    ### BEGIN SOLUTION
    # HINT: row i of returned belongs to slot order[i]: scatter the rows back to slot order (index_copy_), not gather;
    # HINT: then weight each slot's row by its routing weight, once, and add each token's k rows in float32
    # HINT: (with M = 0 a view(..., -1) cannot infer its size: use H)
    y = torch.empty_like(returned).index_copy_(0, order, returned)
    out = (y.view(M, k, H).float() * topk_weights.float()[:, :, None]).sum(dim=1)
    ### END SOLUTION
    return out.to(returned.dtype)


# --------------------------------------------------------------------------------------------------
# W ranks in one process: all_to_all_single over Python lists (the notebook and the checker use it)


def all_to_all_lists(sends: list, splits: list) -> list:
    """What ``all_to_all_single`` computes, for W simulated ranks: ``sends[r]`` rank r's rows grouped by
    destination, ``splits[r][d]`` how many go to rank d. Returns ``recv`` with ``recv[d]`` = rank 0's chunk for
    d, then rank 1's, ... (the order inside each chunk is kept)."""
    W = len(sends)
    ### BEGIN SOLUTION
    # HINT: cut each sender's rows into its W chunks with torch.split and that sender's split sizes;
    # HINT: receiver d gets chunk d of EVERY sender, in sender order 0, 1, ..., W - 1 (torch.cat)
    chunks = [torch.split(sends[r], [int(n) for n in splits[r]]) for r in range(W)]
    return [torch.cat([chunks[r][d] for r in range(W)]) for d in range(W)]
    ### END SOLUTION


def simulate_expert_parallel(xs: list, topk_weights: list, topk_ids: list, w1: torch.Tensor, w3: torch.Tensor,
                             w2: torch.Tensor, plan=send_plan, combine_fn=combine, exchange=all_to_all_lists) -> list:
    """The exact-size forward of :class:`ExpertParallelMoE` for ``W = len(xs)`` ranks simulated in one process
    (``xs[r]``, ``topk_weights[r]``, ``topk_ids[r]``: rank r's tokens and routing; ``w1, w3, w2`` all E
    experts, rank r holding the range ``r * E_local ...``). Returns each rank's [M_r, H] output. ``plan``,
    ``combine_fn`` and ``exchange`` default to this module's steps (the chapter's exercises replace them)."""
    W = len(xs)
    E = w1.shape[0]
    E_local = experts_per_rank(E, W)
    k = topk_ids[0].shape[1]
    plans = [plan(topk_ids[r], E, W) for r in range(W)]
    counts = [c for _, c in plans]
    recv_counts = [torch.stack([counts[s][d] for s in range(W)]) for d in range(W)]   # the counts exchange
    send_splits = [c.sum(1).tolist() for c in counts]
    recv_x = exchange([xs[r][order // k] for r, (order, _) in enumerate(plans)], send_splits)
    ys = []
    for d in range(W):
        ids = receive_ids(recv_counts[d], recv_x[d].shape[0])
        lo = d * E_local
        ys.append(run_local_experts(recv_x[d], ids, w1[lo:lo + E_local], w3[lo:lo + E_local], w2[lo:lo + E_local]))
    recv_splits = [rc.sum(1).tolist() for rc in recv_counts]
    back = exchange(ys, recv_splits)      # the same exchange with the splits swapped
    return [combine_fn(back[r], plans[r][0], topk_weights[r]) for r in range(W)]


# --------------------------------------------------------------------------------------------------
# The layer


@dataclass
class Exchange:
    """What the dispatch leaves for the experts and the combine (one forward's state)."""
    order: torch.Tensor          # [M * k] slots in send order
    recv_x: torch.Tensor         # [R, H] rows for this rank's experts
    recv_ids: torch.Tensor       # [R] their local expert ids (-1: padding)
    send_splits: list | None     # exact mode: rows to each rank (host ints); None with a capacity
    recv_splits: list | None     # exact mode: rows from each rank
    send_rows: torch.Tensor | None = None   # capacity mode: buffer row of each send slot (W * C: dropped)


class ExpertParallelMoE(nn.Module):
    """The MoE layer's experts over the ranks of ``group`` (the default process group when None; none
    initialised: one rank). ``w1, w3``: this rank's experts ``[E_local, ffn, hidden]``, ``w2``: ``[E_local,
    hidden, ffn]`` (global experts ``rank * E_local ...``); :meth:`shard` cuts them from the full weights.
    ``capacity``: None (exact sizes, one host synchronisation per forward) or the static rows per (sender,
    receiver) pair (no host synchronisation; slots over it dropped and counted in :attr:`dropped`).
    See the module docstring for the steps."""

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *, group=None,
                 capacity: int | None = None, deterministic: bool = False):
        super().__init__()
        validate.tensor("w1", w1, ndim=3, dtypes=validate.FLOAT_DTYPES)
        E_local, F, H = w1.shape
        validate.tensor("w3", w3, shape=(E_local, F, H), dtypes=(w1.dtype,), device=w1.device)
        validate.tensor("w2", w2, shape=(E_local, H, F), dtypes=(w1.dtype,), device=w1.device)
        if E_local < 1:
            raise ValueError(f"w1 must hold at least one expert, got shape {list(w1.shape)}")
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1):
            raise ValueError(f"capacity must be None or a positive int, got {capacity!r}")
        if not isinstance(deterministic, bool):
            raise ValueError(f"deterministic must be a bool, got {type(deterministic).__name__}")
        self.group = group
        self.world_size, self.rank = world_and_rank(group)
        self.w1 = nn.Parameter(w1, requires_grad=False)
        self.w3 = nn.Parameter(w3, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.num_local_experts = E_local
        self.num_experts = E_local * self.world_size
        self.capacity = capacity
        self.deterministic = deterministic
        self.dropped = torch.zeros((), dtype=torch.long, device=w1.device)   # capacity mode: slots dropped last forward

    @classmethod
    def shard(cls, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *, group=None, **kwargs):
        """This rank's contiguous range of the full ``[E, ...]`` weights (copied, contiguous)."""
        validate.tensor("w1", w1, ndim=3, dtypes=validate.FLOAT_DTYPES)
        W, rank = world_and_rank(group)
        E_local = experts_per_rank(w1.shape[0], W)
        part = lambda w: w[rank * E_local:(rank + 1) * E_local].contiguous()  # noqa: E731
        return cls(part(w1), part(w3), part(w2), group=group, **kwargs)

    # -- the forward in phases: dispatch, experts, send_back, then combine (the benchmark times them apart) --

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor) -> Exchange:
        """Plan, counts exchange (exact mode: the host synchronisation) and token exchange."""
        W, E_local, k, H = self.world_size, self.num_local_experts, topk_ids.shape[1], x.shape[1]
        order, counts = send_plan(topk_ids, self.num_experts, W)
        send_x = x.index_select(0, order // k)
        if self.capacity is None:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=self.group)
            sizes = torch.cat([counts.sum(1), recv_counts.sum(1)]).tolist()   # THE host synchronisation
            send_splits, recv_splits = sizes[:W], sizes[W:]
            recv_x = x.new_empty((sum(recv_splits), H))
            dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=self.group)
            return Exchange(order, recv_x, receive_ids(recv_counts, recv_x.shape[0]), send_splits, recv_splits)
        C = self.capacity
        per_rank = counts.sum(1)
        dest_sorted = torch.arange(W, device=x.device).repeat_interleave(per_rank, output_size=order.numel())
        first = torch.cumsum(per_rank, 0) - per_rank                       # where each destination's rows start
        pos = torch.arange(order.numel(), device=x.device) - first[dest_sorted]
        keep = pos < C
        rows = torch.where(keep, dest_sorted * C + pos, W * C)            # W * C: the spare row of dropped slots
        self.dropped = (~keep).sum()
        local = (topk_ids.reshape(-1).long()[order] % E_local).int()
        buf_x = x.new_zeros((W * C + 1, H)).index_copy_(0, rows, send_x)
        buf_ids = torch.full((W * C + 1,), -1, dtype=torch.int32, device=x.device).index_copy_(0, rows, local)
        recv_x = torch.empty_like(buf_x[:-1])
        recv_ids = torch.empty_like(buf_ids[:-1])
        dist.all_to_all_single(recv_ids, buf_ids[:-1], group=self.group)
        dist.all_to_all_single(recv_x, buf_x[:-1], group=self.group)
        return Exchange(order, recv_x, recv_ids, None, None, rows)

    def experts(self, ex: Exchange) -> torch.Tensor:
        return run_local_experts(ex.recv_x, ex.recv_ids, self.w1, self.w3, self.w2, self.deterministic)

    def send_back(self, ex: Exchange, y: torch.Tensor) -> torch.Tensor:
        """The reverse exchange: [M * k, H] expert outputs in send order (zero rows for dropped slots)."""
        H = y.shape[1]
        if ex.send_rows is None:
            back = y.new_empty((ex.order.numel(), H))
            dist.all_to_all_single(back, y, ex.send_splits, ex.recv_splits, group=self.group)
            return back
        back = y.new_empty((y.shape[0] + 1, H))
        dist.all_to_all_single(back[:-1], y, group=self.group)
        back[-1].zero_()
        return back.index_select(0, ex.send_rows)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [M, hidden] (M may be 0), topk_weights [M, k] float, topk_ids [M, k] global expert ids -> [M, hidden]
        in x's dtype. Every rank of the group must call it."""
        validate.tensor("x", x, ndim=2, dtypes=(self.w1.dtype,), device=self.w1.device)
        M, H = x.shape
        if H != self.w1.shape[2]:
            raise ValueError(f"x must have hidden = {self.w1.shape[2]} columns (the experts'), got {H}")
        validate.tensor("topk_ids", topk_ids, ndim=2, dtypes=validate.INDEX_DTYPES, device=x.device)
        k = topk_ids.shape[1]
        validate.top_k(k, self.num_experts)
        validate.tensor("topk_ids", topk_ids, shape=(M, k))
        validate.tensor("topk_weights", topk_weights, shape=(M, k),
                        dtypes=validate.FLOAT_DTYPES + (torch.float64,), device=x.device)
        if self.world_size == 1:   # the single-GPU layer, exactly
            if M == 0:
                return x.new_empty((0, H))
            return fused_experts(x, topk_weights, topk_ids, self.w1, self.w3, self.w2,
                                 deterministic=self.deterministic)
        ex = self.dispatch(x, topk_ids)
        y = self.experts(ex)
        return combine(self.send_back(ex, y), ex.order, topk_weights)

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, top_k: int, renormalize: bool = True):
        """Softmax top-k routing (chapter 2's ``topk_softmax``) on this rank's logits [M, E], then the forward."""
        validate.tensor("router_logits", router_logits, shape=(x.shape[0], self.num_experts),
                        dtypes=validate.FLOAT_DTYPES + (torch.float64,), device=x.device)
        validate.top_k(top_k, self.num_experts)
        if x.shape[0] == 0:
            empty = torch.empty((0, top_k), device=x.device)
            return self.forward(x, empty, empty.int())
        weights, ids = route(router_logits, top_k, bool(renormalize))
        return self.forward(x, weights, ids)

    def extra_repr(self) -> str:
        E_local, F, H = self.w1.shape
        return (f"rank={self.rank}/{self.world_size}, experts={self.num_experts} ({E_local} here), hidden={H}, "
                f"ffn={F}, capacity={self.capacity}, dtype={self.w1.dtype}")


def world_and_rank(group=None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)
