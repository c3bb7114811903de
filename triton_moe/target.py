"""Which machine the kernels run on: detected once, from Triton's active target.

Everything that depends on the GPU (config tables, warps per launch, shared-memory limits) asks
:func:`current` and nothing else, so no module tests ``torch.version.hip`` or device names on its own, and the
compile check can ask "what would a gfx942 launch choose?" with :func:`simulate` instead of patching modules.

- ``vendor``: ``"nvidia"``, ``"amd"`` or ``"cpu"`` (Triton's interpreter);
- ``arch``: the compile target as the compile check names it (``"sm_90"``, ``"sm_80"``, ``"gfx942"``), ``""`` on
  the CPU;
- ``device``: the device-name slug of the GPU (``"nvidia-h200"``), which names its own tuned tables; ``""``
  when simulated or on the CPU.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    vendor: str        # "nvidia", "amd" or "cpu"
    arch: str = ""     # "sm_90", "gfx942", ... ("" on the CPU)
    device: str = ""   # slug of the GPU's name, e.g. "nvidia-h100-80gb-hbm3" ("" if unknown or simulated)

    @property
    def sm(self) -> int:
        """NVIDIA compute capability as an int (90 for sm_90, 0 elsewhere)."""
        m = re.match(r"sm_(\d+)", self.arch)
        return int(m.group(1)) if m else 0

    @property
    def on_gpu(self) -> bool:
        return self.vendor != "cpu"


CPU = Target("cpu")
_simulated: list[Target] = []


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (table and results folder names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def _detect() -> Target:
    from . import mode

    if not mode.ON_GPU:
        return CPU
    import torch
    import triton

    try:
        t = triton.runtime.driver.active.get_current_target()
        backend, arch = t.backend, t.arch
    except Exception:  # noqa: BLE001  (a driver that cannot say: fall back on torch's build)
        backend = "hip" if getattr(torch.version, "hip", None) else "cuda"
        if backend == "cuda":
            major, minor = torch.cuda.get_device_capability()  # rocm-ok: CUDA branch
            arch = 10 * major + minor
        else:
            arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
    name = torch.cuda.get_device_name(0).strip()   # torch.cuda answers on ROCm too
    if backend == "hip":
        gfx = str(arch).split(":")[0]
        # some ROCm builds report an empty name: the architecture stands in
        return Target("amd", gfx, slug(name or getattr(torch.cuda.get_device_properties(0), "gcnArchName", gfx)))
    return Target("nvidia", f"sm_{arch}", slug(name))


def current() -> Target:
    """The target launches are made for: the simulated one inside :func:`simulate`, else this machine's."""
    return _simulated[-1] if _simulated else _detect()


def parse(target: Target | str) -> Target:
    """``"sm_90"``, ``"gfx942"`` or ``"cpu"`` -> a :class:`Target` (no device: no device tables)."""
    if isinstance(target, Target):
        return target
    if target == "cpu":
        return CPU
    if target.startswith("sm_"):
        return Target("nvidia", target)
    if target.startswith("gfx"):
        return Target("amd", target)
    raise ValueError(f"target must be 'cpu', 'sm_NN' or 'gfxNNN', got {target!r}")


@contextlib.contextmanager
def simulate(target: Target | str):
    """Inside the block, host wrappers choose configs, warps and tile sizes as a launch on ``target`` would
    (the compile check records such launches on meta tensors). Nothing else changes: the kernels are not
    recompiled and no device is touched."""
    _simulated.append(parse(target))
    try:
        yield _simulated[-1]
    finally:
        _simulated.pop()
