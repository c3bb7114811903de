"""Chapter 2: routers and sorted dispatch. Checkers pass the solution, reject the stub and planted bugs with
messages that name the bug; the package kernels match the references on edge cases; bad input raises
ValueError naming the argument; on a GPU: bf16 and full model shapes, no host synchronisation, CUDA graphs."""
import pytest
import torch

import triton_moe  # noqa: F401
from triton_moe.kernels import dispatch, routing
from triton_moe.mode import ON_GPU, device
from triton_moe.reference import dispatch_sizes, sorted_dispatch_reference

KEYS = ["02:topk_softmax", "02:deepseek_v3_route", "02:sorted_dispatch"]


def nb():
    import notebook_helpers  # imports the grader (nbformat): CPU tests only

    return notebook_helpers


@pytest.mark.parametrize("key", KEYS)
def test_solution_passes(key):
    h = nb()
    r = h.check(key, h.solution_ns("02"))
    assert r.passed, str(r)


@pytest.mark.parametrize("key", KEYS)
def test_untouched_exercise_is_not_attempted(key):
    h = nb()
    r = h.check(key, h.exercise_ns("02"))
    assert r.status == "not attempted", str(r)


TOPK_BUGS = {
    "no-removal": ('x = tl.where(cols[None, :] == idx[:, None], float("-inf"), x)', "x = x", "twice"),
    "ties-to-higher": ("idx = tl.min(tl.where(x == best[:, None], cols[None, :], BLOCK_E), axis=1)",
                       "idx = tl.max(tl.where(x == best[:, None], cols[None, :], -1), axis=1)", "lower expert index"),
    "never-renormalise": ("    if RENORMALIZE:\n", "    if False:\n", "THEIR sum"),
    "always-renormalise": ("    if RENORMALIZE:\n", "    if True:\n", "ALL experts"),
    "denominator-without-max": ("denom = tl.sum(tl.exp(x - x_max[:, None]), axis=1)",
                                "denom = tl.sum(tl.exp(x), axis=1)", "row max"),
}

DEEPSEEK_BUGS = {
    "top1-group-score": ("tl.sum(two_best, axis=1)[:, None]", "2 * tl.max(two_best, axis=1)[:, None]", "TWO best"),
    "no-group-limit": ("    choice = tl.where(keep, choice, NEG)\n", "    choice = choice\n", "group limit is missing"),
    "biased-weights": ("topk_select(choice, scores, BLOCK_T", "topk_select(choice, choice, BLOCK_T", "UNBIASED"),
    "no-scale": ("/ tl.sum(chosen_w, axis=1)[:, None] * scale", "/ tl.sum(chosen_w, axis=1)[:, None]",
                 "routed_scaling_factor"),
    "no-bias": ("scores + bias[None, :], NEG)", "scores, NEG)", "WITHOUT the correction bias"),
}

DISPATCH_BUGS = {
    "wrong-sentinel": ("dtype=tl.int32) + num_slots\n", "dtype=tl.int32) + num_slots - 1\n", "sentinel"),
    "off-by-one-block-expert": ("(end[None, :] <= first_row[:, None])", "(end[None, :] < first_row[:, None])",
                                "off-by-one block expert id"),
    "inclusive-rank": ("before = tl.cumsum(onehot, axis=0) - onehot", "before = tl.cumsum(onehot, axis=0)",
                       "EXCLUSIVE"),
    "no-advance": ("        next_row += tl.sum(onehot, axis=0)\n", "", "never placed"),
    "no-minus-one": ("expert = tl.where(first_row < rows_in_use, expert, -1)", "expert = expert", "-1"),
}


@pytest.mark.parametrize("name", list(TOPK_BUGS))
def test_topk_softmax_bug_is_rejected(name):
    old, new, expect = TOPK_BUGS[name]
    h = nb()
    r = h.check("02:topk_softmax", h.planted_ns("02", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


@pytest.mark.parametrize("name", list(DEEPSEEK_BUGS))
def test_deepseek_bug_is_rejected(name):
    old, new, expect = DEEPSEEK_BUGS[name]
    h = nb()
    r = h.check("02:deepseek_v3_route", h.planted_ns("02", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


@pytest.mark.parametrize("name", list(DISPATCH_BUGS))
def test_dispatch_bug_is_rejected(name):
    old, new, expect = DISPATCH_BUGS[name]
    h = nb()
    r = h.check("02:sorted_dispatch", h.planted_ns("02", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


# --------------------------------------------------------------------------------------------------
# The package kernels directly


def _ids(M, E, k, kind, seed=0):
    from triton_moe.checks.ch02_routing_dispatch import _ids as make

    return make(M, E, k, kind, torch.Generator().manual_seed(seed)).to(device())


DISPATCH_EDGES = {
    "M=1": (1, 8, 2, 16, "uniform"),
    "256-experts": (3, 256, 8, 16, "uniform"),
    "empty-experts": (40, 16, 2, 32, "empty"),
    "heavy-skew": (200, 8, 2, 64, "skewed"),
    "not-a-multiple": (37, 8, 2, 64, "uniform"),
    "block_m=1": (5, 8, 2, 1, "uniform"),
    "top_k=E": (7, 4, 4, 16, "uniform"),
}


@pytest.mark.parametrize("name", list(DISPATCH_EDGES))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_dispatch_matches_reference(name, impl):
    M, E, k, bm, kind = DISPATCH_EDGES[name]
    ids = _ids(M, E, k, kind)
    fn = dispatch.sorted_dispatch if impl == "triton" else dispatch.sorted_dispatch_torch
    got = fn(ids, E, bm)
    ref = sorted_dispatch_reference(ids, E, bm)
    for g, r, what in zip(got, ref, ("sorted_token_ids", "expert_ids", "num_tokens_post_padded")):
        assert g.dtype == torch.int32 and torch.equal(g.cpu(), r.cpu()), what


def test_dispatch_all_tokens_one_expert_and_int64():
    ids = torch.stack([torch.tensor([3, (t % 7) + 4 if (t % 7) + 4 != 3 else 0]) for t in range(50)]).to(device())
    for t in (ids.int(), ids.long()):
        got = dispatch.sorted_dispatch(t, 16, 16)
        ref = sorted_dispatch_reference(t, 16, 16)
        assert all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(got, ref))


def test_routers_match_references_with_ties():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(70, 64, generator=gen)
    logits[::5, 7] = logits[::5, 40] = 9.0           # exact ties: the lower index must win
    for renorm in (True, False):
        w, ids = routing.topk_softmax(logits.to(device()), 6, renorm)
        rw, rids = routing.topk_softmax_reference(logits, 6, renorm)
        assert torch.equal(ids.cpu().long(), rids)   # same experts, same (decreasing) order
        assert torch.allclose(w.cpu().double(), rw, rtol=1e-5, atol=1e-7)
    bias = torch.randn(64, generator=gen) * 0.3
    w, ids = routing.deepseek_v3_route(logits.to(device()), bias.to(device()), 6, 8, 3, 2.5)
    rw, rids = routing.deepseek_v3_route_reference(logits, bias, 6, 8, 3, 2.5)
    assert torch.equal(ids.cpu().long(), rids)
    assert torch.allclose(w.cpu().double(), rw, rtol=1e-5)


def test_append_shared_expert():
    w, ids = routing.topk_softmax(torch.randn(5, 8).to(device()), 2)
    w2, ids2 = routing.append_shared_expert(w, ids, 8)
    assert w2.shape == (5, 3) and torch.all(w2[:, 2] == 1) and torch.all(ids2[:, 2] == 8)


BAD_INPUTS = [
    ("topk_ids", lambda: dispatch.sorted_dispatch(torch.zeros(4, 2), 8, 16)),
    ("topk_ids", lambda: dispatch.sorted_dispatch(torch.zeros(8, dtype=torch.int32), 8, 16)),
    ("topk_ids", lambda: dispatch.sorted_dispatch(torch.zeros(0, 2, dtype=torch.int32), 8, 16)),
    ("block_m", lambda: dispatch.sorted_dispatch(torch.zeros(4, 2, dtype=torch.int32), 8, 24)),
    ("num_experts", lambda: dispatch.sorted_dispatch(torch.zeros(4, 2, dtype=torch.int32), 0, 16)),
    ("top_k", lambda: dispatch.sorted_dispatch(torch.zeros(4, 9, dtype=torch.int32), 8, 16)),
    ("out", lambda: dispatch.sorted_dispatch(torch.zeros(4, 2, dtype=torch.int32), 8, 16, out=(1, 2))),
    ("out[0]", lambda: dispatch.sorted_dispatch(torch.zeros(4, 2, dtype=torch.int32), 8, 16,
                                                 out=(torch.empty(3, dtype=torch.int32),) * 3)),
    ("logits", lambda: routing.topk_softmax(torch.zeros(8), 2)),
    ("logits", lambda: routing.topk_softmax(torch.zeros(4, 8, dtype=torch.int32), 2)),
    ("logits", lambda: routing.topk_softmax(torch.zeros(8, 4).T, 2)),
    ("top_k", lambda: routing.topk_softmax(torch.zeros(4, 8), 0)),
    ("top_k", lambda: routing.topk_softmax(torch.zeros(4, 8), 9)),
    ("n_group", lambda: routing.deepseek_v3_route(torch.zeros(4, 32), torch.zeros(32), 8, 5, 2, 2.5)),
    ("topk_group", lambda: routing.deepseek_v3_route(torch.zeros(4, 32), torch.zeros(32), 8, 4, 5, 2.5)),
    ("top_k", lambda: routing.deepseek_v3_route(torch.zeros(4, 32), torch.zeros(32), 8, 8, 1, 2.5)),
    ("correction_bias", lambda: routing.deepseek_v3_route(torch.zeros(4, 32), torch.zeros(31), 8, 4, 2, 2.5)),
]


@pytest.mark.parametrize("name,call", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_it(name, call):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_example_launches_cover_kernels_and_dtypes():
    from triton_moe.tools.crosscompile import load_specs

    specs, problems = load_specs(["triton_moe.kernels.dispatch:example_launches",
                                  "triton_moe.kernels.routing:example_launches"])
    assert not problems, problems
    specs = [s for _, s in specs]
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for kernel in ("dispatch_count", "dispatch_offsets", "dispatch_layout", "dispatch_scatter"):
        assert any(n.startswith(kernel) for n in names), kernel
    for router in ("topk_softmax", "deepseek_v3_route"):
        assert any(n.startswith(router) and n.endswith("bf16") for n in names)
        assert any(n.startswith(router) and n.endswith("fp16") for n in names)
    for s in specs:
        assert set(s.signature) >= set(s.constexprs) and all(s.signature[c] == "constexpr" for c in s.constexprs)


# --------------------------------------------------------------------------------------------------
# GPU: bf16, full model shapes, no host synchronisation, CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("key", KEYS)
def test_gpu_checkers_pass_on_package_kernels(key):
    from triton_moe.checking import REGISTRY
    import triton_moe.checks  # noqa: F401

    fn = {"02:topk_softmax": routing.topk_softmax, "02:deepseek_v3_route": routing.deepseek_v3_route,
          "02:sorted_dispatch": dispatch.sorted_dispatch}[key]
    r = REGISTRY[key].run(fn)
    assert r.passed, str(r)


@pytest.mark.gpu
@pytest.mark.parametrize("model,M,bm", [("mixtral", 1, 16), ("mixtral", 4096, 64), ("deepseek_v3", 1, 16),
                                         ("deepseek_v3", 4096, 16), ("qwen3", 333, 32)])
def test_gpu_dispatch_full_shapes(model, M, bm):
    from triton_moe.shapes import MODELS

    s = MODELS[model]
    for kind in ("uniform", "skewed", "empty"):
        ids = _ids(M, s.experts, s.top_k, kind, seed=M)
        got = dispatch.sorted_dispatch(ids, s.experts, bm)
        ref = sorted_dispatch_reference(ids, s.experts, bm)
        assert all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(got, ref)), kind


@pytest.mark.gpu
def test_gpu_routing_and_dispatch_never_synchronise():
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(512, 256, generator=gen, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(256, generator=gen, device="cuda") * 0.3
    routing.topk_softmax(logits[:, :8].contiguous(), 2)   # compile outside the check
    routing.deepseek_v3_route(logits, bias, 8, 8, 4, 2.5)
    ids = _ids(512, 256, 8, "skewed")
    dispatch.sorted_dispatch(ids, 256, 16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w, ids2 = routing.deepseek_v3_route(logits, bias, 8, 8, 4, 2.5)
        routing.topk_softmax(logits[:, :8].contiguous(), 2)
        out = dispatch.sorted_dispatch(ids2, 256, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = sorted_dispatch_reference(ids2, 256, 16)
    assert all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(out, ref))


@pytest.mark.gpu
def test_gpu_routing_and_dispatch_in_a_cuda_graph():
    E, k, M, bm = 8, 2, 300, 64
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(M, E, generator=gen, device="cuda")
    static_logits = logits.clone()

    def step():
        w, ids = routing.topk_softmax(static_logits, k)
        return (w, ids) + tuple(dispatch.sorted_dispatch(ids, E, bm))

    step()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (2, 3):  # new inputs copied into the static buffer, then replay
        static_logits.copy_(torch.randn(M, E, generator=gen, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        rw, rids = routing.topk_softmax_reference(static_logits, k)
        assert torch.equal(outs[1].long().cpu(), rids.cpu())
        ref = sorted_dispatch_reference(outs[1], E, bm)
        assert all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(outs[2:], ref))


def test_router_launch_table(tmp_path):
    """Launch configs come from tables/<router>.<vendor>.json when one is committed, else the defaults."""
    from triton_moe import configs

    (tmp_path / "topk_softmax.nvidia.json").write_text(
        '{"meta": {}, "table": [{"max_E": 8, "BLOCK_T": 4, "num_warps": 1},'
        ' {"max_E": 128, "BLOCK_T": 2, "num_warps": 2}]}')
    t = configs.table("topk_softmax", target="sm_90", tables=tmp_path)
    assert [(m, c.BLOCK_T, c.num_warps) for m, c in t.rows] == [(8, 4, 1), (128, 2, 2)]
    assert configs.table("topk_softmax", target="gfx942", tables=tmp_path).source == "portable"
    if not ON_GPU:  # the interpreter always uses the defaults
        assert routing.launch_config("topk_softmax", 8) == (routing.tokens_per_program(8), 4)


# Issue 10 classes: ties at first place, large logits, non-power-of-two experts, writes past an output, a skipped
# loop step that must not be called an inclusive rank, and unusual correct solutions.
REMOVE = 'x = tl.where(cols[None, :] == idx[:, None], float("-inf"), x)'
MORE_TOPK_BUGS = {
    "remove-all-equal": (REMOVE, 'x = tl.where(x == best[:, None], float("-inf"), x)', "EQUAL logits"),
    "weights-without-max": ("tl.exp(best - x_max[:, None])", "tl.exp(best)", "subtract the max"),
}


@pytest.mark.parametrize("name", list(MORE_TOPK_BUGS))
def test_topk_softmax_issue10_bug_is_rejected(name):
    old, new, expect = MORE_TOPK_BUGS[name]
    h = nb()
    r = h.check("02:topk_softmax", h.planted_ns("02", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


def test_topk_softmax_unusual_argmax_passes():
    # tl.argmax breaks ties to the left (lower index), as the reference does
    h = nb()
    r = h.check("02:topk_softmax", h.planted_ns("02", ("idx = tl.min(tl.where(x == best[:, None], cols[None, :], BLOCK_E), axis=1)",
                                                       "idx = tl.argmax(x, axis=1)")))
    assert r.passed, str(r)


def test_dispatch_unmasked_sentinel_store_is_reported_not_crashing():
    h = nb()
    r = h.check("02:sorted_dispatch", h.planted_ns("02", ("tl.store(sorted_token_ids_ptr + rows, sentinel, mask=rows < max_blocks * BLOCK_M)",
                                                          "tl.store(sorted_token_ids_ptr + rows, sentinel)")))
    assert r.status == "failed" and "past the end of sorted_token_ids" in r.message, str(r)


def test_dispatch_skipped_step_is_not_called_inclusive():
    h = nb()
    r = h.check("02:sorted_dispatch", h.planted_ns("02", ("mask=emask, other=0)\n    for s in range(0, CHUNK, SUB):",
                                                          "mask=emask, other=0)\n    for s in range(SUB, CHUNK, SUB):")))
    assert r.status == "failed" and "EXCLUSIVE" not in r.hint and "sorted_token_ids" in r.message, str(r)


def test_topk_softmax_fp16_rounded_weights_are_not_called_renormalisation():
    h = nb()
    r = h.check("02:topk_softmax", h.planted_ns("02", ("weights = chosen_w / denom[:, None]",
                                                       "weights = (chosen_w / denom[:, None]).to(tl.float16).to(tl.float32)")))
    assert r.status == "failed" and "THEIR sum" not in r.hint and "precision" in r.hint, str(r)


def test_dispatch_ignoring_out_is_rejected():
    h = nb()
    r = h.check("02:sorted_dispatch", h.planted_ns("02", ("    if out is None:\n        sorted_token_ids = torch.empty(",
                                                          "    if True:\n        sorted_token_ids = torch.empty(")))
    assert r.status == "failed" and "out=" in r.message, str(r)
