"""Every kernel exercise's checker passes the package's own implementation on a GPU (bf16, full model shapes,
guard memory, the issue-10 input families), and the package functions also pass on the CPU where cheap.
GPU run: ``. scripts/gpu_env.sh && python3 -m pytest -q -m gpu tests/test_checkers_gpu.py``."""
import pytest

import triton_moe  # noqa: F401
from triton_moe import baselines
from triton_moe.checking import REGISTRY
from triton_moe.kernels import dispatch, down_combine, fused_gate_up, fused_moe, grouped_gemm, routing

PACKAGE = {
    "01:route_topk": baselines.route_topk,
    "01:moe_forward_loop": baselines.moe_forward_loop,
    "02:topk_softmax": routing.topk_softmax,
    "02:deepseek_v3_route": routing.deepseek_v3_route,
    "02:sorted_dispatch": dispatch.sorted_dispatch,
    "03:grouped_gemm": grouped_gemm.grouped_gemm,
    "04:fused_gate_up": fused_gate_up.fused_gate_up,
    "05:down_combine": down_combine.down_combine,
    "05:fused_experts": fused_moe.fused_experts,
}


@pytest.mark.gpu
@pytest.mark.parametrize("key", list(PACKAGE))
def test_gpu_checker_passes_package_implementation(key):
    import triton_moe.checks  # noqa: F401

    r = REGISTRY[key].run(PACKAGE[key])
    assert r.passed, str(r)
