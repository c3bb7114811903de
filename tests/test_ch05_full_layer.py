"""Chapter 5: the down+combine and fused_experts checkers pass the solution, call the untouched exercise "not
attempted", and reject planted bugs with a message that names them."""
import pytest

from notebook_helpers import check, exercise_ns, planted_ns, solution_ns

DOWN, LAYER = "05:down_combine", "05:fused_experts"


@pytest.mark.parametrize("key", [DOWN, LAYER])
def test_solution_passes(key):
    r = check(key, solution_ns("05"))
    assert r.passed, str(r)


@pytest.mark.parametrize("key", [DOWN, LAYER])
def test_untouched_exercise_is_not_attempted(key):
    r = check(key, exercise_ns("05"))
    assert r.status == "not attempted", str(r)


SCALE = "acc = acc * weight[:, None]"
ATOMIC = ('tl.atomic_add(acc_ptr + token[:, None] * stride_am + offs_n[None, :] * stride_an, acc, mask=mask,\n'
          '                      sem="relaxed")')

DOWN_BUGS = {
    "missing-weight": ([(SCALE, "acc = acc * 1.0")], "WITHOUT the routing weights"),
    "weight-twice": ([(SCALE, "acc = acc * weight[:, None] * weight[:, None]")], "applied twice"),
    "dropped-slot": ([("row_mask = slot < num_slots\n", "row_mask = slot < num_slots - 1\n")], "missing the contribution"),
    "store-not-add": ([(ATOMIC, "tl.store(acc_ptr + token[:, None] * stride_am + offs_n[None, :] * stride_an, acc, mask=mask)")],
                      "tl.atomic_add"),
    "dropped-tokens": ([("    mask = row_mask[:, None] & (offs_n[None, :] < N)\n",
                         "    mask = row_mask[:, None] & (offs_n[None, :] < N) & (slot[:, None] >= 2 * top_k)\n")],
                       "no contribution at all"),
}


@pytest.mark.parametrize("name", list(DOWN_BUGS))
def test_down_combine_bug_is_rejected(name):
    replace, expect = DOWN_BUGS[name]
    r = check(DOWN, planted_ns("05", *replace))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


CALL = "return down_combine(h, w2, topk_weights, sorted_token_ids"
LAYER_BUGS = {
    "no-weights": ([(CALL, "return down_combine(h, w2, torch.ones_like(topk_weights), sorted_token_ids")],
                   "WITHOUT the routing weights"),
    "weights-squared": ([(CALL, "return down_combine(h, w2, topk_weights * topk_weights, sorted_token_ids")],
                        "applied twice"),
    "gate-up-swapped": ([("h = fused_gate_up(x, w1, w3, sorted_token_ids", "h = fused_gate_up(x, w3, w1, sorted_token_ids")],
                        "swapped"),
}


@pytest.mark.parametrize("name", list(LAYER_BUGS))
def test_fused_experts_bug_is_rejected(name):
    replace, expect = LAYER_BUGS[name]
    r = check(LAYER, planted_ns("05", *replace))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


# Issue 10 classes: out-of-bounds atomic (row slot instead of token) without a crash, a read-modify-write race,
# a result computed by torch in the host function, a missing N mask on the store, an unusual correct combine.
TORCH_HOST = ("    down_combine_kernel[grid](",
              "    st = sorted_token_ids.long()\n"
              "    blk = expert_ids.long().repeat_interleave(block_m)[: st.numel()]\n"
              "    ok = (st < M * top_k) & (blk >= 0)\n"
              "    y = torch.einsum('sf,shf->sh', h[st[ok]].float(), w2[blk[ok]].float()) * weights[st[ok], None]\n"
              "    out.copy_(torch.zeros(M, H).index_add_(0, st[ok] // top_k, y).to(out.dtype))\n"
              "    return out\n"
              "    down_combine_kernel[grid](")
EPILOGUE = ("    weight = tl.load(topk_weights_ptr + slot, mask=row_mask, other=0.0)\n"
            "    acc = acc * weight[:, None]\n")

MORE_DOWN_BUGS = {
    "atomic-row-slot": ([("tl.atomic_add(acc_ptr + token[:, None]", "tl.atomic_add(acc_ptr + slot[:, None]")],
                        "slot // top_k"),
    "read-modify-write": ([(ATOMIC, "old = tl.load(acc_ptr + token[:, None] * stride_am + offs_n[None, :] * stride_an, "
                                    "mask=mask, other=0.0)\n"
                                    "        tl.store(acc_ptr + token[:, None] * stride_am + offs_n[None, :] * stride_an, "
                                    "old + acc, mask=mask)")], "tl.atomic_add"),
    "torch-in-host": ([TORCH_HOST], "torch computation"),
    "no-n-mask": ([("    mask = row_mask[:, None] & (offs_n[None, :] < N)\n", "    mask = row_mask[:, None]\n")],
                  "column"),
}


@pytest.mark.parametrize("name", list(MORE_DOWN_BUGS))
def test_down_combine_issue10_bug_is_rejected(name):
    replace, expect = MORE_DOWN_BUGS[name]
    r = check(DOWN, planted_ns("05", *replace))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


def test_down_combine_unusual_correct_combine_passes():
    # weights applied before the dot (on the h tile) instead of after, and a where-guarded token row
    r = check(DOWN, planted_ns("05", (SCALE, "acc = acc * tl.where(row_mask, weight, 0.0)[:, None]")))
    assert r.passed, str(r)


def test_fused_experts_ignoring_out_is_rejected():
    # the out= option not passed on to down_combine
    r = check(LAYER, planted_ns("05", ("num_post, deterministic, cfg_down, out)\n    ### END SOLUTION",
                                       "num_post, deterministic, cfg_down)\n    ### END SOLUTION")))
    assert r.status == "failed" and "out=" in (r.message + r.hint), str(r)
