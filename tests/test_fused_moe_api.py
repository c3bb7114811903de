"""The public ``fused_moe`` API: validation, the Hugging Face style block wrapper, determinism; on a GPU, full
Mixtral shape in bf16 against float64, no host synchronisation, CUDA graph capture and replay."""
import re

import pytest
import torch
from torch import nn

import triton_moe  # noqa: F401
from triton_moe.checking import relative_error, tolerance
from triton_moe.kernels.fused_moe import (SMALL_SLOTS, FusedMoEBlock, dispatch, fused_experts,
                                         fused_moe, route, route_dispatch, small_path)
from triton_moe.mode import ON_GPU
from triton_moe.reference import make_problem, moe_reference, sorted_dispatch_reference
from triton_moe.shapes import MODELS, MoEShape

DEV = "cuda" if ON_GPU else "cpu"
TINY = MoEShape("tiny", hidden=64, ffn=128, experts=8, top_k=2)


def tiny_problem(tokens=6, dtype=torch.float32, seed=0, shape=TINY):
    return make_problem(shape, tokens, dtype, DEV, seed=seed)


# --------------------------------------------------------------------------------------------------
# Hugging Face style blocks, written here with torch.nn only (the same forward as transformers' code)


class MixtralExpert(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class Qwen3Expert(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """MixtralSparseMoeBlock (norm_topk_prob=None: always renormalise) or Qwen3MoeSparseMoeBlock."""

    def __init__(self, hidden, ffn, experts, top_k, expert_cls, norm_topk_prob=None):
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        if norm_topk_prob is not None:
            self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([expert_cls(hidden, ffn) for _ in range(experts)])

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        router_logits = self.gate(hidden_states)
        routing_weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((b * s, h), dtype=hidden_states.dtype, device=hidden_states.device)
        mask = nn.functional.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            cur = self.experts[e](hidden_states[None, top_x].reshape(-1, h)) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, cur.to(hidden_states.dtype))
        return final.reshape(b, s, h), router_logits


@pytest.mark.parametrize("kind", ["mixtral", "qwen3", "qwen3-no-norm"])
def test_from_hf_block_matches(kind):
    torch.manual_seed(0)
    if kind == "mixtral":
        block = SparseMoeBlock(64, 128, 8, 2, MixtralExpert)
    else:
        block = SparseMoeBlock(64, 128, 8, 3, Qwen3Expert, norm_topk_prob=(kind == "qwen3"))
    block = block.to(DEV)
    fused = FusedMoEBlock.from_hf(block)
    assert fused.top_k == block.top_k and fused.renormalize == (kind != "qwen3-no-norm")
    x = torch.randn(2, 5, 64, device=DEV)
    with torch.no_grad():
        ref = block(x)[0]
        out = fused(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    # fp32 on a GPU: Triton's fp32 tl.dot uses tf32, and two chained projections double its error
    tol = 5e-3 if ON_GPU else tolerance(torch.float32)
    assert relative_error(out, ref) < tol, relative_error(out, ref)


def test_from_hf_rejects_unknown_blocks():
    with pytest.raises(ValueError, match="gate"):
        FusedMoEBlock.from_hf(nn.Linear(4, 4))
    block = SparseMoeBlock(64, 128, 4, 2, MixtralExpert)
    block.experts[0].w1 = nn.Linear(64, 128, bias=True)
    with pytest.raises(ValueError, match="bias"):
        FusedMoEBlock.from_hf(block)


# --------------------------------------------------------------------------------------------------
# Correctness and determinism on this machine (CPU: interpreter, small shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_matches_reference(dtype):
    p = tiny_problem(9, dtype, seed=3)
    out = fused_moe(p.x, p.logits, p.w1, p.w3, p.w2, p.shape.top_k)
    assert out.dtype == dtype and out.shape == p.x.shape
    ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    tol = 5e-3 if ON_GPU and dtype == torch.float32 else tolerance(dtype)  # tf32 dots on a GPU
    assert relative_error(out, ref) < tol
    det = fused_experts(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2, deterministic=True)
    assert relative_error(det, ref) < tol


def test_deterministic_is_bit_identical():
    p = tiny_problem(7, seed=5)
    runs = [fused_experts(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2, deterministic=True) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("experts,top_k,tokens,routing,block_m", [
    (8, 2, 1, "uniform", 16), (8, 2, 32, "skewed", 16), (8, 2, 17, "uniform", 64), (16, 4, 16, "empty", 16),
    (32, 8, 8, "skewed", 32), (128, 8, 3, "uniform", 16), (256, 8, 8, "skewed", 16), (256, 8, 1, "uniform", 64)])
def test_route_dispatch_matches_route_then_dispatch(experts, top_k, tokens, routing, block_m):
    """The decode path's one launch (routing + dispatch + zeroing) gives what route() then dispatch() give:
    the same ids and weights, and chapter 2's dispatch contract exactly."""
    shape = MoEShape("t", 64, 64, experts, top_k)
    p = make_problem(shape, tokens, torch.float32, DEV, seed=tokens + experts, routing=routing)
    for renorm in (True, False):
        acc = torch.full((tokens, 48), float("nan"), device=DEV)
        w, ids, *d = route_dispatch(p.logits, top_k, renorm, block_m, acc)
        w_ref, ids_ref = route(p.logits, top_k, renorm)
        assert torch.equal(ids, ids_ref)
        assert torch.allclose(w, w_ref, rtol=1e-6, atol=1e-7)
        for got, want in zip(d, sorted_dispatch_reference(ids_ref.cpu(), experts, block_m)):
            assert torch.equal(got.cpu().long(), want.long())
        assert torch.equal(acc, torch.zeros_like(acc))


def test_small_path_bounds():
    assert small_path(1, 256, 8) and small_path(SMALL_SLOTS // 2, 8, 2) and not small_path(SMALL_SLOTS, 8, 2)
    assert not small_path(1, 512, 8)
    with pytest.raises(ValueError, match="route_dispatch serves"):
        route_dispatch(torch.randn(64, 8, device=DEV), 2, True, 16)


# --------------------------------------------------------------------------------------------------
# Validation: ValueError naming the argument (no kernel runs)


def _args(**over):
    p = tiny_problem(4, seed=1)
    args = dict(x=p.x, router_logits=p.logits, w1=p.w1, w3=p.w3, w2=p.w2, top_k=2)
    args.update(over)
    return args


@pytest.mark.parametrize("change,words", [
    (lambda a: dict(x=a["x"][:0]), "x is empty"),
    (lambda a: dict(x=a["x"][:, :32].contiguous()), "w1 must have shape"),
    (lambda a: dict(w3=a["w3"][:, :, :32].contiguous()), "w3 must have shape"),
    (lambda a: dict(w2=a["w2"].transpose(1, 2).contiguous()), "w2 must have shape"),
    (lambda a: dict(w2=a["w2"].half()), "w2 must have dtype"),
    (lambda a: dict(w1=a["w1"].transpose(1, 2).contiguous().transpose(1, 2)), "w1 must be contiguous"),
    (lambda a: dict(w3=a["w3"].to("meta")), "w3 is on meta"),
    (lambda a: dict(router_logits=a["router_logits"][:, :4].contiguous()), "router_logits must have shape"),
    (lambda a: dict(top_k=9), "top_k must be between 1 and the number of experts (8)"),
    (lambda a: dict(top_k=0), "top_k must be between"),
    (lambda a: dict(top_k=2.0), "top_k must be an int"),
    (lambda a: dict(x=a["x"].tolist()), "x must be a torch.Tensor"),
    (lambda a: dict(x=a["x"].to(torch.int32)), "x must have dtype"),
])
def test_fused_moe_validation(change, words):
    a = _args()
    a.update(change(a))
    with pytest.raises(ValueError, match=re.escape(words)):
        fused_moe(a.pop("x"), a.pop("router_logits"), a.pop("w1"), a.pop("w3"), a.pop("w2"), a.pop("top_k"))


def test_fused_experts_validation():
    p = tiny_problem(4, seed=2)
    call = lambda **o: fused_experts(o.get("x", p.x), o.get("tw", p.topk_weights), o.get("ti", p.topk_ids),  # noqa: E731
                                     p.w1, p.w3, p.w2, **o.get("kw", {}))
    with pytest.raises(ValueError, match="topk_ids must have dtype"):
        call(ti=p.topk_ids.float())
    with pytest.raises(ValueError, match="topk_ids must have shape"):
        call(ti=p.topk_ids[:2].contiguous())
    with pytest.raises(ValueError, match="topk_weights must have shape"):
        call(tw=p.topk_weights[:, :1].contiguous())
    with pytest.raises(ValueError, match="top_k must be between"):
        call(ti=torch.zeros(4, 9, dtype=torch.int32, device=DEV), tw=torch.ones(4, 9, device=DEV))
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        call(kw={"deterministic": "yes"})


@pytest.mark.skipif(ON_GPU, reason="CPU interpreter only")
def test_bf16_refused_on_cpu():
    a = _args()
    with pytest.raises(ValueError, match="bfloat16 is not supported in CPU mode"):
        fused_moe(a["x"].bfloat16(), a["router_logits"], a["w1"].bfloat16(), a["w3"].bfloat16(), a["w2"].bfloat16(), 2)


# --------------------------------------------------------------------------------------------------
# GPU: full shapes, no host sync, CUDA graphs, determinism


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,routing", [(1, "uniform"), (77, "skewed"), (512, "uniform"), (2048, "uniform")])
def test_gpu_mixtral_full_shape_bf16(tokens, routing):
    p = make_problem(MODELS["mixtral"], tokens, torch.bfloat16, "cuda", routing=routing)
    ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    for det in (False, True):
        out = fused_experts(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2, deterministic=det)
        err = relative_error(out, ref)
        assert err < tolerance(torch.bfloat16), (tokens, routing, det, err)
    out = fused_moe(p.x, p.logits, p.w1, p.w3, p.w2, 2)  # chapter 2's router on the same logits
    assert relative_error(out, ref) < tolerance(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("key,tokens", [("qwen3", 1), ("qwen3", 300), ("deepseek_v3", 64)])
def test_gpu_many_expert_shapes_bf16(key, tokens):
    p = make_problem(MODELS[key], tokens, torch.bfloat16, "cuda", routing="skewed")
    ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    out = fused_experts(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    assert relative_error(out, ref) < tolerance(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("key,tokens,routing", [("qwen3", 1, "uniform"), ("qwen3", 8, "skewed"),
                                                ("deepseek_v3", 4, "uniform"), ("mixtral", 32, "skewed")])
def test_gpu_decode_path_bf16(key, tokens, routing):
    """fused_moe at decode sizes (one launch for routing, dispatch and zeroing) against float64, both combines,
    and its dispatch against chapter 2's kernels."""
    p = make_problem(MODELS[key], tokens, torch.bfloat16, "cuda", routing=routing)
    k = p.shape.top_k
    assert small_path(tokens, p.shape.experts, k)
    ref = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    for det in (False, True):
        out = fused_moe(p.x, p.logits, p.w1, p.w3, p.w2, k, deterministic=det)
        assert relative_error(out, ref) < tolerance(torch.bfloat16), (key, tokens, det)
    w, ids, *d = route_dispatch(p.logits, k, True, 16)
    assert torch.equal(ids, route(p.logits, k)[1])
    assert all(torch.equal(a, b) for a, b in zip(d, dispatch(ids, p.shape.experts, 16)))


@pytest.mark.gpu
def test_gpu_fp16():
    p = make_problem(MODELS["mixtral"], 33, torch.float16, "cuda")
    out = fused_moe(p.x, p.logits, p.w1, p.w3, p.w2, 2)
    assert out.dtype == torch.float16
    assert relative_error(out, moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)) < tolerance(torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 4])  # 4: the decode path
def test_gpu_no_host_sync(tokens):
    p = make_problem(MODELS["mixtral"], tokens, torch.bfloat16, "cuda")
    block = FusedMoEBlock(p.router_weight, p.w1, p.w3, p.w2, 2)
    for det in (False, True):  # compile first: the first launch may synchronise while loading the module
        fused_moe(p.x, p.logits, p.w1, p.w3, p.w2, 2, deterministic=det)
    block(p.x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe(p.x, p.logits, p.w1, p.w3, p.w2, 2)
        fused_moe(p.x, p.logits, p.w1, p.w3, p.w2, 2, deterministic=True)
        block(p.x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("tokens", [48, 8])  # 8: the decode path
def test_gpu_cuda_graph_capture_and_replay(det, tokens):
    p = make_problem(MODELS["mixtral"], tokens, torch.bfloat16, "cuda")
    x, logits = p.x.clone(), p.logits.clone()
    run = lambda: fused_moe(x, logits, p.w1, p.w3, p.w2, 2, deterministic=det)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        new_x = torch.randn(x.shape, generator=g, device="cuda").to(x.dtype)
        new_logits = new_x.float() @ p.router_weight.float().T
        x.copy_(new_x)
        logits.copy_(new_logits)
        graph.replay()
        torch.cuda.synchronize()
        eager = fused_moe(new_x, new_logits, p.w1, p.w3, p.w2, 2, deterministic=det)
        if det:
            assert torch.equal(static_out, eager)
        else:
            assert relative_error(static_out, eager) < 1e-2
        from triton_moe.reference import route_reference
        w, ids = route_reference(new_logits, 2)
        ref = moe_reference(new_x, w.float(), ids.int(), p.w1, p.w3, p.w2)
        assert relative_error(static_out, ref) < tolerance(torch.bfloat16)


@pytest.mark.gpu
def test_gpu_deterministic_bit_identical():
    p = make_problem(MODELS["qwen3"], 256, torch.bfloat16, "cuda")
    runs = [fused_experts(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2, deterministic=True) for _ in range(5)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    p = make_problem(MODELS["mixtral"], 1024, torch.bfloat16, "cuda")
    runs = [fused_experts(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2, deterministic=True) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.gpu
def test_gpu_hf_block_bf16():
    torch.manual_seed(0)
    block = SparseMoeBlock(1024, 2048, 8, 2, MixtralExpert).to("cuda", torch.bfloat16)
    fused = FusedMoEBlock.from_hf(block)
    x = torch.randn(3, 40, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = block(x)[0]
        out = fused(x)
    assert relative_error(out, ref) < tolerance(torch.bfloat16)
