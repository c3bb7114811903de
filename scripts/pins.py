"""Which pinned set each platform installs, and whether the pinned wheels' declared requirements agree with it.

One source for ``./course`` (it installs ``requirements(platform)``) and ``tests/test_pins_resolve.py`` (it
checks that set against the wheels' ``Requires-Dist``). Standard library only for the part ``./course`` runs
(a fresh venv has nothing else); :func:`conflicts` needs ``packaging`` (pytest brings it).

    python scripts/pins.py linux-amd        # the requirement lines ./course installs on an AMD machine
    python scripts/pins.py --rocm-index     # the ROCm index ./course uses on AMD without TORCH_INDEX_URL

Platforms: ``linux-cpu`` (PyTorch's CPU build, no GPU), ``linux-nvidia`` (PyPI's torch: the CUDA build),
``linux-amd`` (PyTorch's ROCm build from ``TORCH_INDEX_URL``, default :data:`ROCM_INDEX`).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
PLATFORMS = ("linux-cpu", "linux-nvidia", "linux-amd")
# PyTorch's ROCm index for the pinned torch (torch 2.13.0 is published as 2.13.0+rocm7.2 there). A ROCm torch
# wheel requires pytorch-triton-rocm, which installs the same `triton` module as the `triton` distribution:
# the AMD set leaves the `triton` pin out (both installed, the last one unpacked wins, and pip reports neither).
ROCM_INDEX = "https://download.pytorch.org/whl/rocm7.2"
# Distributions that install the same top-level module: at most one of each group may be in an environment.
SAME_MODULE = {"triton": ("triton", "pytorch-triton-rocm")}
# The environment markers are evaluated for (the GPU machine's Python; the wheels' metadata is the same for
# every cp3xx build of one release).
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
              "sys_platform": "linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def pinned(path: Path = REQUIREMENTS) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line (names lower-case, ``_`` as ``-``)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def requirements(platform: str, path: Path = REQUIREMENTS) -> list[str]:
    """The requirement lines ``./course`` installs on ``platform``: requirements.txt, on AMD without the
    ``triton`` line (the ROCm torch wheel brings pytorch-triton-rocm instead)."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    lines = [ln.split("#", 1)[0].strip() for ln in Path(path).read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if platform == "linux-amd":
        lines = [ln for ln in lines if canonical(ln.split("==")[0]) != "triton"]
    return lines


def pinned_for(platform: str, path: Path = REQUIREMENTS) -> dict[str, str]:
    """``name -> version`` of the set installed on ``platform``."""
    return {canonical(ln.split("==")[0]): ln.split("==", 1)[1].strip() for ln in requirements(platform, path)
            if "==" in ln}


def conflicts(pins: dict[str, str], declared: dict[str, list[str]], env: dict | None = None) -> list[str]:
    """Every disagreement between a pinned set and the requirements its wheels declare, one line each.

    ``pins``: name -> pinned version (the whole set one platform installs). ``declared``: name -> the
    ``Requires-Dist`` lines of that pinned wheel on that platform. A requirement (markers evaluated for
    :data:`MARKER_ENV`) that names another pinned distribution must admit its pinned version; two
    distributions installing the same module (:data:`SAME_MODULE`) must not both be pinned or required."""
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.version import Version

    env = {**MARKER_ENV, **(env or {})}
    pins = {canonical(k): v for k, v in pins.items()}
    out = []
    installed = {name: f"pinned {name}=={v}" for name, v in pins.items()}
    for owner, lines in declared.items():
        owner = canonical(owner)
        if owner not in pins:
            continue
        for line in lines:
            req = Requirement(line)
            if req.marker is not None and not Marker(str(req.marker)).evaluate(env):
                continue
            name = canonical(req.name)
            installed.setdefault(name, f"{owner}=={pins[owner]} requires {req}")
            if name in pins and not req.specifier.contains(Version(pins[name]), prereleases=True):
                out.append(f"{owner}=={pins[owner]} requires {req.name}{req.specifier}, but {name}=={pins[name]} "
                           "is pinned")
    for module, dists in SAME_MODULE.items():
        present = [d for d in dists if d in installed]
        if len(present) > 1:
            out.append(f"both {' and '.join(present)} would install the `{module}` module ("
                       + "; ".join(installed[d] for d in present) + ")")
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--rocm-index"]:
        print(ROCM_INDEX)
    elif len(sys.argv) == 2 and sys.argv[1] in PLATFORMS:
        print("\n".join(requirements(sys.argv[1])))
    else:
        sys.exit(f"usage: python scripts/pins.py {{{','.join(PLATFORMS)}}} | --rocm-index")
