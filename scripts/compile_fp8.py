"""Compile chapter 8's fp8 kernels for GPUs on a machine without one: the launches of
``triton_moe.kernels.fp8.example_launches()`` (recorded on meta tensors), for sm_90 (e4m3fn) and gfx942 (e4m3fnuz).

    python scripts/compile_fp8.py [--all] [--targets sm_90,gfx942]

Default: the decode (M=1) launches only; ``--all`` every example launch. Prints one line per compile (registers,
spills, shared memory / LDS, the matrix instruction) and exits 1 on a failure."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import triton  # noqa: E402,F401  (before the flag below is set, as the cross-compile workers do)

import triton_moe  # noqa: E402,F401  (sets TRITON_INTERPRET on this GPU-less machine; undone below)
from triton_moe import crosscompile as cc  # noqa: E402

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fp8_cc_"))
cc._drop_interpreted_modules()
from triton_moe.kernels import fp8  # noqa: E402  (real JITFunctions now)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--targets", default="sm_90,gfx942")
    ap.add_argument("--only", default="", help="compile the launches whose label contains this text")
    args = ap.parse_args()
    failed = 0
    for label, launch in fp8.example_launches():
        if (not args.all and " M=1 " not in label) or args.only not in label:
            continue
        vendor = label.split()[-1]
        with cc.capture_launches(fp8.quantize_act_kernel, fp8.fused_gate_up_fp8_kernel, fp8.down_combine_fp8_kernel,
                                 fp8.moe_sum_kernel) as got:
            launch()
        for t in args.targets.split(","):
            if cc.TARGETS[t].vendor != vendor:
                continue
            for i, lc in enumerate(got):
                spec = cc.spec_from_launch(f"{label} #{i}", lc, vendors=(vendor,))
                r = cc.compile_one(spec, cc.TARGETS[t], "triton_moe.kernels.fp8")
                bad = r.problems()
                failed += bool(bad) or not r.passed
                print(f"{'FAIL' if bad or not r.passed else 'ok  '} {t:7s} {r.kernel:26s} {label} "
                      f"regs={r.registers} shared={r.shared} mi={r.matrix} {'; '.join(bad)}"
                      f"{r.error[:300]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
