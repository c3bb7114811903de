"""Chapter 9: the all-to-all, send-plan and combine checkers pass the solution, call the untouched exercise "not
attempted", and reject planted bugs (a wrong send count, tokens to the wrong rank, results returned to the wrong
tokens, the routing weight applied twice, a rank with no tokens) with a message that names them."""
import pytest

from notebook_helpers import check, exercise_ns, planted_ns, solution_ns

A2A, PLAN, COMBINE = "09:all_to_all_lists", "09:send_plan", "09:combine"


@pytest.mark.parametrize("key", [A2A, PLAN, COMBINE])
def test_solution_passes(key):
    r = check(key, solution_ns("09"))
    assert r.passed, str(r)


@pytest.mark.parametrize("key", [A2A, PLAN, COMBINE])
def test_untouched_exercise_is_not_attempted(key):
    r = check(key, exercise_ns("09"))
    assert r.status == "not attempted", str(r)


BUGS = {
    # all_to_all_lists
    "a2a-no-transpose": (A2A, [("torch.cat([chunks[r][d] for r in range(W)])", "torch.cat([chunks[d][r] for r in range(W)])")],
                         "wrong rank"),
    "a2a-reversed-senders": (A2A, [("torch.cat([chunks[r][d] for r in range(W)])",
                                    "torch.cat([chunks[r][d] for r in reversed(range(W))])")], "wrong order"),
    # send_plan
    "wrong-send-count": (PLAN, [("device=flat.device).index_add_(0, flat, torch.ones_like(flat))",
                                 "device=flat.device).index_add_(0, flat.unique(), torch.ones_like(flat.unique()))")], "wrong send count"),
    "round-robin-rank": (PLAN, [("\n    order = torch.sort(flat, stable=True).indices",
                                 "\n    order = torch.sort(flat % world_size * num_experts + flat, stable=True).indices")],
                         "wrong rank"),
    "plan-no-tokens": (PLAN, [("counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)",
                               "counts = torch.zeros(max(num_experts, int(flat.max()) + 1), dtype=torch.long, device=flat.device)")],
                       "no tokens"),
    # combine
    "returned-to-wrong-tokens": (COMBINE, [("\n    y = torch.empty_like(returned).index_copy_(0, order, returned)",
                                            "\n    y = returned[order]")], "wrong tokens"),
    "weight-twice": (COMBINE, [("topk_weights.float()[:, :, None]).sum(dim=1)",
                                "topk_weights.float()[:, :, None] * topk_weights.float()[:, :, None]).sum(dim=1)")],
                     "applied twice"),
    "no-weight": (COMBINE, [("topk_weights.float()[:, :, None]).sum(dim=1)", "1.0).sum(dim=1)")], "WITHOUT the routing weights"),
    "combine-no-tokens": (COMBINE, [("out = (y.view(M, k, H)", "out = (y.view(M, k, -1)")], "no tokens"),
}


@pytest.mark.parametrize("name", list(BUGS))
def test_bug_is_rejected(name):
    key, replace, expect = BUGS[name]
    r = check(key, planted_ns("09", *replace))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


def test_module_cells_show_the_package_source():
    """Until `sync` rewrites cells marked {"triton_moe": {"from": ..., "show": [...]}}, they are written by hand:
    each shown symbol's source must appear in its cell verbatim (one source: the package module)."""
    import importlib
    import inspect

    import nbformat

    from notebook_helpers import notebook

    cells = [c for c in nbformat.read(notebook("solutions", "09"), as_version=4).cells
             if c.cell_type == "code" and "triton_moe" in c.metadata]
    assert len(cells) == 4
    for c in cells:
        mod = importlib.import_module(c.metadata["triton_moe"]["from"])
        for name in c.metadata["triton_moe"]["show"]:
            assert inspect.getsource(getattr(mod, name)).rstrip("\n") in c.source, name
