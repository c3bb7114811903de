"""Chapter 7: the honest-floor checker passes the solution, calls the untouched exercise "not attempted", and
rejects planted bugs with a message that names them."""
import pytest

from notebook_helpers import check, exercise_ns, planted_ns, solution_ns

KEY = "07:active_floor_ms"
ACTIVE = "active = int(torch.unique(topk_ids).numel())"
MOVED = "moved = active * shape.weight_bytes_per_expert(bytes_per_elem) + shape.activation_bytes(M, bytes_per_elem)"
FLOOR = "return 1e3 * max(t_bytes, t_flops)"


def test_solution_passes():
    r = check(KEY, solution_ns("07"))
    assert r.passed, str(r)


def test_untouched_exercise_is_not_attempted():
    r = check(KEY, exercise_ns("07"))
    assert r.status == "not attempted", str(r)


BUGS = {
    # the uniform-routing expectation instead of the experts really used
    "expectation": ([(ACTIVE, "active = shape.expected_active_experts(topk_ids.shape[0])")], "on average"),
    # slots, not distinct experts
    "slots": ([(ACTIVE, "active = topk_ids.numel()")], "counts slots"),
    # the memory bound only
    "no-compute": ([(FLOOR, "return 1e3 * t_bytes")], "compute bound"),
    # the compute bound only
    "no-bytes": ([(FLOOR, "return 1e3 * t_flops")], "memory bound"),
    # weights only
    "no-activations": ([(MOVED, "moved = active * shape.weight_bytes_per_expert(bytes_per_elem)")], "activation bytes"),
    # seconds, not milliseconds
    "seconds": ([(FLOOR, "return max(t_bytes, t_flops)")], "expected"),
    # issue 10: the bytes_per_elem option ignored; the committed ceilings hard-coded
    "bytes-hard-coded": ([(MOVED, "moved = active * shape.weight_bytes_per_expert(2) + shape.activation_bytes(M, 2)")],
                         "bytes_per_elem argument"),
    "ceilings-hard-coded": ([('t_bytes = moved / (ceilings["copy_GBps"] * 1e9)', "t_bytes = moved / (3000.0 * 1e9)"),
                             ('t_flops = shape.flops(M) / (ceilings["matmul_TFLOPs"] * 1e12)',
                              "t_flops = shape.flops(M) / (695.0 * 1e12)")], "ceilings passed in"),
}


@pytest.mark.parametrize("name", list(BUGS))
def test_planted_bug_is_rejected(name):
    replace, expect = BUGS[name]
    r = check(KEY, planted_ns("07", *replace))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


def test_unusual_correct_solution_passes():
    r = check(KEY, planted_ns("07", (ACTIVE, "active = len(set(topk_ids.flatten().tolist()))")))
    assert r.passed, str(r)
