"""Chapter 6: the checkers pass the solution, call the untouched exercise "not attempted" and reject planted
wrong answers with messages that say why (the config ones are compiled for gfx942 for real); the AMD results
path (run_all, the results format, tables and plots of both vendors) on a small fixture; on a GPU, the
vendor's table runs and is correct."""
from pathlib import Path

import pytest
import torch

import triton_moe  # noqa: F401
from triton_moe import mode, timing, vendor
from triton_moe.checking import CheckFailure
from triton_moe.checks import ch06_portability as ch06
from triton_moe.configs import KernelConfig
from triton_moe.kernels import portability_demo as demo

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
CONFIG, LDS = "06:choose_gfx942_config", "06:gfx942_lds_bytes"


def nb():
    import notebook_helpers  # imports the grader (nbformat): CPU tests only

    return notebook_helpers


def planted(monkeypatch, *replace):
    """The solution with a planted bug; its own check cells are skipped (as while grading), so each planted
    config is compiled once, by the test."""
    monkeypatch.setenv("TRITON_MOE_GRADING", "1")
    return nb().planted_ns("06", *replace)


def test_solution_passes():
    h = nb()
    ns = h.solution_ns("06")
    for key in (CONFIG, LDS):
        r = h.check(key, ns)
        assert r.passed, str(r)
    assert "no spills" in h.check(CONFIG, ns).cases[0]


def test_untouched_exercise_is_not_attempted():
    h = nb()
    ns = h.exercise_ns("06")
    for key in (CONFIG, LDS):
        r = h.check(key, ns)
        assert r.status == "not attempted", str(r)


SOLUTION_CONFIG = "return dataclasses.replace(NVIDIA_LARGE_M, num_stages=2)"
CONFIG_BUGS = {  # planted answer -> words the message or hint must contain (None: the answer is compiled)
    "nvidia-config-as-is": ("return NVIDIA_LARGE_M", "LDS"),
    "spills": ("return KernelConfig(256, 256, 64, 8, 4, 2)", "spills"),
    "tiny-tile": ("return KernelConfig(16, 64, 32, 8, 4, 2)", "too small"),
    "not-a-power-of-two": ("return KernelConfig(96, 128, 64, 8, 4, 2)", "powers of two"),
    "nvidia-only-option": ("return KernelConfig(128, 128, 64, 8, 4, 2, {'maxnreg': 128})", "AMD compiler option"),
    "a-dict": ("return {'BLOCK_M': 128, 'BLOCK_N': 128}", "expected a KernelConfig"),
}


@pytest.mark.parametrize("name", list(CONFIG_BUGS))
def test_planted_config_is_rejected(name, monkeypatch):
    new, expect = CONFIG_BUGS[name]
    r = nb().check(CONFIG, planted(monkeypatch, (SOLUTION_CONFIG, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)


def test_lds_overflow_message_explains_the_fix(monkeypatch):
    r = nb().check(CONFIG, planted(monkeypatch, (SOLUTION_CONFIG, "return NVIDIA_LARGE_M")))
    assert "98304 B of LDS" in r.message and "65536" in r.message and "num_stages" in r.hint, str(r)


MULTI = "    return (cfg.num_stages - 1) * (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K * elem_bytes\n"
LDS_BUGS = {
    "hopper-buffers": (MULTI, MULTI.replace("(cfg.num_stages - 1)", "cfg.num_stages"), "num_stages buffers"),
    "elements-not-bytes": (MULTI, MULTI.replace(" * elem_bytes", ""), "bytes, not elements"),
    "only-the-a-tile": (MULTI, MULTI.replace("(cfg.BLOCK_M + cfg.BLOCK_N)", "cfg.BLOCK_M"), "both operand tiles"),
    # issue 10: the old formula (one buffer of both tiles at num_stages = 1), and elem_bytes hard-coded
    "stage-1-both-tiles": ("max(cfg.BLOCK_M, cfg.BLOCK_N)", "(cfg.BLOCK_M + cfg.BLOCK_N)", "num_stages=1"),
    "elem-bytes-ignored": (MULTI, MULTI.replace(" * elem_bytes", " * 2"), "elem_bytes is ignored"),
}


@pytest.mark.parametrize("name", list(LDS_BUGS))
def test_planted_lds_formula_is_rejected(name, monkeypatch):
    old, new, expect = LDS_BUGS[name]
    r = nb().check(LDS, planted(monkeypatch, (old, new)))
    assert r.status == "failed" and expect in (r.message + r.hint), str(r)
    assert "the compiler reported" in r.message


def test_validate_config_messages():
    ok = KernelConfig(128, 128, 64, 8, 8, 2, {"waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2})
    assert ch06.validate_config(ok) is ok
    for bad, words in ((KernelConfig(128, 128, 64, 8, 3, 2), "num_warps"),
                       (KernelConfig(128, 128, 64, 8, 4, 7), "num_stages"),
                       (KernelConfig(128, 128, 512, 8, 4, 2), "BLOCK_K"),
                       (KernelConfig(128, 128, 64, 8, 4, 2, {"kpack": 3}), "kpack"),
                       (KernelConfig(64, 64, 16, 8, 4, 2), "too small")):
        with pytest.raises(CheckFailure, match=words):
            ch06.validate_config(bad)


def test_observed_lds_table_matches_the_committed_report():
    """The LDS numbers the checker holds are the compiler's: every gfx942 tiled_matmul row of the committed
    report agrees with them where both have the config."""
    from triton_moe.tools.crosscompile import load_report

    seen = 0
    for r in load_report(ROOT / "docs" / "compile-report.md"):
        if r.target != "gfx942" or r.kernel != "tiled_matmul_kernel" or not r.ok:
            continue
        dims = r.spec.split("[")[1].split()[0].split("x")
        key = (int(dims[0]), int(dims[1]), int(dims[2]), r.num_stages)
        if key in ch06.OBSERVED_GFX942_LDS:
            assert ch06.OBSERVED_GFX942_LDS[key] == r.shared, (r.spec, r.shared)
            seen += 1
    assert seen >= 3


def test_lds_reference_rule_matches_every_observed_row():
    for (bm, bn, bk, s), v in ch06.OBSERVED_GFX942_LDS.items():
        assert ch06.gfx942_lds_reference(bm, bn, bk, s, 2) == v, (bm, bn, bk, s)
    for (bm, bn, bk, s, eb), v in ch06.OBSERVED_GFX942_LDS_BY_SIZE.items():
        assert ch06.gfx942_lds_reference(bm, bn, bk, s, eb) == v, (bm, bn, bk, s, eb)


# --------------------------------------------------------------------------------------------------
# The AMD results path, on a fixture (tests/fixtures/results: device names say TEST FIXTURE)


@pytest.fixture
def run_all():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_all_dry_run(run_all, capsys):
    chapters = sorted(p.name for p in (ROOT / "benchmarks").glob("ch[0-9][0-9]_*.py"))
    assert "ch06_portability.py" in chapters
    assert run_all.main(["--dry-run", "--quick"]) == 0
    out = capsys.readouterr().out
    for c in chapters:
        assert c in out
    assert run_all.main(["--dry-run", "--tune", "--only", "ch06"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["python benchmarks/ch06_portability.py --tune"]
    if not mode.ON_GPU:
        with pytest.raises(RuntimeError, match="needs a GPU"):
            run_all.main(["--only", "ch06"])


def test_amd_script_refuses_a_non_rocm_torch():
    import subprocess
    import sys

    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "amd.sh"), "--dry-run"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    if getattr(torch.version, "hip", None):
        pytest.skip("this is a ROCm PyTorch")
    assert p.returncode != 0 and "not a ROCm build" in p.stderr


def test_amd_results_are_read_and_shown_next_to_nvidia(monkeypatch):
    monkeypatch.setattr(timing, "RESULTS", FIXTURES)
    rows = timing.load_rows("ch06_tiled_matmul")
    assert {r["vendor"] for r in rows} == {"amd", "nvidia"}
    assert all(isinstance(r["M"], int) and isinstance(r["median_ms"], float) for r in rows)
    text = vendor.times_table(rows)
    assert "AMD Instinct MI300X (TEST FIXTURE" in text and "NVIDIA H100 (TEST FIXTURE" in text
    assert "not measured" not in text
    only_nv = [r for r in rows if r["vendor"] == "nvidia"]
    assert "AMD: not measured" in vendor.times_table(only_nv)
    assert "AMD not measured" in vendor.times_table([])
    import matplotlib

    matplotlib.use("Agg")
    for dev in {r["device"] for r in rows}:
        ax = timing.plot_times([r for r in rows if r["device"] == dev], "fixture", routing="dense")
        assert len(ax.get_lines()) == 3  # two implementations and the floor
    assert "hip 0.0" in timing.summary_line([r for r in rows if r["vendor"] == "amd"])


def test_an_amd_run_writes_the_same_format(monkeypatch, tmp_path):
    """What benchmarks/ch06_portability.py writes on ROCm PyTorch, round-tripped through load_rows."""
    import importlib.util

    monkeypatch.setattr(mode, "ON_GPU", True)
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "AMD Instinct MI300X")
    spec = importlib.util.spec_from_file_location("ch06_bench", ROOT / "benchmarks" / "ch06_portability.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    meta = timing.run_metadata()
    row = bench.row(meta, {"copy_GBps": 4000.0, "matmul_TFLOPs": 800.0}, 16, "torch.matmul", 0.1, "fixture")
    monkeypatch.setattr(timing, "RESULTS", tmp_path)
    path = timing.write_rows([row], timing.results_path("ch06_tiled_matmul"))
    assert path == tmp_path / "amd-instinct-mi300x" / "ch06_tiled_matmul.csv"
    back = timing.load_rows("ch06_tiled_matmul")[0]
    assert back["vendor"] == "amd" and back["runtime"] == "hip 6.2.0" and back["M"] == 16
    assert set(back) == set(timing.COLUMNS)


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_vendor_table_runs_on_this_gpu():
    v = vendor.detect_vendor()
    assert v == ("amd" if getattr(torch.version, "hip", None) else "nvidia")
    table = vendor.load_vendor_table("tiled_matmul")
    w = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
    for max_m, cfg in table.rows:
        M = min(max_m, 300)
        a = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
        out = demo.tiled_matmul(a, w, cfg)
        ref = a.double() @ w.double().T
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2, cfg


def test_unusual_correct_lds_formula_passes(monkeypatch):
    body = ("    a = cfg.BLOCK_M * cfg.BLOCK_K * elem_bytes\n    w = cfg.BLOCK_K * cfg.BLOCK_N * elem_bytes\n"
            "    return max(a, w) if cfg.num_stages == 1 else (cfg.num_stages - 1) * (a + w)\n")
    old = ("    if cfg.num_stages <= 1:  # no pipelining: one operand tile at a time, in one buffer\n"
           "        return max(cfg.BLOCK_M, cfg.BLOCK_N) * cfg.BLOCK_K * elem_bytes\n" + MULTI)
    r = nb().check(LDS, planted(monkeypatch, (old, body)))
    assert r.passed, str(r)
