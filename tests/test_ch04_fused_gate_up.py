"""Chapter 4: the fused gate+up checker passes the solution, calls the untouched exercise "not attempted", and
rejects planted bugs with a message that names them."""
import pytest

from notebook_helpers import check, exercise_ns, planted_ns, solution_ns

KEY = "04:fused_gate_up"


def test_solution_passes():
    r = check(KEY, solution_ns("04"))
    assert r.passed, str(r)


def test_untouched_exercise_is_not_attempted():
    r = check(KEY, exercise_ns("04"))
    assert r.status == "not attempted", str(r)


LOOP = "acc_gate = tl.dot(a, w_gate, acc_gate)\n        acc_up = tl.dot(a, w_up, acc_up)"
EPILOGUE = "h = acc_gate * tl.sigmoid(acc_gate) * acc_up"

BUGS = {
    # W1 and W3 tiles swapped in the loop
    "gate-up-swapped": ([("w_gate = tl.load(w1_ptrs,", "w_gate = tl.load(w3_ptrs,"),
                         ("w_up = tl.load(w3_ptrs,", "w_up = tl.load(w1_ptrs,")], "swapped"),
    # silu on the up projection instead of the gate
    "silu-on-up": ([(EPILOGUE, "h = acc_up * tl.sigmoid(acc_up) * acc_gate")], "silu was applied to up"),
    # silu on both
    "silu-on-both": ([(EPILOGUE, "h = acc_gate * tl.sigmoid(acc_gate) * acc_up * tl.sigmoid(acc_up)")],
                     "up projection too"),
    # the activation inside the K loop, on partial sums
    "activation-in-loop": ([(LOOP, "g_k = tl.dot(a, w_gate)\n        acc_gate += g_k * tl.sigmoid(g_k) * tl.dot(a, w_up)"),
                            (EPILOGUE, "h = acc_gate")], "inside the K loop"),
    # the last slot's row is dropped
    "dropped-row": ([("row_mask = slot < num_slots                       #",
                      "row_mask = slot < num_slots - 1                   #")], "never written"),
    # issue 10: the K tail of x unmasked (reads the next row, and past the end of x)
    "x-k-tail-unmasked": ([("a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_remaining), other=0.0)",
                            "a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)")], "K tail"),
    # fp16 rounding of the gate in an fp32 path
    "fp16-rounding": ([(EPILOGUE, "h = (acc_gate * tl.sigmoid(acc_gate)).to(tl.float16).to(tl.float32) * acc_up")],
                      "relative error"),
    # the loop runs one K step short
    "k-step-short": ([("acc_gate = tl.dot(a, w_gate, acc_gate)\n", "acc_gate = tl.dot(a, w_gate, acc_gate) if k < 1 else acc_gate\n")],
                     "relative error"),
}

UNUSUAL = {
    # silu written out, and the sigmoid of the accumulators computed through exp
    "silu-by-exp": [(EPILOGUE, "h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up")],
}


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_correct_solution_passes(name):
    r = check(KEY, planted_ns("04", *UNUSUAL[name]))
    assert r.passed, str(r)


@pytest.mark.parametrize("name", list(BUGS))
def test_planted_bug_is_rejected(name):
    replace, expect = BUGS[name]
    r = check(KEY, planted_ns("04", *replace))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)
