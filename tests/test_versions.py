"""Chapter 7's versions of fused_moe run side by side and compute the same layer (benchmarks/ch07_versions.py
times them on a GPU)."""
import pytest
import torch

import triton_moe  # noqa: F401
from triton_moe.checking import relative_error, tolerance
from triton_moe.kernels.versions import VERSIONS, get
from triton_moe.mode import ON_GPU, device
from triton_moe.reference import make_problem, moe_reference, route_reference
from triton_moe.shapes import CPU_SHAPES


@pytest.mark.parametrize("name", list(VERSIONS))
def test_every_version_computes_the_layer(name):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    shape = CPU_SHAPES["qwen3"]
    p = make_problem(shape, 5, dtype, device(), seed=7)
    w, ids = route_reference(p.logits, shape.top_k)
    ref = moe_reference(p.x, w.float(), ids, p.w1, p.w3, p.w2)
    out = get(name)(p.x, p.logits, p.w1, p.w3, p.w2, shape.top_k)
    assert out.shape == p.x.shape and out.dtype == dtype
    assert relative_error(out, ref) <= (2e-2 if ON_GPU else tolerance(dtype))


def test_unknown_version_is_refused():
    with pytest.raises(ValueError, match="version must be one of"):
        get("v9")
