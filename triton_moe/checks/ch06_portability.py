"""Chapter 6 checkers: choose a launch config that fits an MI300X (gfx942), proved by compiling it for gfx942 on
this machine, and predict the LDS a config needs from the compile report's numbers.

Neither needs a GPU. The compile runs in a worker process (see :mod:`triton_moe.tools.crosscompile`): a few
seconds, most of it importing torch and Triton there.
"""
from __future__ import annotations

import json

from ..checking import CheckFailure, exercise
from ..configs import KernelConfig
from ..tools.crosscompile import TARGETS, error_summary, run_check
from ..vendor import AMD_ONLY_OPTIONS

LDS_LIMIT = TARGETS["gfx942"].shared_limit
MIN_TILE = (64, 64, 32)  # BLOCK_M, BLOCK_N, BLOCK_K: smaller tiles starve the MFMA units at M = 4096
ALLOWED_OPTIONS = {"waves_per_eu": (0, 1, 2, 3, 4, 5, 6, 7, 8), "matrix_instr_nonkdim": (0, 16, 32), "kpack": (1, 2)}


def compile_for(cfg: KernelConfig, targets=("gfx942",), dtype: str = "bf16"):
    """Compile ``portability_demo.tiled_matmul_kernel`` in ``cfg`` for ``targets``; returns the results."""
    kwargs = {"BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "GROUP_M": cfg.GROUP_M,
              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "extra": dict(cfg.extra), "dtype": dtype}
    source = "triton_moe.kernels.portability_demo:specs_for_config|" + json.dumps(kwargs)
    results, errors = run_check([source], list(targets), jobs=1, timeout=300)
    bad = [e for e in errors if not e.startswith("note:")]
    if bad or not results:
        raise CheckFailure(f"the compile for {', '.join(targets)} did not run: {(bad or ['no result'])[0][:300]}")
    return results


def _pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def validate_config(cfg) -> KernelConfig:
    if not isinstance(cfg, KernelConfig):
        raise CheckFailure(f"choose_gfx942_config() returned a {type(cfg).__name__}, expected a KernelConfig",
                           hint="return KernelConfig(BLOCK_M=..., BLOCK_N=..., BLOCK_K=..., num_warps=..., "
                                "num_stages=..., extra={...})")
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = getattr(cfg, name)
        if not _pow2(v) or not 16 <= v <= 256:
            raise CheckFailure(f"{name}={v!r}: tile sizes must be powers of two from 16 to 256",
                               hint="tl.arange needs power-of-two sizes")
    if not _pow2(cfg.num_warps) or cfg.num_warps > 16:
        raise CheckFailure(f"num_warps={cfg.num_warps!r}: use 1, 2, 4, 8 or 16 (on AMD each is a 64-lane wavefront)")
    if not isinstance(cfg.num_stages, int) or not 1 <= cfg.num_stages <= 4:
        raise CheckFailure(f"num_stages={cfg.num_stages!r}: use 1 to 4")
    if not _pow2(cfg.GROUP_M) or cfg.GROUP_M > 64:
        raise CheckFailure(f"GROUP_M={cfg.GROUP_M!r}: use a power of two up to 64")
    for k, v in cfg.extra.items():
        if k not in ALLOWED_OPTIONS:
            raise CheckFailure(f"extra option {k!r} is not an AMD compiler option this course uses",
                               hint=f"AMD options: {', '.join(AMD_ONLY_OPTIONS)}")
        if v not in ALLOWED_OPTIONS[k]:
            raise CheckFailure(f"{k}={v!r}: allowed values are {ALLOWED_OPTIONS[k]}")
    tile = (cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K)
    if any(t < m for t, m in zip(tile, MIN_TILE)):
        raise CheckFailure(
            f"a {cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} tile is too small for M = 4096: it fits, but every "
            "program reloads its operands for a few MFMA instructions and the GPU is bound by loads",
            hint="keep at least a 64x64 output tile and BLOCK_K >= 32; fit the LDS with num_stages instead")
    return cfg


@exercise("06", "choose_gfx942_config", points=2,
          hint="start from the NVIDIA table's large-M config and read its gfx942 row in the compile report: "
               "which knob multiplies the LDS? AMD's Triton pipeliner needs only 2 stages")
def check_choose_gfx942_config(fn, seed):
    cfg = validate_config(fn())
    r = compile_for(cfg)[0]
    name = f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}, {cfg.num_warps} warps, {cfg.num_stages} stages"
    if not r.ok:
        raise CheckFailure(f"{name} does not compile for gfx942: {error_summary(r.error)}")
    if r.shared > LDS_LIMIT:
        raise CheckFailure(
            f"{name} needs {r.shared} B of LDS on gfx942, more than the {LDS_LIMIT} B (64 KB) a workgroup has: "
            f"it would fail to launch on an MI300X (it fits an H100 block's 227 KB)",
            hint="lower num_stages (AMD's pipeliner needs 2) or BLOCK_K: every stage in flight holds an A tile "
                 "and a W tile in LDS")
    if r.vgpr_spill or r.sgpr_spill:
        acc = cfg.BLOCK_M * cfg.BLOCK_N // (cfg.num_warps * 64)
        raise CheckFailure(
            f"{name} spills on gfx942 ({r.vgpr_spill} VGPRs, {r.sgpr_spill} SGPRs to scratch / VGPR lanes; "
            f"{r.registers} VGPRs per lane used of 512): the fp32 accumulator alone is {acc} registers per lane",
            hint="spread the accumulator over more wavefronts (num_warps) or shrink BLOCK_M x BLOCK_N")
    return [f"gfx942: {r.shared} B of LDS ({100 * r.shared / LDS_LIMIT:.0f}% of 64 KB), {r.registers} VGPRs per lane "
            f"({r.agpr} accumulation), no spills, {r.matrix or 'no MFMA'}, {r.occupancy or '?'} waves per SIMD"]


# LDS bytes that Triton 3.6.0 reported (metadata.shared) for portability_demo.tiled_matmul_kernel on gfx942:
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages) -> bytes for bf16 (elem_bytes 2), from the cross-compile runs behind
# docs/compile-report.md, and (..., elem_bytes) -> bytes for other element sizes and for num_stages = 1,
# compiled with triton_moe.crosscompile on 2026-12-02 (fp8e4b8 = 1 byte, fp16 = 2, fp32 = 4). The rule they
# follow: num_stages >= 2 keeps num_stages - 1 buffers of BOTH tiles, A (BLOCK_M x BLOCK_K) and W (BLOCK_K x
# BLOCK_N); num_stages = 1 (no pipelining) stages one operand at a time through one buffer, the larger tile.
OBSERVED_GFX942_LDS = {
    (64, 64, 32, 2): 8192, (64, 64, 32, 3): 16384, (64, 64, 32, 4): 24576, (64, 64, 64, 2): 16384,
    (64, 64, 64, 3): 32768, (64, 64, 64, 4): 49152, (128, 128, 32, 2): 16384, (128, 128, 32, 4): 49152,
    (128, 128, 64, 2): 32768, (128, 128, 64, 3): 65536, (128, 128, 64, 4): 98304, (16, 128, 128, 2): 36864,
    (16, 128, 128, 3): 73728, (32, 64, 64, 2): 12288, (32, 64, 64, 4): 36864, (64, 256, 64, 2): 40960,
    (64, 256, 64, 3): 81920, (64, 128, 64, 2): 24576, (64, 128, 64, 4): 73728, (128, 64, 128, 2): 49152,
    (64, 64, 128, 3): 65536, (16, 64, 64, 2): 10240, (128, 256, 64, 4): 147456,
    # num_stages = 1
    (64, 64, 32, 1): 4096, (128, 128, 64, 1): 16384, (64, 128, 32, 1): 8192, (128, 64, 32, 1): 8192,
    (16, 128, 128, 1): 32768, (32, 64, 64, 1): 8192, (128, 256, 64, 1): 32768, (64, 256, 64, 1): 32768,
    (128, 64, 64, 1): 16384,
}
OBSERVED_GFX942_LDS_BY_SIZE = {   # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, elem_bytes) -> bytes
    (128, 64, 32, 3, 4): 49152, (64, 128, 32, 1, 4): 16384, (64, 128, 32, 2, 4): 24576, (64, 64, 32, 1, 4): 8192,
    (64, 128, 64, 1, 1): 8192, (64, 128, 64, 2, 1): 12288,
}


def gfx942_lds_reference(bm: int, bn: int, bk: int, num_stages: int, elem_bytes: int = 2) -> int:
    """The rule every observed row follows (see the tables above)."""
    if num_stages <= 1:
        return max(bm, bn) * bk * elem_bytes
    return (num_stages - 1) * (bm + bn) * bk * elem_bytes


@exercise("06", "gfx942_lds_bytes", points=1,
          hint="per buffer, A (BLOCK_M x BLOCK_K) and W (BLOCK_K x BLOCK_N), elem_bytes each; count the buffers from "
               "the report: how does LDS change from num_stages=1 to 2 to 3 to 4?")
def check_gfx942_lds_bytes(fn, seed):
    table = {k + (2,): v for k, v in OBSERVED_GFX942_LDS.items()}
    table.update(OBSERVED_GFX942_LDS_BY_SIZE)
    got = {}
    for key in table:
        bm, bn, bk, s, eb = key
        v = fn(KernelConfig(bm, bn, bk, 8, 4, s), eb)
        if not isinstance(v, int) or isinstance(v, bool):
            raise CheckFailure(f"gfx942_lds_bytes returned a {type(v).__name__}, expected an int (bytes)")
        got[key] = v
    wrong = [k for k, want in table.items() if got[k] != want]
    if not wrong:
        return [f"{len(table)} configs (num_stages 1-4, elem_bytes 1, 2, 4) match the compiler's LDS bytes on gfx942"]
    stage1 = [k for k in wrong if k[3] == 1]
    first = next((k for k in wrong if k[3] > 1 and k[4] == 2), wrong[0])
    bm, bn, bk, s, eb = first
    msg = (f"{len(wrong)} of {len(table)} configs wrong; e.g. {bm}x{bn}x{bk} with num_stages={s}, elem_bytes={eb}: "
           f"you predict {got[first]} B, the compiler reported {table[first]} B on gfx942")
    # Which usual mistake reproduces every answer (at num_stages >= 2, elem_bytes 2 unless it is about elem_bytes)?
    multi = [k for k in table if k[3] > 1]
    buffers = lambda s: max(1, s - 1)  # noqa: E731
    mistakes = [
        (lambda bm, bn, bk, s, eb: s * (bm + bn) * bk * eb,
         "you count num_stages buffers, as sm_90 (Hopper) does in the report; on gfx942 (and sm_80) LDS holds "
         "num_stages - 1 of them"),
        (lambda bm, bn, bk, s, eb: buffers(s) * (bm + bn) * bk, "bytes, not elements: multiply by elem_bytes"),
        (lambda bm, bn, bk, s, eb: buffers(s) * (bm + bn) * bk * 2,
         "elem_bytes is ignored: the report's rows are bf16 (2 bytes), the function must scale with its elem_bytes "
         "argument (1 for fp8, 4 for fp32)"),
        (lambda bm, bn, bk, s, eb: buffers(s) * bm * bk * eb,
         "both operand tiles are staged in LDS: A (BLOCK_M x BLOCK_K) and W (BLOCK_K x BLOCK_N)"),
        (lambda bm, bn, bk, s, eb: buffers(s) * bn * bk * eb,
         "both operand tiles are staged in LDS: A (BLOCK_M x BLOCK_K) and W (BLOCK_K x BLOCK_N)"),
    ]
    hint = next((h for f, h in mistakes if all(got[k] == f(*k) for k in multi)), "")
    if not hint and set(wrong) <= set(stage1):
        k1 = stage1[0]
        msg = (f"num_stages=1 is wrong ({len(stage1)} configs); e.g. {k1[0]}x{k1[1]}x{k1[2]}, elem_bytes={k1[4]}: you "
               f"predict {got[k1]} B, the compiler reported {table[k1]} B (every num_stages >= 2 row is right)")
        hint = ("without pipelining (num_stages=1) the compiler does not keep both tiles: compare the num_stages=1 rows "
                "with BLOCK_M x BLOCK_K and BLOCK_K x BLOCK_N")
    raise CheckFailure(msg, hint)
