"""Chapter 1: routing and looped-forward checkers pass the solution, reject the stub and planted bugs with
messages that name the bug."""
import pytest

from notebook_helpers import check, exercise_ns, planted_ns, solution_ns


@pytest.mark.parametrize("key", ["01:route_topk", "01:moe_forward_loop"])
def test_solution_passes(key):
    r = check(key, solution_ns("01"))
    assert r.passed, str(r)


@pytest.mark.parametrize("key", ["01:route_topk", "01:moe_forward_loop"])
def test_untouched_exercise_is_not_attempted(key):
    r = check(key, exercise_ns("01"))
    assert r.status == "not attempted", str(r)


ROUTE_BUGS = [
    ("return weights / weights.sum(dim=-1, keepdim=True), ids", "return weights, ids", "renormalise"),
    ("probs = torch.softmax(logits.float(), dim=-1)", "probs = torch.softmax(logits.float(), dim=0)", "token"),
    ("probs = torch.softmax(logits.float(), dim=-1)", "probs = -torch.softmax(logits.float(), dim=-1)", "chose experts"),
]


@pytest.mark.parametrize("old,new,expect", ROUTE_BUGS)
def test_route_bug_is_rejected(old, new, expect):
    r = check("01:route_topk", planted_ns("01", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


LOOP_BUGS = [
    # weight applied twice
    ("y.float() * topk_weights[token, slot, None])", "y.float() * topk_weights[token, slot, None] ** 2)", "applied twice"),
    # missing routing weight
    ("y.float() * topk_weights[token, slot, None])", "y.float())", "WITHOUT the routing weights"),
    # one expert skipped
    ("for e in range(w1.shape[0]):", "for e in range(w1.shape[0] - 1):", "left out"),
    # off-by-one expert
    ("y = (F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T",
     "e1 = (e + 1) % w1.shape[0]\n        y = (F.silu(h @ w1[e1].T) * (h @ w3[e1].T)) @ w2[e1].T", "off-by-one"),
    # gate and up swapped
    ("y = (F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T", "y = (F.silu(h @ w3[e].T) * (h @ w1[e].T)) @ w2[e].T", "swapped"),
    # dropped tokens: only the first slot of each token
    ("token, slot = torch.nonzero(topk_ids == e, as_tuple=True)\n        if",
     "token, slot = torch.nonzero(topk_ids[:, :1] == e, as_tuple=True)\n        if", "missing the contribution"),
]


@pytest.mark.parametrize("old,new,expect", LOOP_BUGS, ids=["twice", "no-weight", "skip-expert", "off-by-one", "swap", "dropped"])
def test_loop_bug_is_rejected(old, new, expect):
    r = check("01:moe_forward_loop", planted_ns("01", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


# Issue 10 classes: other expert counts (hard-coded 8), ties at first place, large logits, output dtype, fp16.
SOFTMAX = "probs = torch.softmax(logits.float(), dim=-1)"
MORE_ROUTE_BUGS = {
    "no-max-subtraction": (SOFTMAX, "probs = torch.exp(logits.float()) / torch.exp(logits.float()).sum(-1, keepdim=True)",
                           "subtract the row max"),
    "fp64-weights": ("return weights / weights.sum(dim=-1, keepdim=True), ids",
                     "return (weights / weights.sum(dim=-1, keepdim=True)).double(), ids", "dtype"),
    "tie-drops-both": ("    weights, ids = torch.topk(probs, top_k, dim=-1)\n",
                       "    ws, idl, p = [], [], probs.clone()\n"
                       "    for _ in range(top_k):\n"
                       "        best = p.max(dim=-1, keepdim=True).values\n"
                       "        i = torch.argmax(p, dim=-1, keepdim=True)\n"
                       "        ws.append(best); idl.append(i)\n"
                       "        p = torch.where(p == best, -1.0, p)\n"
                       "    weights, ids = torch.cat(ws, 1), torch.cat(idl, 1)\n", "EQUAL logits"),
    "no-renormalise": ("return weights / weights.sum(dim=-1, keepdim=True), ids", "return weights, ids", "renormalise"),
}


@pytest.mark.parametrize("name", list(MORE_ROUTE_BUGS))
def test_route_issue10_bug_is_rejected(name):
    old, new, expect = MORE_ROUTE_BUGS[name]
    r = check("01:route_topk", planted_ns("01", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


MORE_LOOP_BUGS = {
    "hard-coded-8-experts": ("for e in range(w1.shape[0]):", "for e in range(8):", "E="),
    "fp32-output": ("return out.to(x.dtype)", "return out", "dtype"),
    "fp16-path": ("h = x[token]\n", "h = x[token].half()\n", ""),
}


@pytest.mark.parametrize("name", list(MORE_LOOP_BUGS))
def test_loop_issue10_bug_is_rejected(name):
    old, new, expect = MORE_LOOP_BUGS[name]
    r = check("01:moe_forward_loop", planted_ns("01", (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


def test_unusual_correct_route_passes():
    # softmax by hand with the max subtracted, top-k with sorted=False
    r = check("01:route_topk", planted_ns("01", (SOFTMAX, "z = logits.float() - logits.float().max(-1, keepdim=True).values\n"
                                                        "    probs = z.exp() / z.exp().sum(-1, keepdim=True)")))
    assert r.passed, str(r)
