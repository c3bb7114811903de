"""Compile chapter 8's fp8 kernels for GPUs on a machine without one: the launches of
``triton_moe.kernels.fp8.example_launches()`` as sm_90 (e4m3fn) and gfx942 (e4m3fnuz) make them, with the
compile-check tool (the same as ``python -m triton_moe.tools.crosscompile --source
triton_moe.kernels.fp8:example_launches --targets sm_90,gfx942``).

    python scripts/compile_fp8.py [--targets sm_90,gfx942] [--report PATH]

Prints one line per compile (registers, spills, shared memory / LDS, the matrix instruction) and exits 1 on a
failure."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from triton_moe.tools.crosscompile import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--targets" not in args:
        args += ["--targets", "sm_90,gfx942"]
    sys.exit(main(["--source", "triton_moe.kernels.fp8:example_launches", *args]))
