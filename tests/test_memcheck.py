"""The checkers' memory checks (triton_moe.checks.memcheck): out-of-bounds accesses in the interpreter are
refused before they touch memory and reported with the tensor and rows; write-write races between programs
fail on the CPU; launches and stores are recorded; guard memory reports writes past a buffer."""
import pytest
import torch
import triton
import triton.language as tl

import triton_moe  # noqa: F401  (CPU mode: the interpreter)
from triton_moe.checking import CheckFailure, Guarded
from triton_moe.checks.memcheck import watch
from triton_moe.mode import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="the interpreter's checks (CPU mode)")


@triton.jit
def copy_rows(src, dst, n_rows, N, shift, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    m = rows[:, None] < n_rows
    if MASK_N:
        m = m & (cols[None, :] < N)
    v = tl.load(src + rows[:, None] * N + cols[None, :], mask=m, other=0.0)
    tl.store(dst + (rows[:, None] + shift) * N + cols[None, :], v, mask=m)


@triton.jit
def add_rows(src, dst, N, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
    """Every program adds its row of src into row 0 of dst."""
    cols = tl.arange(0, BLOCK_N)
    v = tl.load(src + tl.program_id(0) * N + cols)
    if ATOMIC:
        tl.atomic_add(dst + cols, v)
    else:
        old = tl.load(dst + cols)
        tl.store(dst + cols, old + v)


def test_correct_kernel_passes_and_is_recorded():
    src, dst = torch.randn(8, 16), torch.zeros(8, 16)
    with watch() as rec:
        copy_rows[(2,)](src, dst, 8, 16, 0, BLOCK_M=4, BLOCK_N=16, MASK_N=True)
    assert torch.equal(src, dst)
    assert rec.launches["copy_rows"] == 1 and rec.stored["copy_rows"] == 128


def test_store_past_the_end_is_refused_with_rows():
    src, dst = torch.randn(8, 16), torch.zeros(8, 16)
    with pytest.raises(CheckFailure, match=r"wrote .* past the end of dst .*rows 8-9.*whole rows.*in copy_rows"):
        with watch():
            copy_rows[(2,)](src, dst, 8, 16, 6, BLOCK_M=4, BLOCK_N=16, MASK_N=True)


def test_read_past_the_end_with_a_missing_column_mask():
    src, dst = torch.randn(8, 12), torch.zeros(8, 12)
    with pytest.raises(CheckFailure, match=r"read .* past the end of src .*trailing columns") as e:
        with watch():
            copy_rows[(2,)](src, dst, 8, 12, 0, BLOCK_M=4, BLOCK_N=16, MASK_N=False)
    assert "offs_n < N" in e.value.hint


def test_read_modify_write_race_fails_and_atomic_passes():
    src = torch.randn(4, 16)
    dst = torch.zeros(1, 16)
    with pytest.raises(CheckFailure, match="two different programs") as e:
        with watch(races=True):
            add_rows[(4,)](src, dst, 16, BLOCK_N=16, ATOMIC=False)
    assert "tl.atomic_add" in e.value.hint
    dst.zero_()
    with watch(races=True) as rec:
        add_rows[(4,)](src, dst, 16, BLOCK_N=16, ATOMIC=True)
    assert torch.allclose(dst[0], src.sum(0)) and rec.stored["add_rows"] == 64


def test_guarded_reports_rows_past_the_end_and_overwritten_inputs():
    out = Guarded("out", (4, 8), torch.float32, "cpu", before=2, after=6)
    out.buf[(2 + 5) * 8] = 1.0
    with pytest.raises(CheckFailure, match=r"wrote rows 5 past the end of out \(it has 4 rows\)"):
        out.check()
    inp = Guarded("x", (4, 8), torch.float32, "cpu", after=2, init=torch.ones(4, 8))
    inp.view[2, 3] = 5.0
    with pytest.raises(CheckFailure, match="input x was overwritten"):
        inp.check()
    acc = Guarded("acc", (4, 8), torch.float32, "cpu", after=4, guard_value=7777.0)
    acc.buf[-1] += 0.5   # an atomic add into the guard changes its finite value
    with pytest.raises(CheckFailure, match="past the end of acc"):
        acc.check()
