"""One rank of the expert-parallel tests (tests/test_expert_parallel.py starts W of these, or torchrun does).

Every rank draws the same global problem from the seed, keeps its own tokens (``--tokens`` per rank, 0 allowed),
runs :class:`triton_moe.parallel.ExpertParallelMoE` and compares its rows with the float64 reference of the
whole layer (and, in capacity mode, with the reference minus the slots the capacity drops). Prints one line
``RESULT <json>`` per case; exit status 0 only if every case passed.

    python tests/expert_parallel_worker.py --backend gloo --cases mixtral-uniform,deepseek-skewed
    (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, as torchrun sets them)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["NCCL_NVLS_ENABLE"] = "0"                 # NVLink multicast stays off (the device README says why)
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import triton_moe  # noqa: E402,F401  (mode first)
from triton_moe.checking import relative_error  # noqa: E402
from triton_moe import fused_experts  # noqa: E402
from triton_moe.parallel import ExpertParallelMoE, combine, experts_per_rank, send_plan  # noqa: E402
from triton_moe.kernels.routing import deepseek_v3_route_reference  # noqa: E402
from triton_moe.reference import make_problem, moe_reference  # noqa: E402
from triton_moe.shapes import MoEShape  # noqa: E402

SHAPES = {
    "mixtral": MoEShape("Mixtral-like (small)", 64, 128, 8, 2),
    "deepseek": MoEShape("DeepSeek-like (small)", 64, 64, 16, 4),
}


def tokens_per_rank(case: str, W: int) -> list[int]:
    """Uneven batches; the 'empty' cases give rank 1 no tokens at all."""
    base = [5, 3, 4, 2, 6, 1, 3, 2][:W]
    if "empty" in case:
        base[1 % W] = 0
    return base


def routing_of(case: str) -> str:
    return "skewed" if "skewed" in case else "uniform"


def problem(case: str, W: int, dtype, dev, seed: int):
    shape = SHAPES[case.split("-")[0]]
    Ms = tokens_per_rank(case, W)
    p = make_problem(shape, sum(Ms), dtype, dev, seed, routing_of(case))
    ids, weights = p.topk_ids, p.topk_weights
    if "dsv3" in case:   # DeepSeek-V3's router (grouped sigmoid, bias, scaled weights that do not sum to 1)
        bias = torch.randn(shape.experts, generator=torch.Generator().manual_seed(seed)).to(dev) * 0.1
        weights, ids = deepseek_v3_route_reference(p.logits, bias, shape.top_k, 4, 2, 2.5)
        weights, ids = weights.float(), ids.int()
    if "hot" in case:   # every token's experts on rank 0: the other ranks receive no rows at all
        E_local = experts_per_rank(shape.experts, W)
        ids = torch.argsort(p.logits[:, :E_local], dim=1, descending=True)[:, :shape.top_k].int()
    return shape, Ms, p, weights, ids


def run_case(case: str, W: int, rank: int, dtype, dev, seed: int) -> dict:
    shape, Ms, p, weights, ids = problem(case, W, dtype, dev, seed)
    lo, hi = sum(Ms[:rank]), sum(Ms[:rank + 1])
    capacity = None
    if "cap" in case:   # "cap": worst case (nothing dropped); "capsmall": two rows per pair (drops)
        capacity = 2 if "capsmall" in case else max(Ms) * min(shape.top_k, shape.experts // W)
    ep = ExpertParallelMoE.shard(p.w1, p.w3, p.w2, capacity=capacity)
    x, w, t = p.x[lo:hi].contiguous(), weights[lo:hi].contiguous(), ids[lo:hi].contiguous()
    if "router" in case:   # softmax top-k on each rank's own logits (chapter 2's kernel), then the layer
        out = ep.moe(x, p.logits[lo:hi].contiguous(), shape.top_k)
    elif W == 1:           # the forward is fused_experts itself there: run the exchange path's phases instead
        assert torch.equal(ep(x, w, t), fused_experts(x, w, t, p.w1, p.w3, p.w2))
        ex = ep.dispatch(x, t)
        out = combine(ep.send_back(ex, ep.experts(ex)), ex.order, w)
    else:
        out = ep(x, w, t)
    keep_w = weights.clone()
    dropped_expected = 0
    if capacity is not None:   # which slots the capacity drops, as the layer's rule says: past C per pair
        for r in range(W):
            a, b = sum(Ms[:r]), sum(Ms[:r + 1])
            order, counts = send_plan(ids[a:b], shape.experts, W)
            per_rank = counts.sum(1)
            dest = torch.arange(W).repeat_interleave(per_rank.cpu()).to(dev)
            pos = torch.arange(order.numel(), device=dev) - (torch.cumsum(per_rank, 0) - per_rank)[dest]
            drop = order[pos >= capacity]
            keep_w[a:b].view(-1)[drop] = 0
            if r == rank:
                dropped_expected = int(drop.numel())
    ref = moe_reference(p.x, keep_w, ids, p.w1, p.w3, p.w2)[lo:hi]
    err = relative_error(out, ref) if hi > lo else 0.0
    ok = tuple(out.shape) == (hi - lo, shape.hidden) and out.dtype == dtype and err <= (1e-5 if dtype == torch.float32 else 2e-2)
    if capacity is not None:
        ok = ok and int(ep.dropped) == dropped_expected
    return {"case": case, "rank": rank, "world": W, "M": hi - lo, "rel_err": err, "ok": bool(ok),
            "dropped": int(ep.dropped) if capacity is not None else None, "dropped_expected": dropped_expected}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--cases", default="mixtral-uniform")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rank, W = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dev, dtype = "cuda", torch.bfloat16
    else:
        dev, dtype = "cpu", torch.float32
    dist.init_process_group(args.backend, rank=rank, world_size=W)
    ok = True
    try:
        for i, case in enumerate(args.cases.split(",")):
            r = run_case(case, W, rank, dtype, dev, args.seed + i)
            print("RESULT " + json.dumps(r), flush=True)
            ok = ok and r["ok"]
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
