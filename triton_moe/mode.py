"""CPU or GPU: one place decides, before any Triton kernel is defined.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, so this module must be imported
before any module or notebook cell that defines a kernel. ``import triton_moe`` does that.

- With a CUDA or ROCm GPU visible to PyTorch: real kernels, bf16, full model shapes.
- Without one: ``TRITON_INTERPRET=1`` (Triton's interpreter runs kernels with numpy on the
  CPU), small shapes, fp32/fp16 inputs.

Override with ``TRITON_MOE_MODE=cpu`` or ``TRITON_MOE_MODE=gpu``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def _gpu_visible() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard requirement
        return False
    return bool(torch.cuda.is_available())


def _decide() -> str:
    forced = os.environ.get("TRITON_MOE_MODE", "").strip().lower()
    if forced in ("cpu", "gpu"):
        return forced
    if forced:
        raise ValueError(f"TRITON_MOE_MODE must be 'cpu' or 'gpu', got {forced!r}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "gpu" if _gpu_visible() else "cpu"


MODE: str = _decide()
ON_GPU: bool = MODE == "gpu"

if not ON_GPU:
    # Must happen before triton.jit decorates anything.
    os.environ["TRITON_INTERPRET"] = "1"


@dataclass(frozen=True)
class ModeInfo:
    mode: str            # "gpu" or "cpu"
    device: str          # torch device string: "cuda" (also on ROCm) or "cpu"
    vendor: str          # "nvidia", "amd" or "cpu"
    device_name: str     # e.g. "NVIDIA H100 80GB HBM3" or "cpu (Triton interpreter)"
    dtype_name: str      # the dtype the course uses in this mode
    torch_version: str
    triton_version: str
    runtime_version: str  # CUDA or HIP version, "" on CPU


def info() -> ModeInfo:
    import torch
    import triton

    if ON_GPU:
        hip = getattr(torch.version, "hip", None)
        vendor = "amd" if hip else "nvidia"
        name = torch.cuda.get_device_name(0)
        runtime = f"hip {hip}" if hip else f"cuda {torch.version.cuda}"
        dtype_name = "bfloat16"
    else:
        vendor, name, runtime, dtype_name = "cpu", "cpu (Triton interpreter)", "", "float32"
    return ModeInfo(MODE, "cuda" if ON_GPU else "cpu", vendor, name, dtype_name,
                    torch.__version__, triton.__version__, runtime)


def device() -> str:
    """Torch device string for this mode (ROCm PyTorch also calls its GPUs 'cuda')."""
    return "cuda" if ON_GPU else "cpu"


def default_dtype():
    """bf16 on a GPU; fp32 on the CPU, where the interpreter's bf16 ``tl.dot`` is broken."""
    import torch

    return torch.bfloat16 if ON_GPU else torch.float32


def require_gpu(what: str) -> None:
    """Raise a clear error for GPU-only steps (timings, CUDA graphs)."""
    if not ON_GPU:
        raise RuntimeError(
            f"{what} needs a GPU (CUDA or ROCm); this machine runs in CPU mode through Triton's "
            "interpreter. The notebooks show the committed results from results/ instead.")


def check_interpreter_dtype(name: str, dtype) -> None:
    """Refuse bf16 matrix inputs in interpreter mode: ``tl.dot`` on bf16 silently returns garbage there
    (triton issue 11584). fp16 and fp32 are fine."""
    import torch

    if not ON_GPU and dtype == torch.bfloat16:
        raise ValueError(
            f"{name}: bfloat16 is not supported in CPU mode (Triton's interpreter computes tl.dot on "
            "bf16 wrongly, silently). Use float16 or float32 on the CPU; bf16 runs on a GPU.")
