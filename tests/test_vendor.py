"""Vendor detection and per-vendor config tables, on a simulated ROCm PyTorch (no AMD GPU here), and the rule
that checkers, tests and benchmarks make no CUDA-only call without a guard."""
import json
import re
from pathlib import Path

import pytest
import torch

import triton_moe  # noqa: F401
from triton_moe import configs, mode, target, timing, vendor
from triton_moe.configs import KernelConfig, save_table
from triton_moe.kernels import portability_demo as demo
from triton_moe.reference import new_seed

ROOT = Path(__file__).resolve().parent.parent


class _NoDriver:
    """Triton's driver on a machine without a GPU: asking for the target fails, so detection falls back on
    what torch says (as on a ROCm or CUDA build of PyTorch with no driver loaded)."""

    @property
    def active(self):
        raise RuntimeError("0 active drivers")


@pytest.fixture
def rocm(monkeypatch):
    """This process as ROCm PyTorch on an MI300X would see it: GPU mode, torch.version.hip set, the device
    still called 'cuda'."""
    import triton

    class Props:
        gcnArchName = "gfx942:sramecc+:xnack-"

    monkeypatch.setattr(mode, "ON_GPU", True)
    monkeypatch.setattr(mode, "MODE", "gpu")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133-dd7f95766", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "AMD Instinct MI300X")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: Props())
    monkeypatch.setattr(triton.runtime, "driver", _NoDriver())
    target._detect.cache_clear()
    configs.clear_cache()
    yield
    target._detect.cache_clear()
    configs.clear_cache()


@pytest.fixture
def cuda(monkeypatch):
    import triton

    monkeypatch.setattr(mode, "ON_GPU", True)
    monkeypatch.setattr(mode, "MODE", "gpu")
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # rocm-ok: simulated CUDA
    monkeypatch.setattr(triton.runtime, "driver", _NoDriver())
    target._detect.cache_clear()
    configs.clear_cache()
    yield
    target._detect.cache_clear()
    configs.clear_cache()


def test_mode_info_under_rocm(rocm):
    i = mode.info()
    assert (i.mode, i.device, i.vendor, i.device_name) == ("gpu", "cuda", "amd", "AMD Instinct MI300X")
    assert i.runtime_version == "hip 6.2.41133-dd7f95766" and i.dtype_name == "bfloat16"
    assert mode.device() == "cuda" and mode.default_dtype() == torch.bfloat16
    assert target.current() == target.Target("amd", "gfx942", "amd-instinct-mi300x")
    assert vendor.detect_vendor() == "amd"
    # Results of an AMD run land next to NVIDIA's, in the same format, under the AMD device's name.
    assert timing.results_path("ch06_tiled_matmul") == ROOT / "results/amd-instinct-mi300x/ch06_tiled_matmul.csv"
    assert timing.run_metadata()["vendor"] == "amd"


def test_mode_info_under_cuda(cuda):
    assert mode.info().vendor == "nvidia" and mode.info().runtime_version == "cuda 13.0"
    assert target.current() == target.Target("nvidia", "sm_90", "nvidia-h100-80gb-hbm3")
    assert vendor.detect_vendor() == "nvidia"


def test_cpu_mode():
    if mode.ON_GPU:
        pytest.skip("CPU-mode test")
    assert vendor.detect_vendor() == "cpu" and vendor.current_target() == ""
    assert vendor.load_vendor_table(demo.KERNEL).source == "tiled_matmul.cpu.json"


def test_rocm_with_an_empty_device_name_uses_the_architecture(rocm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "")
    target._detect.cache_clear()
    assert target.current().device == "gfx942-sramecc-xnack"


def test_vendor_tables_are_picked_at_run_time(rocm, monkeypatch):
    amd = vendor.load_vendor_table(demo.KERNEL)
    assert amd.source == "tiled_matmul.amd.json" and not amd.adapted
    big = vendor.pick_config(demo.KERNEL, 4096)
    assert big.num_stages <= 2 and big.meta()["waves_per_eu"] == 2 and big.meta()["matrix_instr_nonkdim"] == 16
    with target.simulate("sm_90"):
        nv = vendor.pick_config(demo.KERNEL, 4096)
    assert not set(nv.meta()) & set(configs.AMD_ONLY_OPTIONS), "AMD options would make an NVIDIA launch fail"


def _write(tmp, name, table, meta=None):
    save_table(table, tmp / f"tiled_matmul.{name}.json", meta)


MI300X = target.Target("amd", "gfx942", "amd-instinct-mi300x")


def test_device_table_first_then_vendor_table(tmp_path, monkeypatch):
    _write(tmp_path, "amd", [(1 << 30, KernelConfig(64, 64, 64, 8, 4, 2))])
    _write(tmp_path, "amd-instinct-mi300x", [(1 << 30, KernelConfig(128, 128, 64, 8, 4, 2))], {"vendor": "amd"})
    t = configs.table("tiled_matmul", target=MI300X, tables=tmp_path)
    assert t.source == "tiled_matmul.amd-instinct-mi300x.json" and t.rows[0][1].BLOCK_M == 128
    t = configs.table("tiled_matmul", target=target.Target("amd", "gfx90a", "amd-instinct-mi250x"), tables=tmp_path)
    assert t.source == "tiled_matmul.amd.json"
    # The cross-compile check covers the device table too: on its own target when the tuning run wrote it,
    # else on its vendor's targets.
    _write(tmp_path, "nvidia-h100-80gb-hbm3", [(1 << 30, KernelConfig(64, 64, 64, 8, 4, 4))],
           {"vendor": "nvidia", "target": "sm_90"})
    monkeypatch.setattr(configs, "TABLES", tmp_path)
    got = {(label, v, t) for label, v, t, _ in vendor.vendor_tables("tiled_matmul")}
    assert got == {("nvidia", "nvidia", ("sm_90", "sm_80")), ("amd", "amd", ("gfx942", "gfx90a")),
                   ("amd-instinct-mi300x", "amd", ("gfx942", "gfx90a")), ("nvidia-h100-80gb-hbm3", "nvidia", ("sm_90",))}


def test_fallback_adapts_the_nvidia_table_for_amd(tmp_path):
    _write(tmp_path, "nvidia", [(64, KernelConfig(64, 128, 64, 8, 4, 4)), (1 << 30, KernelConfig(128, 256, 128, 8, 8, 4))])
    t = configs.table("tiled_matmul", target="gfx942", tables=tmp_path)
    assert t.adapted and t.source == "adapted from tiled_matmul.nvidia.json"
    for _, c in t.rows:
        assert c.num_stages <= 2 and vendor.shared_bytes_estimate(c) <= configs.AMD_LDS_BYTES
    assert (t.rows[1][1].BLOCK_M, t.rows[1][1].BLOCK_N) == (128, 256)  # K shrinks first


def test_one_chooser_for_every_op(tmp_path):
    """Every op states what its key means; the portable table serves a target nobody tuned; an older NVIDIA
    GPU skips a family table tuned on Hopper; unknown ops and targets are refused with a clear error."""
    import triton_moe.kernels.fused_moe  # noqa: F401  (registers every op of the course)

    for name, op in configs.OPS.items():
        assert op.key and op.cpu and op.portable, name
        assert configs.table(name, target="cpu", tables=tmp_path).source == "cpu"
        assert configs.table(name, target="gfx90a", tables=tmp_path).source == "portable"
    save_table([(1 << 30, KernelConfig(128, 256, 64, 8, 8, 3))], tmp_path / "grouped_gemm.nvidia.json")
    assert configs.table("grouped_gemm", target="sm_90", tables=tmp_path).source == "grouped_gemm.nvidia.json"
    assert configs.table("grouped_gemm", target="sm_80", tables=tmp_path).source == "portable"
    with pytest.raises(ValueError, match="unknown op"):
        configs.choose("nothing", 1)
    with pytest.raises(ValueError, match="target"):
        configs.choose("grouped_gemm", 1, target="intel")


def test_committed_tables_fit_their_vendor():
    for path in sorted((ROOT / "triton_moe/tables").glob("tiled_matmul.*.json")):
        meta = json.loads(path.read_text())["meta"]
        assert meta.get("source"), f"{path.name}: say where the table came from"
    amd = vendor.load_vendor_table(demo.KERNEL, "amd").rows
    assert all(c.num_stages <= 2 for _, c in amd)


def test_tiled_matmul_matches_torch_on_this_machine():
    dtypes = (torch.bfloat16,) if mode.ON_GPU else (torch.float32, torch.float16)
    g = torch.Generator().manual_seed(new_seed())
    for dtype in dtypes:
        for M, N, K in ((1, 96, 64), (37, 200, 300)):
            a = torch.randn(M, K, generator=g).to(dtype).to(mode.device())
            w = torch.randn(N, K, generator=g).to(dtype).to(mode.device())
            ref = a.double() @ w.double().T
            out = demo.tiled_matmul(a, w)
            err = float((out.double() - ref).norm() / ref.norm())
            assert out.shape == (M, N) and out.dtype == dtype and err < 1e-2, (dtype, M, N, K, err)


def test_tiled_matmul_validates():
    a = torch.zeros(4, 32)
    with pytest.raises(ValueError, match="w must have shape"):
        demo.tiled_matmul(a, torch.zeros(8, 16))
    with pytest.raises(ValueError, match="w has dtype"):
        demo.tiled_matmul(a, torch.zeros(8, 32, dtype=torch.float16))
    if not mode.ON_GPU:
        with pytest.raises(ValueError, match="bfloat16"):
            demo.tiled_matmul(a.bfloat16(), torch.zeros(8, 32, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------------
# No CUDA-only call without a guard (ROCm PyTorch calls its GPUs "cuda" too, so torch.cuda.* is fine;
# these are not)

CUDA_ONLY = re.compile(r"torch\.version\.cuda|get_device_capability|nvidia-smi|pynvml|torch\.backends\.cudnn|"
                       r"torch\.cuda\.nvtx|cuda\.get_device_properties\([^)]*\)\.(major|minor)")
GUARD = re.compile(r"hip|vendor|rocm-ok")


def _sources():
    for pattern in ("triton_moe/**/*.py", "tests/*.py", "benchmarks/*.py", "scripts/*.py"):
        for p in sorted(ROOT.glob(pattern)):
            if p.name not in ("test_vendor.py",):
                yield p, p.read_text().splitlines()
    for p in sorted((ROOT / "solutions").glob("*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        yield p, [ln for c in cells if c["cell_type"] == "code" for ln in "".join(c["source"]).splitlines()]


def test_no_unguarded_cuda_only_calls():
    bad = []
    for path, lines in _sources():
        for i, line in enumerate(lines):
            if CUDA_ONLY.search(line) and not any(GUARD.search(ln) for ln in lines[max(0, i - 3): i + 1]):
                bad.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not bad, ("CUDA-only calls that would break under ROCm PyTorch; guard them with torch.version.hip / "
                     "triton_moe.vendor.detect_vendor() (or mark a line '# rocm-ok: why'):\n  " + "\n  ".join(bad))
