"""Chapter 0: the axpb checker passes the solution and rejects the stub and planted bugs."""
import pytest

from notebook_helpers import check, exercise_ns, planted_ns, solution_ns

KEY = "00:axpb"


def test_solution_passes():
    r = check(KEY, solution_ns("00"))
    assert r.passed, str(r)


def test_untouched_exercise_is_not_attempted():
    r = check(KEY, exercise_ns("00"))
    assert r.status == "not attempted", str(r)


@pytest.mark.parametrize("old,new,expect", [
    ("tl.store(y_ptr + offsets, a * x + b, mask=mask)", "tl.store(y_ptr + offsets, a * x + b)", "past the end"),
    ("mask = offsets < n\n    x", "mask = offsets < n - 1\n    x", "never written"),
    ("a * x + b, mask=mask)", "a * x - b, mask=mask)", "relative error"),
    ("grid = (triton.cdiv(x.numel(), BLOCK),)", "grid = (x.numel() // BLOCK,)", "never written"),
    # issue 10: an unmasked load (reads past the end of x), and y computed by torch in the host function
    ("x = tl.load(x_ptr + offsets, mask=mask)", "x = tl.load(x_ptr + offsets)", "past the end of x"),
])
def test_planted_bug_is_rejected(old, new, expect):
    r = check(KEY, planted_ns("00", (old, new)))
    assert r.status == "failed" and expect in r.message, str(r)


def test_torch_in_host_with_empty_kernel_is_rejected():
    r = check(KEY, planted_ns("00", ("    tl.store(y_ptr + offsets, a * x + b, mask=mask)\n", "    pass\n"),
                              ("BLOCK=BLOCK)\n    return out", "BLOCK=BLOCK)\n    out.copy_(a * x + b)\n    return out")))
    assert r.status == "failed" and "stored nothing" in r.message, str(r)


def test_unusual_correct_kernel_passes():
    # the mask folded into the pointer arithmetic: out-of-range lanes load element 0 and are not stored
    r = check(KEY, planted_ns("00", ("x = tl.load(x_ptr + offsets, mask=mask)", "x = tl.load(x_ptr + tl.where(mask, offsets, 0))")))
    assert r.passed, str(r)
