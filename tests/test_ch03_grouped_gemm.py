"""Chapter 3: the grouped GEMM checker passes the solution, rejects the stub and planted bugs with messages that
name the bug; input validation; config tables; on a GPU: bf16 Mixtral shapes, no host synchronisation, a CUDA
graph of dispatch + grouped GEMMs."""
import dataclasses

import pytest
import torch

import triton_moe  # noqa: F401
from triton_moe.configs import KernelConfig, load_table, pick
from triton_moe.kernels import grouped_gemm as gg
from triton_moe.kernels.dispatch import sorted_dispatch
from triton_moe.mode import ON_GPU, device
from triton_moe.reference import make_problem, moe_reference, sorted_dispatch_reference
from triton_moe.shapes import BATCH_SIZES, MODELS, shape_for_mode

KEY = "03:grouped_gemm"


def nb():
    import notebook_helpers  # imports the grader (nbformat): CPU tests only

    return notebook_helpers


def test_solution_passes():
    h = nb()
    r = h.check(KEY, h.solution_ns("03"))
    assert r.passed, str(r)


def test_untouched_exercise_is_not_attempted():
    h = nb()
    r = h.check(KEY, h.exercise_ns("03"))
    assert r.status == "not attempted", str(r)


BUGS = {
    "gather-token-id": ("a_rows = slots // a_rows_per_token", "a_rows = slots", "slot // a_rows_per_token"),
    "missing-k-mask": ("k_ok = offs_k < K - k0 * BLOCK_K", "k_ok = offs_k < BLOCK_K", "K tail"),
    "expert-off-by-one": ("w_ptrs = w_ptr + expert * stride_we", "w_ptrs = w_ptr + (expert + 1) * stride_we", "off-by-one"),
    "padding-rows-stored": ("mask=row_ok[:, None] & (offs_n[None, :] < N))", "mask=(offs_n[None, :] < N))",
                            "sentinel"),
    "missing-n-mask": ("w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)",
                       "w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)", "offs_n < N"),
    # issue 10: a missing N mask on the STORE is not the padding sentinel; fp16 rounding in an fp32 path;
    # a torch result in the host function with the kernel left untouched
    "store-no-n-mask": ("mask=row_ok[:, None] & (offs_n[None, :] < N))", "mask=row_ok[:, None])", "offs_n < N"),
    "fp16-accumulate": ("acc = tl.dot(a, w, acc)\n", "acc = tl.dot(a.to(tl.float16), w.to(tl.float16), acc)\n",
                        "relative error"),
    "no-k-tail-mask-inside": ("k_ok = offs_k < K - k0 * BLOCK_K", "k_ok = offs_k < K", "K tail"),
}


@pytest.mark.parametrize("name", list(BUGS))
def test_planted_bug_is_rejected(name):
    old, new, expect = BUGS[name]
    h = nb()
    r = h.check(KEY, h.planted_ns("03", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


UNUSUAL = {
    # correct but unusual: padding rows clamped to row 0 with tl.where instead of masked loads
    "where-clamped-rows": ("a_rows = slots // a_rows_per_token", "a_rows = tl.where(row_ok, slots, 0) // a_rows_per_token"),
}


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_correct_solution_passes(name):
    h = nb()
    r = h.check(KEY, h.planted_ns("03", UNUSUAL[name]))
    assert r.passed, str(r)


def _problem(M=8, E=8, k=2, N=96, K=64, dtype=torch.float32, seed=0):
    p = make_problem(shape_for_mode("mixtral").scaled(K, N, E, k), M, dtype, device(), seed)
    return p


def _dispatch(p, block_m):
    return sorted_dispatch(p.topk_ids, p.shape.experts, block_m)


def test_moe_forward_grouped_matches_reference():
    for routing in ("uniform", "empty"):
        p = make_problem(shape_for_mode("mixtral"), 13, torch.float32, device(), 3, routing)
        out = gg.moe_forward_grouped(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
        ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
        assert float((out.double() - ref).norm() / ref.norm()) < 2e-3


def test_fp16_and_default_config():
    p = _problem(dtype=torch.float16)
    cfg = gg.pick_config(16)
    d = _dispatch(p, cfg.BLOCK_M)
    out = gg.grouped_gemm(p.x, p.w1, *d, 2)          # config=None: table row with the dispatch's BLOCK_M
    ref = gg.grouped_gemm_reference(p.x, p.w1, p.topk_ids, 2)
    assert out.dtype == torch.float16 and float((out.double() - ref).norm() / ref.norm()) < 5e-3


def _bad_calls():
    p = _problem()
    d = _dispatch(p, 16)
    cfg = KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32)
    x, w = p.x, p.w1
    return [
        ("a", lambda: gg.grouped_gemm(x[0], w, *d, 2, cfg)),
        ("a", lambda: gg.grouped_gemm(x.int(), w, *d, 2, cfg)),
        ("w", lambda: gg.grouped_gemm(x, w[0], *d, 2, cfg)),
        ("w", lambda: gg.grouped_gemm(x, w.half(), *d, 2, cfg)),
        ("K must match", lambda: gg.grouped_gemm(x[:, :32].contiguous(), w, *d, 2, cfg)),
        ("sorted_token_ids", lambda: gg.grouped_gemm(x, w, d[0].long(), d[1], d[2], 2, cfg)),
        ("expert_ids", lambda: gg.grouped_gemm(x, w, d[0], d[1][:0], d[2], 2, cfg)),
        ("num_tokens_post_padded", lambda: gg.grouped_gemm(x, w, d[0], d[1], torch.zeros(2, dtype=torch.int32), 2, cfg)),
        ("a_rows_per_token", lambda: gg.grouped_gemm(x, w, *d, 0, cfg)),
        ("config.BLOCK_M", lambda: gg.grouped_gemm(x, w, *d, 2, dataclasses.replace(cfg, BLOCK_M=32))),
        ("config", lambda: gg.grouped_gemm(x, w, *d, 2, {"BLOCK_M": 16})),
        ("sorted_token_ids", lambda: gg.grouped_gemm(x, w, d[0][:-1], d[1], d[2], 2, cfg)),
        ("out", lambda: gg.grouped_gemm(x, w, *d, 2, cfg, out=torch.empty(3, 3))),
    ] + ([] if ON_GPU else [("bfloat16", lambda: gg.grouped_gemm(x.bfloat16(), w.bfloat16(), *d, 2, cfg))])


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_it(i):
    name, call = _bad_calls()[i]
    with pytest.raises(ValueError, match=name):
        call()


def test_tables_are_valid():
    tables = [gg.CPU_TABLE, gg.DEFAULT_GPU_TABLE] + [load_table(p) for p in gg.TABLES.glob("grouped_gemm.*.json")]
    for table in tables:
        bounds = [m for m, _ in table]
        assert bounds == sorted(bounds)
        for _, c in table:
            for v in (c.BLOCK_M, c.BLOCK_N, c.BLOCK_K):
                assert v >= 16 and v & (v - 1) == 0     # tl.dot needs >= 16 on NVIDIA; tl.arange powers of 2
        assert pick(table, 1 << 40) is table[-1][1]


def test_example_launches_cover_every_table_config_in_bf16_and_fp16():
    from triton_moe.tools.crosscompile import load_specs

    specs, problems = load_specs(["triton_moe.kernels.grouped_gemm:example_launches"])
    assert not problems, problems
    specs = [s for _, s in specs if s.fn is gg.grouped_gemm_kernel]
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    # GPU tables only: the CPU table runs in the interpreter, which compiles nothing.
    gpu = gg.DEFAULT_GPU_TABLE + [r for p in gg.TABLES.glob("grouped_gemm.*.json") for r in load_table(p)]
    configs = {(c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.GROUP_M) for _, c in gpu}
    for dt in ("bf16", "fp16"):
        got = {tuple(s.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
               for s in specs if s.name.endswith(dt)}
        assert configs <= got


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_gpu_checker_passes_on_package_kernel():
    from triton_moe.checking import REGISTRY
    import triton_moe.checks  # noqa: F401

    r = REGISTRY[KEY].run(gg.grouped_gemm)
    assert r.passed, str(r)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 256, 2048])
def test_gpu_mixtral_layer_bf16(M):
    p = make_problem(MODELS["mixtral"], M, torch.bfloat16, "cuda", seed=M, routing="skewed" if M == 256 else "uniform")
    out = gg.moe_forward_grouped(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.gpu
def test_gpu_every_table_config_is_correct():
    """Every config of the committed NVIDIA table (and the fallback) on a Mixtral-width problem with tails."""
    E, k, N, K, M = 8, 2, 14336 + 40, 4096 + 48, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(M, K, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(E, N, K, generator=gen, device="cuda") * K ** -0.5).bfloat16()
    ids = make_problem(MODELS["mixtral"].scaled(64, 16), M, torch.float32, "cuda", seed=1).topk_ids
    ref = gg.grouped_gemm_reference(a, w, ids, k)
    for _, cfg in gg.config_table() + gg.DEFAULT_GPU_TABLE:
        out = gg.grouped_gemm(a, w, *sorted_dispatch(ids, E, cfg.BLOCK_M), k, cfg)
        assert float((out.double() - ref).norm() / ref.norm()) < 2e-2, cfg


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph():
    p = make_problem(MODELS["mixtral"], 64, torch.bfloat16, "cuda", seed=5)
    x, w_, ids = p.x.clone(), p.topk_weights.clone(), p.topk_ids.clone()
    fwd = lambda: gg.moe_forward_grouped(x, w_, ids, p.w1, p.w3, p.w2)  # noqa: E731
    fwd()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd()
    q = make_problem(MODELS["mixtral"].scaled(4096, 16), 64, torch.bfloat16, "cuda", seed=6)
    x.copy_(q.x)
    w_.copy_(q.topk_weights)
    ids.copy_(q.topk_ids)
    graph.replay()
    torch.cuda.synchronize()
    ref = moe_reference(x, w_, ids, p.w1, p.w3, p.w2)
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-2
