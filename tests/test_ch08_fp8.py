"""Chapter 8: fp8 experts. The checkers pass the solution, call the untouched exercise "not attempted" and reject
planted bugs with words that name them; the API (quantize_experts, the DeepSeek-V3 loader, fp8_dtype,
validation) behaves; GPU tests run the layer at real shapes, in a CUDA graph, without host synchronisation."""
import pytest
import torch

from notebook_helpers import check, exercise_ns, planted_ns, solution_ns
from triton_moe.kernels import fp8
from triton_moe.mode import ON_GPU

QUANT, GATE_UP, LAYER = "08:quantize_act", "08:fused_gate_up_fp8", "08:fused_experts_fp8"


@pytest.mark.parametrize("key", [QUANT, GATE_UP, LAYER])
def test_solution_passes(key):
    r = check(key, solution_ns("08"))
    assert r.passed, str(r)


@pytest.mark.parametrize("key", [QUANT, GATE_UP, LAYER])
def test_untouched_exercise_is_not_attempted(key):
    r = check(key, exercise_ns("08"))
    assert r.status == "not attempted", str(r)


GATE = "acc_gate += tl.dot(a, w_gate) * (a_s[:, None] * s_gate[None, :])"
UP = "acc_up += tl.dot(a, w_up) * (a_s[:, None] * s_up[None, :])"
S_OFFS = ("# Each column's scale row: its 128-row block (block scales) or itself (GROUP_N = 1: per channel).\n"
          "    s_offs = expert * stride_se + (offs_n_safe // GROUP_N) * stride_sn")

BUGS = {
    # quantize_act
    "scale-multiplied": (QUANT, [("q = round_to_fp8(x / scale, FP8_MAX, MIN_EXP)\n",
                                  "q = round_to_fp8(x * scale, FP8_MAX, MIN_EXP)\n")], "MULTIPLIED"),
    "scale-inverted": (QUANT, [("scale = tl.maximum(amax, 1e-10) / FP8_MAX\n",
                                "scale = FP8_MAX / tl.maximum(amax, 1e-10)\n")],
                       "inverse"),
    "fnuz-max-for-fn": (QUANT, [("fmax, min_exp = fp8_format(dtype)",
                                 "fmax, min_exp = fp8_format(torch.float8_e4m3fnuz)")], "fn/fnuz"),
    # fused_gate_up_fp8
    "scale-divides": (GATE_UP, [(GATE, GATE.replace("* (a_s", "/ (a_s")), (UP, UP.replace("* (a_s", "/ (a_s"))],
                      "DIVIDE"),
    "block-of-the-program": (GATE_UP, [(S_OFFS, S_OFFS.replace("(offs_n_safe // GROUP_N)", "pid_n"))], "n // GROUP_N"),
    "block-transposed": (GATE_UP, [(S_OFFS, S_OFFS.replace("* stride_sn", "* stride_sk")),
                                   ("s_gate = tl.load(s1_ptr + s_offs + kb * stride_sk)",
                                    "s_gate = tl.load(s1_ptr + s_offs + kb * stride_sn)"),
                                   ("s_up = tl.load(s3_ptr + s_offs + kb * stride_sk)",
                                    "s_up = tl.load(s3_ptr + s_offs + kb * stride_sn)")], "transposed"),
    "activation-group-is-the-step": (GATE_UP, [("a_s = tl.load(xs_ptrs + kb * stride_xsk, mask=row_mask, other=0.0)\n",
                                                "a_s = tl.load(xs_ptrs + k * stride_xsk, mask=row_mask, other=0.0)\n")],
                                     "(k * BLOCK_K) // GROUP_K"),
    "fp8-accumulator": (GATE_UP, [(GATE, "acc_gate = (acc_gate + tl.dot(a, w_gate) * (a_s[:, None] * s_gate[None, :]))"
                                         ".to(tl.float8e4nv).to(tl.float32)"),
                                  (UP, "acc_up = (acc_up + tl.dot(a, w_up) * (a_s[:, None] * s_up[None, :]))"
                                       ".to(tl.float8e4nv).to(tl.float32)")], "fp8"),
    "running-sum-scaled": (GATE_UP, [(GATE, "acc_gate = tl.dot(a, w_gate, acc_gate) * (a_s[:, None] * s_gate[None, :])"),
                                     (UP, "acc_up = tl.dot(a, w_up, acc_up) * (a_s[:, None] * s_up[None, :])")],
                           "running sum"),
    "channel-scale-divides": (GATE_UP, [("acc_gate = acc_gate * tl.load(s1_ptr + s_offs)[None, :]",
                                         "acc_gate = acc_gate / tl.load(s1_ptr + s_offs)[None, :]"),
                                        ("acc_up = acc_up * tl.load(s3_ptr + s_offs)[None, :]",
                                         "acc_up = acc_up / tl.load(s3_ptr + s_offs)[None, :]")], "DIVIDE"),
    # the layer
    "x-groups-of-64": (LAYER, [("xq, xs = quantize_act(x, q.dtype)\n", "xq, xs = quantize_act(x, q.dtype, group=64)\n")],
                       "K blocks"),
    "h-groups-of-64": (LAYER, [("hq, hs = quantize_act(h, q.dtype)\n", "hq, hs = quantize_act(h, q.dtype, group=64)\n")],
                       "K blocks"),
    "x-not-quantised": (LAYER, [("        h = fused_gate_up_fp8(xq, q,", "        h = fused_gate_up_fp8(x, q,")], "x must have dtype"),
}


@pytest.mark.parametrize("name", list(BUGS))
def test_planted_bug_is_rejected(name):
    key, replace, expect = BUGS[name]
    r = check(key, planted_ns("08", *replace))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


# --------------------------------------------------------------------------------------------------
# API


def weights(E=3, F=200, H=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, F, H, generator=g), torch.randn(E, F, H, generator=g), torch.randn(E, H, F, generator=g))


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_quantize_round_trip(scheme):
    w1, w3, w2 = weights()
    q = fp8.quantize_experts(w1, w3, w2, scheme, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and q.scheme == scheme
    want = (3, 2, 2) if scheme == "block" else (3, 200)
    assert tuple(q.w1_scale.shape) == want
    for w, d in zip((w1, w3, w2), q.dequantize()):
        err = float((d - w).norm() / w.norm())
        assert err < 0.04, err                  # one e4m3 rounding: ~2-3 %
    # every block's (or row's) largest value lands on 448 exactly
    if scheme == "channel":
        assert torch.all(q.w1.float().abs().amax(2) == 448)
    else:
        assert float(q.w1[:, :128, :128].float().abs().amax()) == 448


def test_fnuz_conversion_keeps_the_values():
    w1, w3, w2 = weights()
    q = fp8.quantize_experts(w1, w3, w2, "block", torch.float8_e4m3fn)
    qz, sz = fp8.to_fnuz(q.w1, q.w1_scale)
    assert qz.dtype == torch.float8_e4m3fnuz
    assert torch.equal(fp8.dequantize(qz, sz), fp8.dequantize(q.w1, q.w1_scale))
    neg_zero = torch.tensor([[[0x80]]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert float(fp8.to_fnuz(neg_zero, torch.ones(1, 1, 1))[0].float()) == 0.0   # fnuz 0x80 would be NaN
    qn = fp8.quantize_experts(w1, w3, w2, "block", torch.float8_e4m3fnuz)
    assert float(qn.w1.float().abs().amax()) == 240


def test_fp8_dtype_per_target():
    assert fp8.fp8_dtype("sm_90") == torch.float8_e4m3fn
    assert fp8.fp8_dtype("sm_89") == torch.float8_e4m3fn
    assert fp8.fp8_dtype("gfx942") == torch.float8_e4m3fnuz
    assert fp8.fp8_dtype("cpu") == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="sm_89"):
        fp8.fp8_dtype("sm_80")
    with pytest.raises(ValueError, match="target"):
        fp8.fp8_dtype("tpu")


def checkpoint(q, layer=3):
    out = {}
    for e in range(q.w1.shape[0]):
        for proj, w, s in (("gate_proj", q.w1, q.w1_scale), ("up_proj", q.w3, q.w3_scale), ("down_proj", q.w2, q.w2_scale)):
            out[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = w[e].clone()
            out[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight_scale_inv"] = s[e].clone()
    out[f"model.layers.{layer}.mlp.gate.weight"] = torch.zeros(4, 4)       # not an expert: ignored
    return out


def test_deepseek_v3_checkpoint_loading():
    q = fp8.quantize_experts(*weights(), "block", torch.float8_e4m3fn)
    got = fp8.from_deepseek_v3_checkpoint(checkpoint(q), dtype=torch.float8_e4m3fn)
    for a, b in ((got.w1, q.w1), (got.w3, q.w3), (got.w2, q.w2)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(got.w2_scale, q.w2_scale) and got.block_shape == (128, 128)
    fnuz = fp8.from_deepseek_v3_checkpoint(checkpoint(q), dtype=torch.float8_e4m3fnuz)
    assert fnuz.dtype == torch.float8_e4m3fnuz
    assert torch.equal(fnuz.dequantize()[0], q.dequantize()[0])


def test_deepseek_v3_checkpoint_errors():
    q = fp8.quantize_experts(*weights(), "block", torch.float8_e4m3fn)
    two = {**checkpoint(q, 3), **checkpoint(q, 4)}
    with pytest.raises(ValueError, match="layer="):
        fp8.from_deepseek_v3_checkpoint(two)
    assert fp8.from_deepseek_v3_checkpoint(two, layer=4, dtype=torch.float8_e4m3fn).shape == q.shape
    missing = checkpoint(q)
    del missing["model.layers.3.mlp.experts.1.up_proj.weight_scale_inv"]
    with pytest.raises(ValueError, match=r"experts \[1\] have no up_proj.weight_scale_inv"):
        fp8.from_deepseek_v3_checkpoint(missing)
    wrong = checkpoint(q)
    wrong["model.layers.3.mlp.experts.0.gate_proj.weight"] = wrong["model.layers.3.mlp.experts.0.gate_proj.weight"].float()
    with pytest.raises(ValueError, match="experts.0.gate_proj.weight must have dtype"):
        fp8.from_deepseek_v3_checkpoint(wrong)
    with pytest.raises(ValueError, match="no 'model.layers"):
        fp8.from_deepseek_v3_checkpoint({"foo": torch.zeros(1)})


def test_validation_names_the_argument():
    w1, w3, w2 = weights()
    with pytest.raises(ValueError, match="scheme"):
        fp8.quantize_experts(w1, w3, w2, "tensor")
    with pytest.raises(ValueError, match="w3"):
        fp8.quantize_experts(w1, w3[:, :10], w2)
    with pytest.raises(ValueError, match="dtype"):
        fp8.quantize_experts(w1, w3, w2, dtype=torch.float16)
    q = fp8.quantize_experts(w1, w3, w2, "block", torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="w2_scale"):
        fp8.QuantizedExperts(q.w1, q.w3, q.w2, q.w1_scale, q.w3_scale, q.w2_scale[:, :1])
    with pytest.raises(ValueError, match="block_shape"):
        fp8.QuantizedExperts(q.w1, q.w3, q.w2, q.w1_scale, q.w3_scale, q.w2_scale, "block", (64, 64))
    dt = torch.float32 if not ON_GPU else torch.bfloat16
    dev = "cuda" if ON_GPU else "cpu"
    x = torch.randn(2, 160, dtype=dt, device=dev)
    logits = torch.randn(2, 3, device=dev)
    with pytest.raises(ValueError, match="q must be a QuantizedExperts"):
        fp8.fused_moe_fp8(x, logits, (w1, w3, w2), 2)
    qd = fp8.quantize_experts(w1.to(dev), w3.to(dev), w2.to(dev), "block")
    with pytest.raises(ValueError, match="x must have shape"):
        fp8.fused_moe_fp8(x[:, :100].contiguous(), logits, qd, 2)
    with pytest.raises(ValueError, match="top_k"):
        fp8.fused_moe_fp8(x, logits, qd, 4)
    with pytest.raises(ValueError, match="group"):
        fp8.quantize_act(x, group=100)


@pytest.mark.skipif(ON_GPU, reason="the CPU interpreter's limit")
def test_fnuz_is_refused_in_the_interpreter():
    q = fp8.quantize_experts(*weights(), "block", torch.float8_e4m3fnuz)
    with pytest.raises(ValueError, match="interpreter"):
        fp8.fused_moe_fp8(torch.randn(2, 160), torch.randn(2, 3), q, 2)


def test_quantize_act_matches_torch_bit_for_bit():
    from triton_moe.checks.ch08_fp8 import quantize_act_reference

    dev = "cuda" if ON_GPU else "cpu"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, generator=g) * torch.logspace(-4, 3, 300)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    x[3, :256] = grid.nan_to_num(0.0) * (1 + 1 / 32)    # ties between grid values, and subnormals
    x = x.to(dev)
    q, s = fp8.quantize_act(x, torch.float8_e4m3fn)
    qr, sr = quantize_act_reference(x, torch.float8_e4m3fn)
    assert torch.equal(s, sr)
    same = (q.float() == qr.float()).float().mean()
    assert same == 1.0 if not ON_GPU else same > 0.999     # a GPU's fp32 division may flip a rare tie


def test_layer_schemes_agree_with_the_dequantised_reference():
    """Both schemes, the decode path (one routing launch) and the general one, on a tiny shape."""
    from triton_moe.checks.ch08_fp8 import layer_reference
    from triton_moe.reference import make_problem
    from triton_moe.shapes import MoEShape

    shape = MoEShape("tiny", hidden=128, ffn=128, experts=4, top_k=2)
    dt = torch.bfloat16 if ON_GPU else torch.float32
    dev = "cuda" if ON_GPU else "cpu"
    for scheme, tol in (("block", 1e-2), ("channel", 2e-3 if not ON_GPU else 2e-2)):
        p = make_problem(shape, 5, dt, dev, seed=4)
        q = fp8.quantize_experts(p.w1, p.w3, p.w2, scheme)
        ref, _, _ = layer_reference(p.x, p.topk_weights, p.topk_ids, q, dt)
        small = fp8.fused_moe_fp8(p.x, p.logits, q, 2)
        det = fp8.fused_experts_fp8(p.x, p.topk_weights, p.topk_ids, q, deterministic=True)
        for got in (small, det):
            err = float((got.double().cpu() - ref).norm() / ref.norm())
            assert err < tol, (scheme, err)


def test_example_launches_record_without_a_gpu():
    from triton_moe.tools.crosscompile import capture_launches, simulate

    launches = fp8.example_launches()
    assert len(launches) >= 8
    for target in ("sm_90", "gfx942"):   # each simulated target launches its own fp8 (e4m3fn, e4m3fnuz)
        with simulate(target), capture_launches(fp8.quantize_act_kernel, fp8.fused_gate_up_fp8_kernel,
                                                fp8.down_combine_fp8_kernel, fp8.moe_sum_kernel) as got:
            for _, launch in launches[:4]:
                launch()
        assert len(got) >= 4 * 3
        assert any(getattr(a, "dtype", None) == fp8.fp8_dtype(target) for lc in got for a in lc.args)


# --------------------------------------------------------------------------------------------------
# GPU: real shapes (DeepSeek-V3 with 32 of its 256 experts, to keep the test's memory small)


def real_shapes():
    from triton_moe.shapes import MODELS

    ds = MODELS["deepseek_v3"]
    return [MODELS["mixtral"], ds.scaled(ds.hidden, ds.ffn, experts=32, top_k=8)]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["block", "channel"])
@pytest.mark.parametrize("M", [1, 64, 300])
def test_gpu_layer_at_real_shapes(scheme, M):
    from triton_moe.checks.ch08_fp8 import layer_reference
    from triton_moe.reference import make_problem

    for shape in real_shapes():
        p = make_problem(shape, M, torch.bfloat16, "cuda", seed=M)
        q = fp8.quantize_experts(p.w1, p.w3, p.w2, scheme)
        assert q.dtype == fp8.fp8_dtype()
        got = fp8.fused_moe_fp8(p.x, p.logits, q, shape.top_k)
        ref, _, _ = layer_reference(p.x, p.topk_weights, p.topk_ids, q, torch.bfloat16)
        err = float((got.double().cpu() - ref).norm() / ref.norm())
        assert err < 3e-2, (shape.name, scheme, M, err)
        del p, q


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_gpu_graph_capture_without_host_sync(scheme):
    from triton_moe.reference import make_problem

    shape = real_shapes()[0]
    p = make_problem(shape, 4, torch.bfloat16, "cuda", seed=1)
    q = fp8.quantize_experts(p.w1, p.w3, p.w2, scheme)
    out = fp8.fused_moe_fp8(p.x, p.logits, q, 2)           # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp8.fused_moe_fp8(p.x, p.logits, q, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = fp8.fused_moe_fp8(p.x, p.logits, q, 2)
    g.replay()
    torch.cuda.synchronize()
    assert float((captured.float() - out.float()).abs().max()) <= 1e-2 * float(out.float().abs().max())


def test_notebook_kernel_cells_match_the_module():
    """Until ``sync`` rewrites cells from their ``triton_moe.from`` metadata, the cells hold each shown symbol's
    source verbatim (the notebook and the package cannot drift apart)."""
    import importlib
    import inspect
    import json

    from notebook_helpers import notebook

    nb = json.loads(notebook("solutions", "08").read_text())
    shown = 0
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("triton_moe")
        if not meta:
            continue
        mod = importlib.import_module(meta["from"])
        src = "".join(cell["source"])
        for name in meta["show"]:
            obj = getattr(mod, name)
            assert inspect.getsource(getattr(obj, "fn", obj)).rstrip() in src, f"{name} differs from {meta['from']}"
            shown += 1
    assert shown >= 7
