"""Chapter 7's before/after, re-measured: every version of ``fused_moe`` (``triton_moe.kernels.versions``) on
the same inputs, in the same run, as a fraction of the floor measured in that run. GPU only:

    PYTHONPATH=. python benchmarks/ch07_versions.py [--versions v1,v2,v4,final] [--models mixtral,qwen3]
                                                    [--M 1,16,256,4096]

Writes ``results/<device>/ch07_versions.csv`` (copied under ``$OUT`` when set). Each time is the median of
CUDA-graph replays of 4 forwards on different input sets (different tokens: no set sits in L2), divided by 4;
the floor counts the experts those sets really activate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from triton_moe import mode  # noqa: E402
from triton_moe.kernels.versions import VERSIONS, get  # noqa: E402
from triton_moe.reference import make_problem, moe_reference  # noqa: E402
from triton_moe.shapes import MODELS  # noqa: E402
from triton_moe.timing import bench_ms, make_row, results_path, start_run, write_rows  # noqa: E402

ROTATE = 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", default=",".join(VERSIONS))
    ap.add_argument("--models", default="mixtral,qwen3,deepseek_v3")
    ap.add_argument("--M", default="1,16,256,4096")
    a = ap.parse_args(argv)
    mode.require_gpu("This benchmark")
    meta, ceilings = start_run()
    dtype, rows = torch.bfloat16, []
    for key in a.models.split(","):
        shape = MODELS[key]
        base = make_problem(shape, 1, dtype, "cuda", seed=1234)
        for M in (int(m) for m in a.M.split(",")):
            sets = [make_problem(shape.scaled(shape.hidden, 16), M, dtype, "cuda", seed=1000 * M + i) for i in range(ROTATE)]
            active = sum(p.topk_ids.unique().numel() for p in sets) / ROTATE
            ref = moe_reference(sets[0].x, sets[0].topk_weights, sets[0].topk_ids, base.w1, base.w3, base.w2)
            line = [f"{shape.name:22s} M={M:5d}"]
            for name in a.versions.split(","):
                fn = get(name)
                # router logits that reproduce each set's routing (Mixtral-style softmax top-k)
                one = lambda p: fn(p.x, p.logits, base.w1, base.w3, base.w2, shape.top_k)  # noqa: E731
                got = one(sets[0])
                err = float((got.double() - moe_reference(sets[0].x, *_route(sets[0], shape.top_k), base.w1, base.w3,
                                                          base.w2)).norm() / ref.norm())
                if err > 2e-2:
                    line.append(f"{name} WRONG ({err:.1e})")
                    continue
                ms, method = bench_ms(lambda: [one(p) for p in sets], graph=True, rep=50)
                row = make_row(meta, ceilings, shape, M, f"fused_moe {name}", ms / ROTATE,
                               f"{method}, {ROTATE} input sets per call", dtype, "uniform", active_experts=round(active))
                rows.append(row)
                line.append(f"{name} {row['median_ms']:.4f} ms ({row['floor_fraction']:.2f})")
            print(" | ".join(line), flush=True)
    write_rows(rows, results_path("ch07_versions"))
    return 0


def _route(p, top_k):
    from triton_moe.reference import route_reference

    w, ids = route_reference(p.logits, top_k)
    return w.float(), ids


if __name__ == "__main__":
    sys.exit(main())
