"""The cross-compilation check (chapter 6): parsers, verdicts and report on recorded compiler output (fast),
then real compiles proving the check fails on a planted spill, a planted LDS overflow and a planted compile
error, and passes on every kernel of the course (the CI hook, ``test_all_kernels_cross_compile``)."""
import json
import subprocess
import sys
import time

import pytest

import triton_moe  # noqa: F401
from triton_moe import crosscompile as cc
from triton_moe.crosscompile import CompileResult, CompileSpec

# --------------------------------------------------------------------------------------------------
# Recorded compiler output (triton 3.6.0, tiled_matmul 128x128x64 bf16, 4 warps)

PTXAS_SPILL = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mm' for 'sm_90a'
ptxas info    : Function properties for mm
    312 bytes stack frame, 320 bytes spill stores, 312 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 312 bytes cumulative stack size
ptxas info    : Compile time = 301.211 ms
"""
CUOBJDUMP = """Resource usage:
 Common:
  GLOBAL:0
 Function mm:
  REG:255 STACK:312 SHARED:1024 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
AMDGCN = """\t\t.amdhsa_next_free_vgpr 512
\t\t.amdhsa_accum_offset 256
\tv_mfma_f32_32x32x8_bf16 a[0:15], v[2:3], v[4:5], a[0:15]
\tv_mfma_f32_32x32x8_bf16 a[16:31], v[2:3], v[6:7], a[16:31]
; NumVgprs: 256
; NumAgprs: 256
; TotalNumVgprs: 512
; ScratchSize: 184
; LDSByteSize: 0 bytes/workgroup (compile time only)
; Occupancy: 1
    .group_segment_fixed_size: 0
    .private_segment_fixed_size: 184
    .sgpr_count:     104
    .sgpr_spill_count: 0
    .vgpr_count:     512
    .vgpr_spill_count: 45
"""


def test_parse_ptxas_and_cuobjdump():
    assert cc.parse_ptxas(PTXAS_SPILL) == {"registers": 255, "stack": 312, "spill_stores": 320, "spill_loads": 312}
    assert cc.parse_cuobjdump(CUOBJDUMP) == {"registers": 255, "stack": 312, "static_shared": 1024, "local": 0}
    assert cc.parse_ptxas("garbage") == {}


def test_parse_amdgcn():
    info = cc.parse_amdgcn(AMDGCN)
    assert info == {"vgpr_count": 512, "agpr_count": 256, "sgpr_count": 104, "vgpr_spill_count": 45,
                    "sgpr_spill_count": 0, "arch_vgpr_count": 256, "occupancy": 1, "scratch": 184}
    # An LLVM that writes .agpr_count in the metadata: that one wins over the comment.
    assert cc.parse_amdgcn(AMDGCN + "    .agpr_count:     200\n")["agpr_count"] == 200


def test_matrix_instruction_and_error_summary():
    assert cc.matrix_instruction("wgmma.mma_async.sync.aligned.m64n128k16", "nvidia") == "wgmma"
    assert cc.matrix_instruction("mma.sync.aligned.m16n8k16.row.col", "nvidia") == "mma.sync"
    assert cc.matrix_instruction("fma.rn.f32", "nvidia") == ""
    assert cc.matrix_instruction(AMDGCN, "amd") == "v_mfma_f32_32x32x8_bf16"
    err = "CompilationError: at 25:14:\n    acc = tl.dot(a, w, acc)\n              ^\nInput shapes should have K >= 16"
    assert cc.error_summary(err) == "Input shapes should have K >= 16 (CompilationError: at 25:14)"
    assert cc.error_summary("") == "unknown"


def _result(target="sm_90", **kw):
    base = dict(spec="k[cfg] bf16", kernel="k_kernel", module="triton_moe.kernels.k", target=target, ok=True,
                shared=32768, shared_limit=cc.TARGETS[target].shared_limit, registers=128)
    return CompileResult(**{**base, **kw})


def test_verdicts():
    assert _result().passed
    assert _result(spill_bytes=16).problems() == ["spills 16 B of registers"]
    assert _result(stack=64, spill_bytes=-1).problems() == ["64 B stack frame (spills?)"]
    assert _result("gfx942", sgpr_spill=10).problems() == ["spills 10 SGPRs"]
    assert _result("gfx942", vgpr_spill=45).problems() == ["spills 45 VGPRs"]
    over = _result("gfx942", shared=98304).problems()
    assert len(over) == 1 and "98304 B of LDS" in over[0] and "65536" in over[0]
    assert _result("sm_90", shared=98304).passed  # 96 KB fits a Hopper block
    assert "167936 B of shared memory" in _result("sm_80", shared=167936).problems()[0]
    bad = _result(ok=False, error="CompilationError: at 1:2:\nx\nK >= 16")
    assert bad.problems() == ["compile error: K >= 16 (CompilationError: at 1:2)"]


def test_failures_ignore_lessons_and_notes():
    rs = [_result(spill_bytes=8), _result(spill_bytes=8, lesson=True), _result()]
    errs = ["note: triton_moe.kernels.x has no compile_specs()", "triton_moe.kernels.y: ImportError: boom"]
    assert cc.failures(rs, errs) == ["triton_moe.kernels.y: ImportError: boom",
                                     "k[cfg] bf16 on sm_90: spills 8 B of registers"]


def test_report_has_a_table_per_kernel_and_target():
    rs = [_result(t) for t in cc.TARGETS] + [_result("gfx942", kernel="other_kernel", shared=98304)]
    rs += [_result("gfx942", spec="k[lesson] bf16", vgpr_spill=3, lesson=True)]
    text = cc.format_report(rs, ["note: triton_moe.kernels.z has no compile_specs()"])
    assert "verdict: **FAIL** (1 problems)" in text
    assert text.count("\n## `k_kernel`") == 1 and "\n## `other_kernel`" in text
    for t in cc.TARGETS:
        assert f"**{t}**" in text
    assert "Lessons: configs expected to fail" in text and "### `k_kernel`" in text
    assert "triton_moe.kernels.z has no compile_specs()" in text
    assert "overflow: needs 98304 B of LDS" in text


def test_ci_subset_keeps_bf16_and_the_largest_configs():
    def spec(bm, bn, bk, w, s, dt="bf16"):
        return CompileSpec(f"k[{bm}x{bn}x{bk} w{w} s{s}] {dt}", test_ci_subset_keeps_bf16_and_the_largest_configs,
                           {"a": f"*{dt}", "BLOCK_M": "constexpr"}, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w, s)
    specs = [spec(bm, 128, 64, w, s, dt) for bm in (16, 32, 64, 128) for w in (4, 8) for s in (2, 4)
             for dt in ("bf16", "fp16")]
    ci = cc._select(specs, "ci")
    assert len(ci) == cc.CI_PER_KERNEL and all("bf16" in s.name for s in ci)
    assert "k[128x128x64 w4 s4] bf16" in [s.name for s in ci]  # largest tile per warp and staged footprint
    assert cc._select(specs, "all") == specs
    with pytest.raises(ValueError, match="subset"):
        cc._select(specs, "some")


def test_discovery_finds_every_kernel_module():
    mods = cc.kernel_modules()
    assert "triton_moe.kernels.portability_demo" in mods
    assert all(m.startswith("triton_moe.kernels.") and not m.rsplit(".", 1)[1].startswith("_") for m in mods)
    assert cc.default_sources() == [f"{m}:compile_specs" for m in mods]
    specs, note = cc.load_specs("triton_moe.mode:compile_specs")
    assert specs == [] and "has no compile_specs()" in note


def test_interpreter_functions_cannot_be_compiled_here():
    """Why the check runs in worker processes: in this (CPU, interpreter) process @triton.jit gave an
    interpreter function, which triton.compile cannot compile."""
    from triton_moe.kernels import portability_demo as demo

    if triton_moe.ON_GPU:
        pytest.skip("GPU mode: kernels are real JITFunctions here")
    r = cc.compile_one(demo.planted_error_specs()[0], cc.TARGETS["sm_90"])
    assert not r.ok and "TRITON_INTERPRET" in r.error


def test_cli_exit_code_and_report(tmp_path, monkeypatch, capsys):
    good = [_result(t) for t in cc.TARGETS]
    monkeypatch.setattr(cc, "run_check", lambda *a, **k: (good, []))
    assert cc.main(["--report", str(tmp_path / "r.md")]) == 0
    assert "PASS" in (tmp_path / "r.md").read_text()
    assert len(json.loads((tmp_path / "r.json").read_text())["results"]) == 4
    assert [r.target for r in cc.load_report(tmp_path / "r.md")] == list(cc.TARGETS)
    monkeypatch.setattr(cc, "run_check", lambda *a, **k: (good + [_result(spill_bytes=4)], []))
    assert cc.main([]) == 1
    assert "FAIL (1 problems)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Real compiles (a few seconds each; the worker processes import torch and triton once)

PLANTED = ["triton_moe.kernels.portability_demo:planted_spill_specs",
           "triton_moe.kernels.portability_demo:planted_overflow_specs",
           "triton_moe.kernels.portability_demo:planted_error_specs"]


@pytest.fixture(scope="module")
def planted():
    # The 256x256 spill takes ptxas tens of seconds per NVIDIA target: one NVIDIA and one AMD target prove it.
    results, errors = cc.run_check(PLANTED[:1], ["sm_90", "gfx942"])
    more, errors2 = cc.run_check(PLANTED[1:])
    assert not [e for e in errors + errors2 if not e.startswith("note:")], errors + errors2
    return results + more


def _by(results, label):
    return {r.target: r for r in results if label in r.spec}


def test_planted_spill_fails_the_check(planted):
    rs = _by(planted, "planted spill")
    assert set(rs) == {"sm_90", "gfx942"}
    for t, r in rs.items():
        assert r.ok and any(p.startswith("spills") for p in r.problems()), (t, r)
    assert rs["sm_90"].spill_bytes > 0 and rs["gfx942"].vgpr_spill > 0
    assert any("planted spill" in f for f in cc.failures(planted, []))


def test_planted_lds_overflow_fails_on_amd_only(planted):
    rs = _by(planted, "planted LDS overflow")
    for t in ("gfx942", "gfx90a"):
        assert rs[t].ok and rs[t].shared > 64 * 1024 and any("LDS" in p for p in rs[t].problems()), rs[t]
    for t in ("sm_90", "sm_80"):
        assert rs[t].passed, rs[t].problems()
        assert rs[t].shared > 64 * 1024  # the same tiles, within an NVIDIA block's shared memory
    assert rs["sm_90"].matrix == "wgmma" and rs["sm_80"].matrix == "mma.sync"
    assert rs["gfx942"].matrix.startswith("v_mfma")


def test_planted_compile_error_fails_on_nvidia(planted):
    rs = _by(planted, "planted compile error")
    for t in ("sm_90", "sm_80"):
        assert not rs[t].ok and "K >= 16" in rs[t].problems()[0], rs[t]
    # AMD has a 32x32x8 MFMA: the same BLOCK_K=8 compiles there (the lesson of chapter 6).
    assert rs["gfx942"].ok


def test_cli_exits_nonzero_on_a_compile_error():
    p = subprocess.run([sys.executable, "-m", "triton_moe.crosscompile", "--source", PLANTED[2], "--targets",
                        "sm_90", "--jobs", "1"], capture_output=True, text=True, cwd=cc.ROOT, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "compile error" in p.stdout and "K >= 16" in p.stdout


def test_a_crashing_worker_is_reported():
    results, errors = cc.run_check(["faulthandler:_sigsegv"], ["sm_90"], jobs=1)
    assert results == [] and errors and "worker failed" in errors[0], errors


# --------------------------------------------------------------------------------------------------
# The CI hook: every kernel of the course (CI subset), all four targets

@pytest.mark.slow
def test_all_kernels_cross_compile():
    t0 = time.perf_counter()
    results, errors = cc.run_check(subset="ci")
    seconds = time.perf_counter() - t0
    fails = cc.failures(results, errors)
    modules = {r.module for r in results}
    print(f"cross-compiled {len(results)} (spec, target) pairs from {len(modules)} modules in {seconds:.0f} s")
    assert results, f"no spec was compiled: {errors}"
    assert "triton_moe.kernels.portability_demo" in modules
    assert not fails, (f"{len(fails)} cross-compile problems (see `python -m triton_moe.crosscompile --subset ci`; "
                       "chapter 6 explains spills and LDS overflows):\n  " + "\n  ".join(f[:300] for f in fails[:40]))
