"""Expert parallelism (triton_moe.parallel): W processes with the gloo backend on the CPU, each rank's output
equal to the float64 reference of the whole single-process layer; the pure steps and the one-process
simulation; GPU: world size 1 with NCCL, and several GPUs when present."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_moe.checking import relative_error
from triton_moe.mode import default_dtype, device
from triton_moe.parallel import ExpertParallelMoE, combine, send_plan, simulate_expert_parallel
from triton_moe.reference import make_problem, moe_reference
from triton_moe.shapes import MoEShape

WORKER = Path(__file__).resolve().parent / "expert_parallel_worker.py"
TOL = 1e-5 if default_dtype() == torch.float32 else 2e-2
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, cases: str, backend: str = "gloo", timeout: float = TIMEOUT_S) -> list[dict]:
    """Start ``world`` worker processes (as torchrun would), bounded in time; return their RESULT lines."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"), OMP_NUM_THREADS="1")
    if backend == "gloo":          # CPU tensors: the interpreter, also on a machine with a GPU
        env["TRITON_MOE_MODE"] = "cpu"
    procs = []
    for rank in range(world):
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--backend", backend, "--cases", cases],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{world} ranks did not finish in {timeout} s (a collective waiting for a rank that never came?)")
    results = []
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 or "RESULT" in out, f"rank {rank} failed (exit {p.returncode}):\n{out[-3000:]}"
        results += [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    return results


def assert_all_ok(results: list[dict], world: int, cases: str):
    assert len(results) == world * len(cases.split(",")), results
    bad = [r for r in results if not r["ok"]]
    assert not bad, "\n".join(json.dumps(r) for r in bad)


CASES_2 = "mixtral-uniform,mixtral-router,deepseek-dsv3,deepseek-skewed,mixtral-empty,deepseek-hot,mixtral-cap,deepseek-capsmall"
CASES_4 = "mixtral-skewed,deepseek-uniform,deepseek-empty,deepseek-hot,deepseek-capsmall"


def test_two_ranks_gloo():
    assert_all_ok(launch(2, CASES_2), 2, CASES_2)


def test_four_ranks_gloo():
    assert_all_ok(launch(4, CASES_4), 4, CASES_4)


# --------------------------------------------------------------------------------------------------
# The pure steps, in one process


def test_send_plan_groups_by_rank_and_counts():
    ids = torch.tensor([[5, 0], [2, 7], [0, 3]], dtype=torch.int32)
    order, counts = send_plan(ids, 8, 2)
    assert counts.tolist() == [[2, 0, 1, 1], [0, 1, 0, 1]]
    assert ids.reshape(-1)[order].tolist() == [0, 0, 2, 3, 5, 7]
    assert order.tolist() == [1, 4, 2, 5, 0, 3]            # stable: slot order inside an expert
    order, counts = send_plan(torch.empty((0, 2), dtype=torch.int32), 8, 4)
    assert order.numel() == 0 and counts.shape == (4, 2) and int(counts.sum()) == 0


def test_combine_weights_once_and_handles_no_tokens():
    y = torch.randn(6, 4, dtype=torch.float64)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    w = torch.rand(3, 2, dtype=torch.float64)
    slots = torch.empty_like(y)
    slots[order] = y
    want = (slots.view(3, 2, 4) * w[:, :, None]).sum(1)
    assert torch.allclose(combine(y, order, w), want)
    empty = combine(torch.empty(0, 4), torch.empty(0, dtype=torch.long), torch.empty(0, 2))
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_simulation_matches_the_layer(world):
    shape = MoEShape("t", 64, 64, 8, 2)
    p = make_problem(shape, 11, default_dtype(), device(), seed=5, routing="skewed")
    Ms = [4, 0, 5, 2][:world] if world == 4 else ([11] if world == 1 else [0, 11])
    split = lambda t: list(torch.split(t, Ms))  # noqa: E731
    outs = simulate_expert_parallel(split(p.x), split(p.topk_weights), split(p.topk_ids), p.w1, p.w3, p.w2)
    ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    assert relative_error(torch.cat(outs), ref) < TOL


def test_world_size_one_is_the_single_gpu_layer():
    from triton_moe import fused_experts

    shape = MoEShape("t", 64, 64, 8, 2)
    p = make_problem(shape, 6, default_dtype(), device(), seed=2)
    ep = ExpertParallelMoE.shard(p.w1, p.w3, p.w2)       # no process group: one rank
    assert torch.equal(ep(p.x, p.topk_weights, p.topk_ids), fused_experts(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2))
    assert ep(p.x[:0], p.topk_weights[:0], p.topk_ids[:0]).shape == (0, 64)


def test_bad_arguments_name_themselves():
    w = torch.randn(4, 32, 16)
    with pytest.raises(ValueError, match="capacity"):
        ExpertParallelMoE(w, w, torch.randn(4, 16, 32), capacity=0)
    with pytest.raises(ValueError, match="w2"):
        ExpertParallelMoE(w, w, w)
    ep = ExpertParallelMoE(w, w, torch.randn(4, 16, 32))
    with pytest.raises(ValueError, match="topk_ids"):
        ep(torch.randn(3, 16), torch.rand(3, 2), torch.zeros(3, 2))


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_gpu_world_size_one_nccl():
    """One GPU, NCCL with one rank, bf16: the exchange path (all three phases, and the capacity variant)
    against the float64 reference; the forward itself is fused_experts exactly."""
    results = launch(1, "mixtral-uniform,deepseek-skewed,deepseek-cap", backend="nccl", timeout=300)
    assert_all_ok(results, 1, "mixtral-uniform,deepseek-skewed,deepseek-cap")


@pytest.mark.gpu
def test_gpu_exchange_path_alone():
    """World size 1 in-process with NCCL: dispatch -> experts -> send_back -> combine (the collectives with one
    rank) equals the float64 reference in bf16, exact and capacity modes; the exact forward synchronises with
    the host exactly once (the split sizes), the capacity variant never."""
    import warnings

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NCCL_NVLS_ENABLE="0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        shape = MoEShape("DeepSeek-like", 1024, 512, 32, 8)
        p = make_problem(shape, 64, torch.bfloat16, "cuda", seed=9, routing="skewed")
        ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
        for capacity, syncs in ((None, 1), (64 * 8, 0)):
            ep = ExpertParallelMoE.shard(p.w1, p.w3, p.w2, capacity=capacity)

            def step():
                ex = ep.dispatch(p.x, p.topk_ids)
                return combine(ep.send_back(ex, ep.experts(ex)), ex.order, p.topk_weights)

            step()                      # compile first (the launcher's first call may synchronise)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            found = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
            assert len(found) == syncs, (capacity, found)
            assert relative_error(out, ref) < 2e-2, capacity
            assert int(ep.dropped) == 0
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
def test_multi_gpu_nccl():
    world = min(torch.cuda.device_count(), 8)
    cases = "deepseek-uniform,deepseek-skewed,deepseek-empty,deepseek-hot,deepseek-capsmall"
    if world > 4:   # 16 experts over 8 ranks: 2 per rank, fewer than top-4: no "hot" case (all on rank 0)
        cases = "deepseek-uniform,deepseek-skewed,deepseek-empty,deepseek-capsmall"
    assert_all_ok(launch(world, cases, backend="nccl", timeout=300), world, cases)
