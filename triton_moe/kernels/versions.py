"""Chapter 7's kernel versions, runnable side by side (llm.c style): ``fused_moe`` as it was after each lever.

    from triton_moe.kernels.versions import VERSIONS, get
    out = get("v1")(x, router_logits, w1, w3, w2, top_k)       # same signature as fused_moe

Every version runs today's kernels; what differs is exactly the lever that chapter 7 measures, so the
before/after can be re-measured on any GPU with one command (``benchmarks/ch07_versions.py``). The versions
are rebuilt from those levers, not the historical code: a row of ``docs/perf-notes.md`` and a re-run of its
version measure the same lever, on the same kernels as today.

- ``v1``  portable configs (the table a GPU nobody tuned runs), 9 launches (router, 4-kernel dispatch,
  zeroing, gate+up, down, cast);
- ``v2``  tuned tables with GROUP_M = 1 (each row block of a hot expert re-reads its weight tile from memory);
- ``v4``  tuned tables (GROUP_M 8, skew-aware), still 9 launches at decode;
- ``final`` today's ``fused_moe``: v4 plus the one-launch route + dispatch + zeroing at decode (4 launches).
"""
from __future__ import annotations

import dataclasses

from ..target import current, simulate
from .down_combine import down_combine
from .fused_gate_up import fused_gate_up, pick_config, with_block_m
from .fused_moe import dispatch, fused_moe, route


def _layer(x, router_logits, w1, w3, w2, top_k, *, portable=False, group_m=None):
    """The 9-launch forward (no decode fusion) with the config lever of a version."""
    M, H = x.shape
    E, F, _ = w1.shape
    t = current()
    # portable: choose as a GPU of this vendor for which no tuned table is committed would (sm_80 on NVIDIA)
    with simulate(dataclasses.replace(t, arch="sm_80", device="")) if portable and t.vendor == "nvidia" else _nothing():
        cfg_up = pick_config("fused_gate_up", M, H, F, E, top_k)
        cfg_down = pick_config("down_combine", M, H, F, E, top_k)
    if group_m is not None:
        cfg_up = dataclasses.replace(cfg_up, GROUP_M=group_m)
        cfg_down = dataclasses.replace(cfg_down, GROUP_M=group_m)
    cfg_down = with_block_m(cfg_down, cfg_up.BLOCK_M)
    topk_weights, topk_ids = route(router_logits, top_k)
    d = dispatch(topk_ids, E, cfg_up.BLOCK_M)
    h = fused_gate_up(x, w1, w3, *d, top_k, cfg_up)
    return down_combine(h, w2, topk_weights, *d, False, cfg_down)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


VERSIONS = {
    "v1": lambda x, lg, w1, w3, w2, k: _layer(x, lg, w1, w3, w2, k, portable=True),
    "v2": lambda x, lg, w1, w3, w2, k: _layer(x, lg, w1, w3, w2, k, group_m=1),
    "v4": lambda x, lg, w1, w3, w2, k: _layer(x, lg, w1, w3, w2, k),
    "final": lambda x, lg, w1, w3, w2, k: fused_moe(x, lg, w1, w3, w2, k),
}


def get(name: str):
    """The forward of version ``name`` (``fused_moe``'s signature: x, router_logits, w1, w3, w2, top_k)."""
    if name not in VERSIONS:
        raise ValueError(f"version must be one of {list(VERSIONS)}, got {name!r}")
    return VERSIONS[name]
