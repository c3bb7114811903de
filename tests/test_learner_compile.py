"""A kernel that passes in the interpreter is also compiled for sm_90 and gfx942 (no GPU): planted
interpreter-only kernels are rejected with the compiler's reason and the learner's cell and line; a correct
kernel is accepted; a second check of the same kernel is a cache hit."""
import os
import time

import pytest
import torch

from triton_moe import mode
from triton_moe.tools import learner_compile as lc

pytestmark = pytest.mark.skipif(mode.ON_GPU, reason="the check runs after interpreter passes (CPU mode)")

# Two notebook cells, as the grader writes them (<notebook>_cell_NN.py): constants, then the kernels.
CELL_4 = "import triton.language as tl\n\nBLOCK = tl.constexpr(16)\nSCALE = tl.constexpr(16)\nROWS = 16\n"
CELL_5 = '''import triton
import triton.language as tl


@triton.jit
def dot_k8(a_ptr, b_ptr, c_ptr, K: tl.constexpr):
    r = tl.arange(0, BLOCK)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + r[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * BLOCK + r[None, :])
    c = tl.dot(a, b)
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], c)


@triton.jit
def loop_value(x_ptr, out_ptr, n):
    offs = tl.arange(0, BLOCK)
    for i in range(0, n):
        acc = tl.load(x_ptr + i * BLOCK + offs)
    tl.store(out_ptr + offs, acc)


@triton.jit
def runtime_unroll(x_ptr, out_ptr, n):
    offs = tl.arange(0, BLOCK)
    for i in tl.static_range(n):
        tl.store(out_ptr + offs, tl.load(x_ptr + i * BLOCK + offs) * 2)


@triton.jit
def correct_sum(x_ptr, out_ptr, n):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n):
        acc += tl.load(x_ptr + i * BLOCK + offs)
    tl.store(out_ptr + offs, acc * SCALE)


@triton.jit
def plain_global(x_ptr, out_ptr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) * ROWS)
'''


@pytest.fixture(autouse=True)
def compile_check_on(monkeypatch):
    monkeypatch.setenv(lc.ENV, "1")  # tests/conftest.py turns it off for the other tests


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    d = tmp_path_factory.mktemp("cells")
    ns = {"__name__": "__main__"}
    for i, src in ((4, CELL_4), (5, CELL_5)):
        f = d / f"learner_cell_{i:02d}.py"
        f.write_text(src)
        exec(compile(src, str(f), "exec"), ns)
    return ns


def _check_all(ns):
    """What a checker does: launch the learner's kernels on small CPU tensors (the interpreter runs them)."""
    x = torch.randn(3 * 16)
    out = torch.empty(16)
    a, b, c = torch.randn(16, 8), torch.randn(8, 16), torch.empty(16, 16)
    with lc.recording() as launches:
        ns["dot_k8"][(1,)](a, b, c, K=8)
        ns["loop_value"][(1,)](x, out, 3)
        ns["runtime_unroll"][(1,)](x, out, 3)
        ns["plain_global"][(1,)](x, out)
        ns["correct_sum"][(1,)](x, out, 3)
    torch.testing.assert_close(out, x.view(3, 16).sum(0) * 16)   # the interpreter accepted all of them
    torch.testing.assert_close(c, a @ b, rtol=1e-4, atol=1e-4)
    return launches


def test_interpreter_only_kernels_are_rejected_with_the_learners_line(notebook):
    assert lc.enabled()
    launches = _check_all(notebook)
    assert [k.__name__ for k, _ in launches] == ["dot_k8", "loop_value", "runtime_unroll", "plain_global", "correct_sum"]
    t0 = time.perf_counter()
    problems = lc.compile_problems(None, launches)
    first = time.perf_counter() - t0
    by = {p.split()[2]: p for p in problems}
    assert set(by) == {"dot_k8", "loop_value", "runtime_unroll", "plain_global"}, problems
    assert "(sm_90): Input shapes should have M >= 1, N >= 1 and K >= 16 (cell 5, line 11: c = tl.dot(a, b))" in by["dot_k8"]
    assert "acc is not defined" in by["loop_value"] and "(cell 5, line 20: tl.store(out_ptr + offs, acc))" in by["loop_value"]
    assert "(cell 5, line 26: for i in tl.static_range(n):)" in by["runtime_unroll"], by["runtime_unroll"]
    assert "Cannot access global variable ROWS" in by["plain_global"]      # a plain Python global: GPU-only error
    assert "(cell 5, line 42: tl.store(out_ptr + offs, tl.load(x_ptr + offs) * ROWS))" in by["plain_global"]
    assert all(p.startswith("your kernel ") and "compiles in the interpreter but not for the GPU" in p for p in problems)
    t0 = time.perf_counter()
    assert lc.compile_problems(None, launches) == problems   # cached: no worker
    assert time.perf_counter() - t0 < min(2.0, first)


def test_a_correct_kernel_is_accepted(notebook):
    launches = _check_all(notebook)
    assert notebook["correct_sum"] in [k for k, _ in launches]
    assert lc.compile_problems([notebook["correct_sum"]], launches) == []


def test_module_holds_the_constants_and_imports_the_kernel_uses(notebook):
    source, where = lc.module_source([notebook["correct_sum"]])
    assert "BLOCK = tl.constexpr(16)" in source and "SCALE = tl.constexpr(16)" in source and "ROWS" not in source
    assert "def correct_sum(" in source
    assert where["correct_sum"][1] == 31 and where["correct_sum"][0].endswith("learner_cell_05.py")


def test_a_run_time_arange_bound_fails_in_the_interpreter_already(tmp_path):
    """tl.arange with a run-time bound (or a non-power-of-two one) is rejected by the interpreter itself
    (triton 3.6 and 3.7): the learner already gets an error there; the unrolled loop above is the case
    only the compiler catches."""
    import triton
    import triton.language as tl

    f = tmp_path / "arange_cell_03.py"
    f.write_text("import triton\nimport triton.language as tl\n\n@triton.jit\n"
                 "def k(x_ptr, n):\n    tl.store(x_ptr + tl.arange(0, n), 1.0)\n")
    ns = {}
    exec(compile(f.read_text(), str(f), "exec"), ns)
    with pytest.raises(Exception, match="arange's arguments must be of type tl.constexpr"):
        ns["k"][(1,)](torch.empty(16), 16)


def test_package_kernels_are_not_recorded_and_the_switch_turns_it_off(monkeypatch):
    from triton_moe.kernels import grouped_gemm as gg

    assert not lc.is_learner_kernel(gg.grouped_gemm_kernel)
    monkeypatch.setenv(lc.ENV, "0")
    assert not lc.enabled()
