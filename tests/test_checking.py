"""The checker library's messages are the product: test them directly."""
import pytest
import torch

from triton_moe.checking import (CheckFailure, Exercise, compare, compare_exact, expect_tensor, is_untouched,
                                 poisoned, ranges, tolerance)
from triton_moe.reference import make_problem, moe_reference, sorted_dispatch_reference
from triton_moe.shapes import CPU_SHAPES


def test_ranges():
    assert ranges([37, 38, 39, 63, 40, 70]) == "37-40, 63, 70"
    assert ranges([]) == ""


def test_unwritten_rows_are_named():
    ref = torch.randn(80, 16, dtype=torch.float64)
    out = ref.float().clone()
    out[37:64] = float("nan")
    with pytest.raises(CheckFailure, match="rows 37-63 still hold the NaN poison"):
        compare("output", out, ref, torch.float32)


def test_worst_error_names_token_expert_and_column():
    ref = torch.randn(8, 32, dtype=torch.float64)
    out = ref.float().clone()
    out[5, 17] += 0.4 * ref.norm() / 2
    ids = torch.tensor([[0, 1]] * 5 + [[3, 4]] + [[0, 1]] * 2)
    with pytest.raises(CheckFailure, match=r"token 5 / expert 3: max error .* at column 17"):
        compare("output", out, ref, torch.float32, lambda t: f"token {t} / expert {int(ids[t, 0])}")


def test_shape_and_dtype_messages():
    with pytest.raises(CheckFailure, match=r"shape \(2, 3\), expected \(3, 2\)"):
        expect_tensor("out", torch.zeros(2, 3), (3, 2))
    with pytest.raises(CheckFailure, match="dtype torch.float64, expected torch.float32"):
        expect_tensor("out", torch.zeros(2, dtype=torch.float64), dtype=torch.float32)
    with pytest.raises(CheckFailure, match="should be a torch.Tensor"):
        expect_tensor("out", (1, 2))


def test_integer_mismatch_names_index_and_poison():
    ref = torch.arange(10)
    out = poisoned((10,), torch.int32, "cpu")
    out[:4] = ref[:4]
    with pytest.raises(CheckFailure, match="first at 4: got -7777, expected 4 .*never written"):
        compare_exact("sorted_token_ids", out, ref)


def test_tolerance_fits_dtype():
    assert tolerance(torch.float32) < tolerance(torch.float16) < tolerance(torch.bfloat16) <= 2e-2


def test_exercise_statuses():
    def check(fn, seed):
        if fn(1) != 2:
            raise CheckFailure("f(1) should be 2", hint="add one")
        return ["f(1)"]

    ex = Exercise("99", "f", check)
    assert ex.run(lambda x: x + 1, seed=1).passed
    r = ex.run(lambda x: x, seed=1)
    assert r.status == "failed" and "add one" in str(r)
    r = ex.run(lambda x: 1 / 0, seed=1)
    assert r.status == "failed" and "ZeroDivisionError" in r.message

    def stub(x):
        raise NotImplementedError("f: not attempted yet")

    assert ex.run(stub, seed=1).status == "not attempted"
    assert ex.run(None).status == "not attempted"


def test_is_untouched_sees_marker():
    ns = {}
    exec("def g():\n    # YOUR CODE HERE\n    pass\n", ns)
    # exec'd code has no source file: not detectable, so not flagged
    assert not is_untouched(ns["g"])
    assert not is_untouched(test_ranges)


def test_inputs_are_random_and_fresh():
    a = make_problem(CPU_SHAPES["mixtral"], 4)
    b = make_problem(CPU_SHAPES["mixtral"], 4)
    assert a.seed != b.seed and not torch.equal(a.x, b.x)
    assert a.x.abs().min() >= 0 and a.x.abs().sum() > 0  # never zeros
    c = make_problem(CPU_SHAPES["mixtral"], 4, seed=a.seed)
    assert torch.equal(a.x, c.x)


def test_empty_routing_leaves_experts_without_tokens():
    p = make_problem(CPU_SHAPES["mixtral"], 64, routing="empty", seed=3)
    counts = torch.bincount(p.topk_ids.flatten().long(), minlength=8)
    assert (counts == 0).sum() >= 4


def test_reference_matches_dense_formula():
    p = make_problem(CPU_SHAPES["mixtral"], 5, seed=4)
    out = moe_reference(p.x, p.topk_weights, p.topk_ids, p.w1, p.w3, p.w2)
    x = p.x.double()
    for t in range(5):
        acc = 0
        for j in range(p.shape.top_k):
            e = int(p.topk_ids[t, j])
            h = torch.nn.functional.silu(p.w1[e].double() @ x[t]) * (p.w3[e].double() @ x[t])
            acc = acc + p.topk_weights[t, j].double() * (p.w2[e].double() @ h)
        assert torch.allclose(out[t], acc)


def test_dispatch_reference_contract():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]], dtype=torch.int32)
    sorted_ids, expert_ids, n = sorted_dispatch_reference(ids, experts=4, block_m=4)
    S = 6  # sentinel = M * top_k
    assert n.item() == 12
    assert sorted_ids[:12].tolist() == [1, 4, S, S, 3, S, S, S, 0, 2, 5, S]
    assert expert_ids[:3].tolist() == [0, 1, 2] and (expert_ids[3:] == -1).all()
