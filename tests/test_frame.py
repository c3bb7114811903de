"""The frame's promises: CI runs the README's test command; interpreter limits are guarded; validation
errors name the argument; timing is GPU-only with a clear message; results round-trip."""
import re
from pathlib import Path

import pytest
import torch
import triton

from triton_moe import mode, validate
from triton_moe.configs import KernelConfig, load_table, pick, save_table
from triton_moe.shapes import MIXTRAL_8X7B, MODELS

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    cmds = re.findall(r"^\s*(\./course \w+)\s*$", readme, flags=re.M)
    assert "./course test" in cmds and "./course lab" in cmds
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == ["./course test"]


def test_required_top_level():
    for name in ("README.md", "chapters", "solutions", "tests", "environment.yml", "requirements.txt"):
        assert (ROOT / name).exists(), name


def test_environment_yml_matches_requirements():
    req = {l.split("==")[0]: l.split("==")[1] for l in (ROOT / "requirements.txt").read_text().splitlines()
           if "==" in l and not l.startswith("#")}
    env = (ROOT / "environment.yml").read_text()
    for name, version in req.items():
        assert f"{name}=={version}" in env, f"environment.yml lacks {name}=={version}"


@pytest.mark.skipif(mode.ON_GPU, reason="CPU-mode behaviour")
def test_cpu_mode_sets_interpreter_and_refuses_bf16_dots():
    import os

    assert os.environ["TRITON_INTERPRET"] == "1"
    assert mode.default_dtype() == torch.float32
    with pytest.raises(ValueError, match="bfloat16 is not supported in CPU mode"):
        mode.check_interpreter_dtype("x", torch.bfloat16)
    mode.check_interpreter_dtype("x", torch.float16)


@pytest.mark.skipif(mode.ON_GPU, reason="CPU-mode behaviour")
def test_numpy_pin_matches_triton_interpreter_limit():
    import numpy as np

    tri = tuple(int(v) for v in triton.__version__.split(".")[:2])
    npv = tuple(int(v) for v in np.__version__.split(".")[:2])
    if tri <= (3, 6):
        assert npv < (2, 4), "triton <= 3.6's interpreter breaks loops with run-time bounds on numpy >= 2.4"


@pytest.mark.skipif(mode.ON_GPU, reason="documents the CPU interpreter's known limits")
def test_interpreter_known_limits_still_hold():
    """If one of these starts failing, the interpreter improved: update docs/authoring.md and FACTS."""
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

    a, b = torch.randn(16, 16), torch.randn(16, 16)
    c = torch.empty(16, 16)
    dot_kernel[(1,)](a.half(), b.half(), c, N=16)
    assert torch.allclose(c, a.half().float() @ b.half().float(), rtol=1e-2, atol=1e-2)  # fp16 works
    dot_kernel[(1,)](a.bfloat16(), b.bfloat16(), c, N=16)
    ref = a.bfloat16().float() @ b.bfloat16().float()
    assert (c - ref).norm() / ref.norm() > 0.1, "bf16 tl.dot is now right in the interpreter"


def test_validation_errors_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        validate.tensor("x", x[0], ndim=2)
    with pytest.raises(ValueError, match=r"w1 must have shape \[8, \*, 8\]"):
        validate.tensor("w1", torch.randn(8, 4, 4), shape=(8, None, 8))
    with pytest.raises(ValueError, match="w2 must be contiguous"):
        validate.tensor("w2", torch.randn(4, 8).T)
    with pytest.raises(ValueError, match="x must have dtype"):
        validate.tensor("x", x.long(), dtypes=validate.FLOAT_DTYPES)
    with pytest.raises(ValueError, match="x is empty"):
        validate.tensor("x", torch.randn(0, 8), nonempty=True)
    with pytest.raises(ValueError, match="top_k must be between 1 and the number of experts"):
        validate.top_k(9, 8)
    with pytest.raises(ValueError, match="w3 has dtype"):
        validate.same_dtype(w1=x, w3=x.half())


def test_config_table_pick_and_roundtrip(tmp_path):
    table = [(16, KernelConfig(BLOCK_M=16)), (256, KernelConfig(BLOCK_M=64)), (4096, KernelConfig(BLOCK_M=128))]
    assert pick(table, 1).BLOCK_M == 16 and pick(table, 17).BLOCK_M == 64 and pick(table, 10**6).BLOCK_M == 128
    save_table(table, tmp_path / "t.json", {"device": "test"})
    assert load_table(tmp_path / "t.json") == table


def test_napkin_math():
    s = MIXTRAL_8X7B
    assert abs(s.weight_bytes_per_expert() - 352.3e6) < 0.1e6
    assert abs(s.expected_active_experts(1) - 2) < 1e-9 and s.expected_active_experts(64) > 7.99
    assert abs(s.flops(1) - 704.6e6) < 0.1e6
    assert set(MODELS) == {"mixtral", "qwen3", "deepseek_v3"}


def test_timing_is_gpu_only_with_clear_message():
    from triton_moe import timing

    if mode.ON_GPU:
        pytest.skip("CPU-mode behaviour")
    with pytest.raises(RuntimeError, match="needs a GPU"):
        timing.bench_ms(lambda: None)


def test_results_roundtrip_and_plot(tmp_path, monkeypatch):
    from triton_moe import timing

    monkeypatch.setattr(timing, "RESULTS", tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path))
    meta = {"date": "2026-11-26", "device": "Test GPU", "vendor": "nvidia", "torch": "t", "triton": "x", "runtime": "cuda 13"}
    ceil = {"copy_GBps": 3000.0, "matmul_TFLOPs": 700.0}
    rows = [timing.make_row(meta, ceil, MIXTRAL_8X7B, m, "loop", 1.5, "do_bench", torch.bfloat16, "uniform") for m in (1, 16)]
    timing.write_rows(rows, tmp_path / "test-gpu" / "chXX.csv")
    assert (tmp_path / "chXX.csv").exists()  # the copy the GPU machine sends back
    back = timing.load_rows("chXX")
    assert [r["M"] for r in back] == [1, 16] and back[1]["floor_fraction"] == pytest.approx(0.94 / 1.5, rel=0.03)
    assert "Test GPU" in timing.summary_line(back)
    timing.plot_times(back, "t")
    assert timing.summary_line([]) == "not measured"


@pytest.mark.gpu
def test_gpu_ceilings_and_bench():
    from triton_moe import timing

    c = timing.measure_ceilings(copy_bytes=1 << 28, matmul_n=4096)
    assert c["copy_GBps"] > 100 and c["matmul_TFLOPs"] > 10
    x = torch.randn(1 << 20, device="cuda")
    ms, method = timing.bench_ms(lambda: x.mul_(1.0))
    assert ms > 0 and method == "cudagraph"


@pytest.mark.gpu
def test_gpu_chapter1_solution_at_full_mixtral_shape_bf16():
    from notebook_helpers import check, solution_ns

    r = check("01:moe_forward_loop", solution_ns("01"))
    assert r.passed, str(r)
