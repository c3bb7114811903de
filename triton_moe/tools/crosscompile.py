"""Compile every kernel for NVIDIA and AMD targets on a machine without a GPU (chapter 6). A tool: no kernel
module imports it.

Each kernel module ``triton_moe/kernels/*.py`` declares its example launches as data: ``example_launches() ->
[(label, zero-argument callable that calls the host wrapper on device="meta" tensors)]``. For each target
(sm_90, sm_80, gfx942, gfx90a, and each device with its own tuned table) the tool runs every callable while
:func:`simulate` makes the host wrappers choose their configs as a GPU of that target would, records the
launches they make (:func:`capture_launches`: no GPU, no memory), turns each distinct launch into a spec
(:func:`spec_from_launch`, the one spec mechanism), compiles it for the targets that made it with
``triton.compile`` and ``GPUTarget``, and reads registers, spills and shared memory / LDS from the results::

    python -m triton_moe.tools.crosscompile                       # every example launch, all four targets
    python -m triton_moe.tools.crosscompile --subset ci           # what CI compiles (see SUBSETS)
    python -m triton_moe.tools.crosscompile --report docs/compile-report.md   # also write the report (+ .json)
    python -m triton_moe.tools.crosscompile --source triton_moe.kernels.portability_demo:planted_spill_launches

(``python -m triton_moe.crosscompile`` is an alias.) It exits with 1 if any spec fails to compile for a
target, spills registers to memory, or needs more shared memory / LDS than the target gives one block /
workgroup, and with 0 otherwise (warnings: see "SGPR spills").

What a spec must be: the launch the kernel really gets. Triton's JIT specialises every launch: an int argument
equal to 1 (the unit stride of a contiguous tensor) becomes a constant, ints that are multiples of 16 and
16-byte aligned pointers are marked ``tt.divisibility=16``, and on AMD tensors under 2 GB are marked
``tt.pointer_range=32`` (buffer loads). A spec that declares a stride as a plain ``i32`` compiles another,
worse kernel than any GPU runs (scalar loads, no ``cp.async`` pipelining, spills that never happen). So specs
are computed from the launch's own arguments with Triton's own specialisation code
(:func:`launch_specialization`): a spec cannot drift from the launch, and a table is compiled exactly for the
targets whose GPU picks it; the ``cpu`` tables are never compiled (only the interpreter runs them, and it
compiles nothing).

How it reads each target (nothing here needs a GPU or a driver):

- NVIDIA: ``cuobjdump --dump-resource-usage`` on the cubin gives registers and stack; when the stack is not
  empty, ``ptxas -v`` on the PTX (the ptxas Triton itself uses) says how many bytes were spilled. Shared
  memory is Triton's ``metadata.shared`` (dynamic shared memory per block). sm_90 PTX with ``wgmma`` uses
  Hopper's warpgroup tensor cores; ``mma.sync`` is the Ampere-style instruction.
- AMD: the AMDGCN assembly's metadata (``.vgpr_count``, ``.sgpr_count``, ``.vgpr_spill_count``,
  ``.sgpr_spill_count``, ``; NumAgprs:``, ``; Occupancy:``, ``; ScratchSize:``); LDS is ``metadata.shared``.
  ``v_mfma_*`` are CDNA's matrix instructions.

SGPR spills (AMD) are a warning, not a failure, when they go into VGPR lanes: the compile reports spilled
SGPRs, no spilled VGPRs and no scratch memory (``ScratchSize`` 0). Why:

- Cost: an SGPR spilled into a lane of a VGPR is a ``v_writelane`` / ``v_readlane`` pair, register to
  register. No memory is touched, unlike an NVIDIA spill (local memory) or a VGPR spill (scratch memory),
  which both stay failures, as does any compile that uses scratch memory (SGPRs spill to memory once no VGPR
  lane is free).
- Where (with specs that mirror real launches, triton 3.6): only chapter 2's ``dispatch_count`` and
  ``dispatch_scatter`` kernels at 128 or 256 experts (Qwen3, DeepSeek-V3), 1-8 SGPRs past the ~100 a wave
  addresses (the sorted dispatch's loops keep the pointers, their buffer descriptors and loop bounds live as
  uniform values). Those kernels move a few KB and are latency-bound.
- Removing them: 8 warps per workgroup instead of the default 4 removes every one of them on gfx942 and
  gfx90a in the compiler (e.g. 74 SGPRs, occupancy 5 instead of 3), but the launch has no per-vendor warp
  count today: it needs ``sorted_dispatch`` (which chapter 2's notebook mirrors) to take one, and nobody has
  timed it on an AMD GPU. Until someone does, the check reports these spills (the report's "Warnings" section
  and the ``warn`` lines of the CLI) rather than failing CI on a cost it cannot show.

Why worker processes: importing :mod:`triton_moe` on a machine without a GPU sets ``TRITON_INTERPRET=1``
before any kernel is defined, and then ``@triton.jit`` makes interpreter functions, which
``triton.compile`` cannot compile (``'InterpretedFunction' object has no attribute 'cache_key'``; a kernel
calling another ``@triton.jit`` helper would need that one rebuilt too). So the specs are built in the calling
process (once; interpreter functions give the same specialisation) and written to a file, and the kernel
modules are imported again in fresh worker processes with the flag cleared (Triton is imported before the package, and the
package's own kernel modules, which ``import triton_moe`` loads to export ``fused_moe``, are dropped and
imported again: :func:`_drop_interpreted_modules`); that also runs the two cores of a CI machine in
parallel and keeps a crashing compiler (LLVM aborts on some bad configs) from taking the caller down.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
KERNELS_DIR = ROOT / "triton_moe" / "kernels"
DEFAULT_CACHE = ROOT / ".triton_cache" / "crosscompile"

DIV16 = [["tt.divisibility", 16]]  # attrs value: the argument is a multiple of 16 (pointers: 16-byte aligned)


@dataclass
class CompileSpec:
    name: str            # e.g. "grouped_gemm[BLOCK_M=16,...] bf16"
    fn: object           # the @triton.jit function
    signature: dict      # every parameter -> "*bf16", "*fp16", "*i32", "i32", "fp32", "constexpr", ...
    constexprs: dict     # values of the constexpr parameters
    num_warps: int = 4
    num_stages: int | None = 3  # None: the backend's default (NVIDIA 3, AMD 2), for launches that set none
    options: dict = field(default_factory=dict)  # extra compiler options (AMD: waves_per_eu, kpack, ...)
    # Optional, added for chapter 6 (older specs need neither):
    attrs: dict = field(default_factory=dict)    # parameter name -> [["tt.divisibility", 16]] (DIV16), as a
    #                                              real launch specialises 16-divisible ints and pointers
    vendors: tuple = ("nvidia", "amd")           # compile for these vendors' targets only
    targets: tuple = ()                          # and, if given, only these (e.g. ("sm_90",) for an H100 table)
    amd_attrs: dict | None = None                # attrs on AMD targets where they differ (None: ``attrs``): a
    #                                              ROCm launch also marks tensors under 2 GB tt.pointer_range=32
    #                                              (buffer loads); :func:`spec_from_args` fills both

    def attrs_for(self, vendor: str) -> dict:
        return self.amd_attrs if vendor == "amd" and self.amd_attrs is not None else self.attrs


@dataclass(frozen=True)
class Target:
    name: str            # "sm_90"
    vendor: str          # "nvidia" or "amd"
    backend: str         # GPUTarget backend: "cuda" or "hip"
    arch: object         # 90 or "gfx942"
    warp_size: int       # 32 (warp) or 64 (wavefront)
    shared_limit: int    # bytes of shared memory / LDS one block / workgroup may use
    gpu: str             # the GPU it stands for, for the report

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)


# Limits per block / workgroup (datasheet / programming-guide values): H100 228 KB shared memory per SM, of
# which 227 KB one block may opt into; A100 164 KB per SM, 163 KB per block; CDNA2/CDNA3 64 KB LDS per CU
# and per workgroup.
TARGETS: dict[str, Target] = {
    "sm_90": Target("sm_90", "nvidia", "cuda", 90, 32, 227 * 1024, "H100 (Hopper)"),
    "sm_80": Target("sm_80", "nvidia", "cuda", 80, 32, 163 * 1024, "A100 (Ampere)"),
    "gfx942": Target("gfx942", "amd", "hip", "gfx942", 64, 64 * 1024, "MI300X (CDNA3)"),
    "gfx90a": Target("gfx90a", "amd", "hip", "gfx90a", 64, 64 * 1024, "MI250X (CDNA2)"),
}

# What CI compiles. "all": every spec (the committed report, docs/compile-report.md). "ci": a representative
# subset that fits CI's time (the whole suite must finish in 20 minutes on 2 cores; compiling every spec
# for four targets takes about 9): per kernel function, the bf16 specs only (fp16 has bf16's tile sizes,
# shared-memory footprint and register layout; kernels without a float dtype keep all their variants), and
# of those, for each target, at most CI_PER_KERNEL of the specs that target runs (tables differ per target):
# alternately the one with the largest tile per warp (where register spills show first) and the one with the
# largest staged tiles (where shared memory / LDS overflows show first). A chosen spec is compiled for every
# target that runs it. Measured on the 2-core CI-like machine with an empty compiler cache, two workers, other
# jobs sharing it: before the specs mirrored real launches (2026-11-26) "ci" took 2 min 20 s (about 200
# compiles; the wrongly specified kernels spilled, and ptxas takes 10-40 s on a spilling kernel); with specs
# that mirror launches "ci" takes about 2 min (263 compiles, 218 s of compiling; the fused MoE kernels are most
# of it) and "all" with the lessons 9 min 10 s (1092 + 10 compiles). A compile is 0.5-3 s.
SUBSETS = ("all", "ci")
CI_PER_KERNEL = 6


@dataclass
class CompileResult:
    spec: str
    kernel: str          # the @triton.jit function's name
    module: str          # where compile_specs() came from
    target: str
    ok: bool = False     # compiled
    error: str = ""
    seconds: float = 0.0
    shared: int = 0      # bytes of dynamic shared memory / LDS per block
    shared_limit: int = 0
    registers: int = 0   # NVIDIA: registers per thread; AMD: VGPRs per lane (architectural + accumulation)
    vgpr: int = 0        # AMD only, split of ``registers``
    agpr: int = 0
    sgpr: int = 0
    spill_bytes: int = 0  # NVIDIA: bytes of spill stores (ptxas -v)
    stack: int = 0        # NVIDIA: stack frame bytes; AMD: scratch bytes per lane
    vgpr_spill: int = 0   # AMD: VGPRs spilled to scratch memory
    sgpr_spill: int = 0   # AMD: SGPRs spilled (into VGPR lanes or memory)
    occupancy: int = 0    # AMD: waves per SIMD the compiler reports (0: not reported)
    matrix: str = ""      # "wgmma", "mma.sync", "v_mfma_f32_32x32x8_bf16", or "" (no matrix instruction)
    num_warps: int = 0
    num_stages: int = 0
    lesson: bool = False  # an expected failure shown as a lesson; never counts against the check

    def problems(self) -> list[str]:
        """Why this compile fails the check; empty when it passes."""
        if not self.ok:
            return [f"compile error: {error_summary(self.error)}"]
        out = []
        if self.spill_bytes > 0:
            out.append(f"spills {self.spill_bytes} B of registers")
        elif self.spill_bytes < 0:  # a stack frame, and ptxas -v could not say what is in it
            out.append(f"{self.stack} B stack frame (spills?)")
        if self.vgpr_spill or (self.sgpr_spill and self.stack):  # spills that use scratch memory
            out.append("spills " + ", ".join(f"{n} {k}" for n, k in ((self.vgpr_spill, "VGPRs"), (self.sgpr_spill, "SGPRs")) if n)
                       + f" ({self.stack} B of scratch memory per lane)")
        elif self.stack and TARGETS[self.target].vendor == "amd":
            out.append(f"{self.stack} B of scratch memory per lane (spills?)")
        if self.shared > self.shared_limit:
            out.append(f"needs {self.shared} B of {'LDS' if TARGETS[self.target].vendor == 'amd' else 'shared memory'}"
                       f" > the {self.shared_limit} B a {'workgroup' if TARGETS[self.target].vendor == 'amd' else 'block'}"
                       f" may use on {self.target}")
        return out

    def warnings(self) -> list[str]:
        """Reported, never failing: SGPRs spilled into VGPR lanes with no scratch memory in use (AMD; why this
        is a warning: the module docstring, "SGPR spills")."""
        if self.ok and self.sgpr_spill and not self.vgpr_spill and not self.stack:
            return [f"{self.sgpr_spill} SGPRs spilled into VGPR lanes"]
        return []

    @property
    def passed(self) -> bool:
        return not self.problems()


def error_summary(error: str) -> str:
    """One line from a compiler error: Triton's ``CompilationError`` puts the source excerpt first and the
    reason last ("at 25:14: ... Input shapes should have M >= 1, N >= 1 and K >= 16")."""
    lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
    if not lines:
        return "unknown"
    if len(lines) == 1:
        return lines[0]
    return f"{lines[-1]} ({lines[0].rstrip(':')})"


# --------------------------------------------------------------------------------------------------
# Parsing what the compilers say


def parse_cuobjdump(text: str) -> dict:
    """``cuobjdump --dump-resource-usage`` -> {"registers", "stack", "static_shared", "local"}."""
    out = {}
    for key, name in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "static_shared"), ("LOCAL", "local")):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            out[name] = int(m.group(1))
    return out


def parse_ptxas(text: str) -> dict:
    """``ptxas -v`` stderr -> {"registers", "stack", "spill_stores", "spill_loads"}."""
    out = {}
    if m := re.search(r"Used (\d+) registers", text):
        out["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text):
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
    return out


def parse_amdgcn(text: str) -> dict:
    """AMDGCN assembly -> {"vgpr_count", "agpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count",
    "occupancy", "scratch"}. ``vgpr_count`` is the total a lane holds (architectural + accumulation VGPRs);
    ``agpr_count`` comes from ``.agpr_count`` or, where this LLVM omits it, the ``; NumAgprs:`` comment."""
    out = {}
    for key in ("vgpr_count", "agpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count"):
        if m := re.search(rf"^\s*\.{key}:\s*(\d+)", text, re.M):
            out[key] = int(m.group(1))
    if "agpr_count" not in out and (m := re.search(r";\s*NumAgprs:\s*(\d+)", text)):
        out["agpr_count"] = int(m.group(1))
    if m := re.search(r";\s*NumVgprs:\s*(\d+)", text):
        out["arch_vgpr_count"] = int(m.group(1))
    if m := re.search(r";\s*Occupancy:\s*(\d+)", text):
        out["occupancy"] = int(m.group(1))
    if m := re.search(r";\s*ScratchSize:\s*(\d+)", text):
        out["scratch"] = int(m.group(1))
    return out


def matrix_instruction(text: str, vendor: str) -> str:
    if vendor == "nvidia":
        return "wgmma" if "wgmma" in text else ("mma.sync" if "mma.sync" in text else "")
    found = re.findall(r"\bv_mfma_\w+", text)
    return max(set(found), key=found.count) if found else ""


# --------------------------------------------------------------------------------------------------
# Compiling one spec (inside a worker: the spec's function must be a real JITFunction)


def _attr_paths(fn, attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        out[(fn.arg_names.index(k),) if isinstance(k, str) else tuple(k)] = v
    return out


# --------------------------------------------------------------------------------------------------
# Specs that are real launches: the JIT's specialisation, computed from the launch's own arguments


class _Address:
    """What a launch's specialisation reads from a tensor on the ``meta`` device (shapes and strides, no
    memory): its address, taken as a 256-byte aligned allocation (every GPU caching allocator aligns at least
    that much) plus the view's storage offset, and the bytes its storage spans (AMD: under 2 GB?)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = 256 + t.storage_offset() * t.element_size()
        self._bytes = t.untyped_storage().nbytes()

    def data_ptr(self) -> int:
        return self._ptr

    def ptr_range(self) -> int:
        return self._bytes


_PARAMS: dict = {}  # id(kernel) -> (kernel, its KernelParams, inspect.Signature of its Python function)


def _kernel_params(fn) -> list:
    """Triton's ``KernelParam`` list of a @triton.jit function; for an interpreter function (defined under
    TRITON_INTERPRET=1) the same list, rebuilt from its Python function and its jit arguments (once: that
    parses the source)."""
    return _kernel_info(fn)[1]


def _kernel_info(fn):
    import inspect

    hit = _PARAMS.get(id(fn))
    if hit is None or hit[0] is not fn:
        if hasattr(fn, "params"):
            params = fn.params
        else:
            from triton.runtime.jit import JITFunction

            kw = getattr(fn, "kwargs", {}) or {}
            params = JITFunction(fn.fn, do_not_specialize=kw.get("do_not_specialize"),
                                 do_not_specialize_on_alignment=kw.get("do_not_specialize_on_alignment")).params
        hit = _PARAMS[id(fn)] = (fn, params, inspect.signature(fn.fn))
    return hit


def launch_specialization(fn, args, kwargs=None) -> tuple[dict, dict, dict, dict]:
    """What ``fn[grid](*args, **kwargs)`` compiles, computed as Triton's JIT does it at that launch
    (``triton/runtime/jit.py``: ``create_function_from_signature`` and ``_pack_args``), without a GPU.

    Returns ``(signature, constexprs, attrs, options)``: ``attrs`` is ``{"nvidia": {...}, "amd": {...}}``
    (parameter name -> attribute list). Per parameter: a ``tl.constexpr`` takes its value; otherwise
    Triton's own ``specialize_impl`` with the backend's rules decides: an int equal to 1 becomes the constant
    1 (unit strides), None a constant; ints get ``i32``/``i64`` by value and ``tt.divisibility=16`` when a
    multiple of 16; tensors get ``*<dtype>`` and ``tt.divisibility=16`` when 16-byte aligned, and on AMD
    ``tt.pointer_range=32`` when their storage is under 2 GB; ``do_not_specialize`` /
    ``do_not_specialize_on_alignment`` of the ``@triton.jit`` and annotations are honoured. Keyword
    arguments that are no parameter are compiler options (``num_warps``, ``waves_per_eu``, ...). Tensors
    may live on the ``meta`` device (see :class:`_Address`)."""
    import inspect

    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.amd.compiler import HIPBackend
    from triton.backends.nvidia.compiler import CUDABackend

    _, params, sig = _kernel_info(fn)
    names = [p.name for p in params]
    kwargs = dict(kwargs or {})
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {"nvidia": {}, "amd": {}}
    for kp in params:
        value = bound.arguments[kp.name]
        if kp.is_constexpr:
            signature[kp.name], constexprs[kp.name] = "constexpr", value
            continue
        specialize, align = not kp.do_not_specialize, not kp.do_not_specialize_on_alignment
        ann = kp.annotation_type
        if ann and (ann == "u1" or ann[:2] in ("fp", "bf")):
            specialize = False  # the JIT never specialises floats and bools
        arg = _Address(value) if isinstance(value, torch.Tensor) and value.device.type == "meta" else value
        for vendor, backend in (("nvidia", CUDABackend), ("amd", HIPBackend)):
            ty, attr = native_specialize_impl(backend, arg, kp.is_const, specialize, align)
            if ann:
                ty, attr = ann, (attr if specialize else None)
            signature[kp.name] = ty
            if ty == "constexpr":
                constexprs[kp.name] = value
            elif isinstance(attr, str) and (parsed := backend.parse_attr(attr)):
                attrs[vendor][kp.name] = parsed
    return signature, constexprs, attrs, options


def spec_from_args(name: str, fn, args, kwargs=None, vendors: tuple = ("nvidia", "amd"),
                   targets: tuple = ()) -> CompileSpec:
    """The spec of the launch ``fn[grid](*args, **kwargs)``: write it exactly as the host wrapper launches
    (same arguments, tensors on the ``meta`` device are enough), so the spec cannot drift from the kernel
    a GPU really compiles (see :func:`launch_specialization`). ``num_warps`` / ``num_stages`` not given
    stay the backend's defaults (4 warps; 3 stages on NVIDIA, 2 on AMD), as at a launch."""
    signature, constexprs, attrs, options = launch_specialization(fn, args, kwargs)
    num_warps = options.pop("num_warps", 4)
    num_stages = options.pop("num_stages", None)
    return CompileSpec(name, fn, signature, constexprs, num_warps, num_stages, options, attrs=attrs["nvidia"],
                       vendors=tuple(vendors), targets=tuple(targets),
                       amd_attrs=attrs["amd"] if attrs["amd"] != attrs["nvidia"] else None)


def spec_from_launch(name: str, launch, **kw) -> CompileSpec:
    """:func:`spec_from_args` of a launch recorded by :func:`capture_launches`."""
    return spec_from_args(name, launch.fn, launch.args, launch.kwargs, **kw)


@dataclass
class Launch:
    fn: object       # the kernel
    grid: object
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def capture_launches(*kernels):
    """Record every ``kernel[grid](*args, **kwargs)`` instead of running it (yields the list of
    :class:`Launch`; with ``kernels`` given, only theirs are kept, and the others are still not run). Calling a
    host wrapper on ``meta`` tensors inside gives the exact launches it makes (strides, ints, constexprs,
    options) with no GPU and no memory; outputs stay unwritten. Works for compiled and interpreter functions
    alike (both launch through ``KernelInterface.__getitem__``)."""
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []
    keep = set(map(id, kernels))

    def getitem(self, grid):
        def launch(*args, **kwargs):
            if not keep or id(self) in keep:
                launches.append(Launch(self, grid, args, kwargs))
        return launch

    old = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = old


# --------------------------------------------------------------------------------------------------
# A simulated GPU: what the host wrappers choose on a GPU of each target


@dataclass(frozen=True)
class Machine:
    target: str          # a key of TARGETS
    device: str = ""     # a device name with its own tables (``tables/<op>.<device slug>.json``), or ""
    kernels: tuple = ()  # with a device: its tables' ops (only examples of modules defining ``<op>_kernel`` run)

    @property
    def label(self) -> str:
        return f"{self.target} ({self.device})" if self.device else self.target


def machines(targets=None) -> list[Machine]:
    """The GPUs the check simulates: one per target, plus one per device that has its own tuned table
    (``meta.device`` and ``meta.target`` of ``tables/<kernel>.<device>.json``: that device runs its table,
    other GPUs of its target the vendor's)."""
    targets = list(targets or TARGETS)
    out = [Machine(t) for t in targets]
    for path in sorted((ROOT / "triton_moe" / "tables").glob("*.json")):
        try:
            meta = json.loads(path.read_text()).get("meta", {})
        except (OSError, ValueError):
            continue
        target, device = meta.get("target") or "", meta.get("device") or ""
        if device and target in targets:
            op = meta.get("kernel") or path.name.split(".")[0]
            same = [m for m in out if (m.target, m.device) == (target, device)]
            if same:
                out[out.index(same[0])] = Machine(target, device, tuple(dict.fromkeys(same[0].kernels + (op,))))
            else:
                out.append(Machine(target, device, (op,)))
    return out


def _lru_caches():
    """Every ``functools`` cache of the loaded triton_moe modules (vendor and table look-ups are cached)."""
    for name, mod in list(sys.modules.items()):
        if name == "triton_moe" or name.startswith("triton_moe."):
            for v in list(vars(mod).values()):
                if callable(getattr(v, "cache_clear", None)) and getattr(v, "__module__", "") == name:
                    yield v


@contextlib.contextmanager
def simulate(machine: Machine | str):
    """Make the host wrappers choose their launches as on a GPU of ``machine`` (a :class:`Machine` or a target
    name), on a machine without one: :func:`triton_moe.target.simulate` (configs, warps and tile sizes as that
    target's launch; with a device, that device's own tables), plus ``ON_GPU`` set in :mod:`triton_moe.mode`
    and the modules that copied it (``mode.check_interpreter_dtype`` refuses bf16 in interpreter mode, and
    a GPU launch takes bf16), and the triton_moe ``functools`` caches cleared on entry and exit. Only host-side
    choices change; no kernel is launched (use it with :func:`capture_launches`)."""
    from .. import mode
    from .. import target as _target

    machine = machine if isinstance(machine, Machine) else Machine(machine)
    t = TARGETS[machine.target]
    sim = _target.Target(t.vendor, machine.target, _target.slug(machine.device) if machine.device else "")
    patched = [(mod, mod.ON_GPU) for name, mod in list(sys.modules.items())
               if (name == "triton_moe" or name.startswith("triton_moe.")) and isinstance(vars(mod).get("ON_GPU"), bool)]
    for c in _lru_caches():
        c.cache_clear()
    try:
        for mod, _ in patched:
            mod.ON_GPU = True
        with _target.simulate(sim):
            yield machine
    finally:
        for mod, value in patched:
            mod.ON_GPU = value
        for c in _lru_caches():
            c.cache_clear()


# --------------------------------------------------------------------------------------------------
# Example launches -> specs


def _dtype_of(spec: CompileSpec) -> str:
    """The name suffix of a spec: its first floating-point tensor's dtype (``bf16``), else its first tensor's
    (``i32``: the dispatch's ids), else ``int``."""
    ptrs = [ty[1:] for ty in spec.signature.values() if ty.startswith("*")]
    floats = [t for t in ptrs if t.startswith(("bf", "fp"))]
    return (floats or ptrs or ["int"])[0]


def spec_name(spec: CompileSpec, label: str) -> str:
    """``<kernel>[<tile> <other constexprs> w<warps> s<stages> <options>] (<label>) <dtype>``: e.g.
    ``tiled_matmul[128x128x64 GROUP_M=8 w8 s4] (M=4096) bf16``. Unit strides (constexpr 1) are left out."""
    c = {k: v for k, v in spec.constexprs.items() if not k.startswith("stride") and v is not None}
    parts = []
    if all(k in c for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")):
        parts.append(f"{c.pop('BLOCK_M')}x{c.pop('BLOCK_N')}x{c.pop('BLOCK_K')}")
    parts += [f"{k}={v}" for k, v in c.items()]
    parts += [f"w{spec.num_warps}", f"s{spec.num_stages}" if spec.num_stages is not None else "s-default"]
    parts += [f"{k}={v}" for k, v in sorted(spec.options.items())]
    kernel = getattr(spec.fn, "__name__", "?").removesuffix("_kernel")
    return f"{kernel}[{' '.join(parts)}]" + (f" ({label})" if label else "") + f" {_dtype_of(spec)}"


def _identity(spec: CompileSpec) -> tuple:
    return (id(spec.fn), repr(spec.signature), repr(spec.constexprs), repr(spec.attrs), repr(spec.amd_attrs),
            spec.num_warps, spec.num_stages, repr(sorted(spec.options.items())))


def specs_from_examples(examples, targets=None, only_kernels=None) -> list[CompileSpec]:
    """The specs of ``examples`` (``[(label, zero-argument callable that calls a host wrapper on meta
    tensors)]``, a kernel module's ``example_launches()``): each callable runs on every simulated
    :func:`machines` of ``targets`` under :func:`capture_launches`; each distinct launch becomes one spec
    (:func:`spec_from_launch`), compiled for the targets whose simulated GPU made it, named after the first
    example that made it. ``only_kernels``: keep launches of these kernel functions only (a module's own)."""
    examples = [item if len(item) == 3 else (*item, "") for item in examples]  # (label, call, module)
    for item in examples:
        if not (isinstance(item[0], str) and callable(item[1])):
            raise TypeError(f"an example launch must be (label, zero-argument callable), got {item[:2]!r}"[:300])
    found: dict = {}
    for machine in machines(targets):
        mine = examples
        if machine.kernels:  # a device with its own tables: the examples of those kernels' modules
            mine = [e for e in examples
                    if any(f"{op}_kernel" in jit_functions(sys.modules.get(e[2])) for op in machine.kernels)]
        with simulate(machine):
            for label, call, _ in mine:
                with capture_launches() as launches:
                    call()
                for launch in launches:
                    if only_kernels is not None and getattr(launch.fn, "__name__", "") not in only_kernels:
                        continue
                    spec = spec_from_launch("", launch)
                    key = _identity(spec)
                    if key not in found:
                        spec.name = spec_name(spec, label)
                        spec.targets, spec.vendors = (), ()
                        found[key] = spec
                    s = found[key]
                    if machine.target not in s.targets:
                        s.targets += (machine.target,)
                        s.vendors = tuple(dict.fromkeys(s.vendors + (TARGETS[machine.target].vendor,)))
    specs = list(found.values())
    seen: dict = {}
    for s in specs:  # two launches with the same name (they differ in what the name leaves out): number them
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = s.name.replace("[", f"#{seen[s.name]}[", 1)
    return specs


def _nvidia_tool(name: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    return ptxas if name == "ptxas" else str(Path(ptxas).with_name(name))


def compile_one(spec: CompileSpec, target: Target, module: str = "") -> CompileResult:
    import triton
    from triton.compiler import ASTSource

    kernel = getattr(spec.fn, "__name__", str(spec.fn))
    r = CompileResult(spec.name, kernel, module, target.name, shared_limit=target.shared_limit,
                      num_warps=spec.num_warps, num_stages=spec.num_stages or 0)
    t0 = time.perf_counter()
    try:
        if not hasattr(spec.fn, "cache_key"):
            raise TypeError(f"{kernel} is a {type(spec.fn).__name__}, not a compilable @triton.jit function "
                            "(was TRITON_INTERPRET=1 set when it was defined?)")
        src = ASTSource(spec.fn, dict(spec.signature), constexprs=dict(spec.constexprs),
                        attrs=_attr_paths(spec.fn, spec.attrs_for(target.vendor)))
        options = {"num_warps": spec.num_warps, **spec.options}
        if spec.num_stages is not None:  # None: the backend's default, as a launch that does not set it
            options["num_stages"] = spec.num_stages
        log = io.StringIO()  # Triton prints ptxas's own -v log here when TRITON_DUMP_PTXAS_LOG=1 (workers)
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=target.gpu_target(), options=options)
    except Exception as exc:  # noqa: BLE001 - every compiler failure is a result, not a crash
        r.seconds = time.perf_counter() - t0
        r.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
        return r
    r.ok = True
    r.shared = int(getattr(k.metadata, "shared", 0) or 0)
    if target.vendor == "nvidia":
        r.matrix = matrix_instruction(k.asm.get("ptx", ""), "nvidia")
        with tempfile.TemporaryDirectory() as d:
            cubin = Path(d) / "k.cubin"
            cubin.write_bytes(k.asm["cubin"])
            p = subprocess.run([_nvidia_tool("cuobjdump", target.arch), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True)
            usage = parse_cuobjdump(p.stdout)
            r.registers, r.stack = usage.get("registers", 0), usage.get("stack", 0)
            spills = parse_ptxas(log.getvalue()).get("spill_stores")
            if spills is not None:  # Triton's own ptxas run said it
                r.spill_bytes = spills
            elif r.stack:  # a cached compile with a stack frame: ask ptxas how much of it is spills
                ptx = Path(d) / "k.ptx"
                ptx.write_text(k.asm["ptx"])
                arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
                p = subprocess.run([_nvidia_tool("ptxas", target.arch), "-v", f"--gpu-name={arch}", str(ptx),
                                    "-o", str(Path(d) / "k.o")], capture_output=True, text=True)
                info = parse_ptxas(p.stderr)
                r.spill_bytes = info.get("spill_stores", -1)
    else:
        gcn = k.asm.get("amdgcn", "")
        info = parse_amdgcn(gcn)
        r.registers = info.get("vgpr_count", 0)
        r.agpr = info.get("agpr_count", 0)
        r.vgpr = info.get("arch_vgpr_count", r.registers - r.agpr)
        r.sgpr = info.get("sgpr_count", 0)
        r.vgpr_spill, r.sgpr_spill = info.get("vgpr_spill_count", 0), info.get("sgpr_spill_count", 0)
        r.occupancy, r.stack = info.get("occupancy", 0), info.get("scratch", 0)
        r.matrix = matrix_instruction(gcn, "amd")
    r.seconds = time.perf_counter() - t0
    return r


# --------------------------------------------------------------------------------------------------
# Finding the specs


def kernel_modules() -> list[str]:
    """Every module in triton_moe/kernels/, found from the files (nothing is imported here)."""
    return [f"triton_moe.kernels.{m.name}" for m in sorted(pkgutil.iter_modules([str(KERNELS_DIR)]), key=lambda m: m.name)
            if not m.name.startswith("_")]


def default_sources() -> list[str]:
    return [f"{m}:example_launches" for m in kernel_modules()]


def _ints(spec: CompileSpec) -> list[int]:
    return [v for v in spec.constexprs.values() if isinstance(v, int) and not isinstance(v, bool) and v > 1]


def register_pressure(spec: CompileSpec) -> float:
    """Proxy for registers per thread: the two largest tile sizes' product per warp."""
    top = sorted(_ints(spec), reverse=True)[:2] or [1]
    return (top[0] * (top[1] if len(top) > 1 else 1)) / max(1, spec.num_warps)


def staged_footprint(spec: CompileSpec) -> float:
    """Proxy for shared memory / LDS: pipeline stages times the tile sizes."""
    return max(1, spec.num_stages or 1) * sum(_ints(spec) or [1])


def _select(specs: list[CompileSpec], subset: str) -> list[CompileSpec]:
    if subset == "all":
        return specs
    if subset != "ci":
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    out = []
    for kernel in dict.fromkeys(getattr(s.fn, "__name__", "") for s in specs):
        mine = [s for s in specs if getattr(s.fn, "__name__", "") == kernel]
        mine = [s for s in mine if not any(str(v).endswith("fp16") for v in s.signature.values())] or mine
        chosen = []
        for t in TARGETS:  # every target gets its own worst specs (tables differ per target)
            runs = [s for s in mine if runs_on(s, t)]
            by_regs = sorted(runs, key=register_pressure, reverse=True)
            by_smem = sorted(runs, key=staged_footprint, reverse=True)
            n = sum(s in chosen for s in runs)
            for a, b in zip(by_regs, by_smem):
                for s in (a, b):
                    if s not in chosen and n < CI_PER_KERNEL:
                        chosen.append(s)
                        n += 1
        out += [s for s in mine if s in chosen]  # keep the module's order
    return out


def runs_on(spec: CompileSpec, target: str) -> bool:
    """Whether the check compiles ``spec`` for ``target`` (its vendors, and its targets if it names any)."""
    return TARGETS[target].vendor in (tuple(spec.vendors) or ("nvidia", "amd")) and (not spec.targets or target in spec.targets)


def jit_functions(mod) -> list[str]:
    """Names of the @triton.jit functions a module defines (not those it imports), compiled or interpreted."""
    if mod is None:
        return []
    return sorted(k for k, v in vars(mod).items() if hasattr(v, "arg_names")
                  and getattr(getattr(v, "fn", None), "__module__", None) == mod.__name__)


def _kernel_module(fn, default: str = "") -> str:
    return getattr(getattr(fn, "fn", None), "__module__", None) or default


def load_source(source: str) -> tuple[list, str]:
    """``"module:function"`` -> (what it returns: example launches ``[(label, callable)]`` or
    :class:`CompileSpec` objects, a note). ``"module:function|{json}"`` calls it with those keyword arguments
    (e.g. one config to try). A module without the function gives nothing and, if it defines @triton.jit
    functions, a note naming them (unless another module's examples launch them: see :func:`load_specs`)."""
    source, _, args = source.partition("|")
    kwargs = json.loads(args) if args else {}
    module, _, func = source.partition(":")
    mod = importlib.import_module(module)
    fn = getattr(mod, func or "example_launches", None)
    if fn is None:
        jitted = jit_functions(mod)
        if not jitted:  # host code only; nothing escapes the check
            return [], ""
        return [], f"{module} has no {func or 'example_launches'}(); its kernels {', '.join(jitted)} are not checked"
    return list(fn(**kwargs)), ""


def load_specs(sources, subset: str = "all", targets=None) -> tuple[list[tuple[str, CompileSpec]], list[str]]:
    """Every spec of ``sources`` as ``(module of its kernel, spec)``, selected by ``subset``, and the problems
    (``"source: error"``; notes start with ``"note:"``). Example launches of all sources run together
    (:func:`specs_from_examples`): a launch made by several modules' examples (``fused_moe``'s forward launches
    the fused gate+up kernel too) is one spec, listed under the module that defines its kernel."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    examples, given, problems, notes = [], [], [], {}
    for source in sources:
        try:
            items, note = load_source(source)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{source}: {type(exc).__name__}: {exc}"[:2000])
            continue
        if note:
            notes[source.partition(":")[0]] = note
        module = source.partition("|")[0].partition(":")[0]
        for item in items:
            if isinstance(item, CompileSpec):
                given.append((module, item))
            elif isinstance(item, tuple) and len(item) == 2:
                examples.append((*item, module))
            else:
                problems.append(f"{source}: returned a {type(item).__name__}; expected (label, callable) pairs")
                break
    specs = list(given)
    if examples:
        try:
            specs += [(_kernel_module(s.fn, "?"), s) for s in specs_from_examples(examples, targets)]
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{', '.join(sources)}: {type(exc).__name__}: {exc}"[:2000])
    launched = {_kernel_module(s.fn) + ":" + getattr(s.fn, "__name__", "") for _, s in specs}
    for module, note in notes.items():
        mod = sys.modules.get(module)
        if mod is None or any(f"{module}:{k}" not in launched for k in jit_functions(mod)):
            problems.append(f"note: {note}")
    chosen = {id(s) for s in _select([s for _, s in specs], subset)}
    return [(m, s) for m, s in specs if id(s) in chosen], problems


# --------------------------------------------------------------------------------------------------
# Workers


def _drop_interpreted_modules() -> None:
    """Forget every ``triton_moe`` module imported so far except the package, :mod:`triton_moe.mode` and this
    one. ``import triton_moe`` imports kernel modules (the package exports ``fused_moe``) while
    TRITON_INTERPRET=1 is set, so their kernels are interpreter functions; dropped, they are imported again by
    :func:`load_specs`, now as real JITFunctions. ``mode`` is kept (importing it again would set the flag
    again) and so is this module (one ``CompileSpec`` class). Triton itself was imported before the flag was
    set (:data:`_WORKER_BOOT`)."""
    keep = {"triton_moe", "triton_moe.mode", "triton_moe.tools", __name__}
    for name in [m for m in sys.modules if m.startswith("triton_moe.") and m not in keep]:
        del sys.modules[name]


def _spec_to_json(module: str, spec: CompileSpec) -> dict:
    d = {k: getattr(spec, k) for k in ("name", "signature", "constexprs", "num_warps", "num_stages", "options",
                                        "attrs", "vendors", "targets", "amd_attrs")}
    return {**d, "module": module, "kernel_module": _kernel_module(spec.fn, module),
            "kernel": getattr(spec.fn, "__name__", "")}


def _spec_from_json(d: dict) -> tuple[str, CompileSpec]:
    d = dict(d)
    module, kernel_module, kernel = d.pop("module"), d.pop("kernel_module"), d.pop("kernel")
    fn = getattr(importlib.import_module(kernel_module), kernel)
    d["vendors"], d["targets"] = tuple(d["vendors"]), tuple(d["targets"])
    return module, CompileSpec(fn=fn, **d)


def _worker(specs_file: Path, targets: list[str], shard: int, shards: int, out: Path) -> int:
    """Compile this worker's share of the (spec, target) pairs of ``specs_file`` (written by
    :func:`run_check`); write one JSON line per event to ``out``."""
    os.environ.pop("TRITON_INTERPRET", None)  # triton_moe.mode set it (no GPU here); kernels must be real
    _drop_interpreted_modules()
    from triton import knobs

    if getattr(knobs.runtime, "interpret", False):
        raise RuntimeError("TRITON_INTERPRET is still on in the cross-compile worker")
    with open(out, "a") as f:
        def emit(**kw):
            f.write(json.dumps(kw) + "\n")
            f.flush()

        pairs = []
        for d in json.loads(Path(specs_file).read_text()):
            try:
                module, spec = _spec_from_json(d)
            except Exception as exc:  # noqa: BLE001
                if shard == 0:
                    emit(event="source_error", source=d.get("kernel_module", "?"), error=f"{type(exc).__name__}: {exc}"[:2000])
                continue
            pairs += [(module, spec, TARGETS[t]) for t in targets if runs_on(spec, t)]
        for i, (module, spec, target) in enumerate(pairs):
            if i % shards != shard:
                continue
            emit(event="start", spec=spec.name, target=target.name, module=module,
                 kernel=getattr(spec.fn, "__name__", "?"))
            emit(event="result", **asdict(compile_one(spec, target, module)))
    return 0


# A worker imports Triton before the package: ``import triton_moe`` sets TRITON_INTERPRET=1 (no GPU here) and,
# as the package exports fused_moe, imports Triton and kernel modules while it is set. Triton's own jit
# functions (tl.cdiv, ...) must not be interpreter functions; the course's are imported again once the flag is
# cleared (:func:`_drop_interpreted_modules`).
_WORKER_BOOT = ("import triton, triton.language, sys; from triton_moe.tools.crosscompile import main; "
                "sys.exit(main(['_worker'] + sys.argv[1:]))")


def _env_for_workers(cache_dir: Path, extra_path: str = "") -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # spills from the ptxas run Triton makes anyway (no second run)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), extra_path, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_check(sources: list[str] | None = None, targets: list[str] | None = None, subset: str = "all",
              jobs: int | None = None, cache_dir: Path | str | None = None, lessons: list[str] = (),
              timeout: float = 1800) -> tuple[list[CompileResult], list[str]]:
    """Compile every example launch of ``sources`` ("module:function"; default: every kernel module's
    ``example_launches``) for ``targets``: the specs are built here (:func:`load_specs`), compiled in ``jobs``
    worker processes.

    Returns (results, errors): ``errors`` are problems that are no compile result (a module that failed to
    import, a worker that crashed); notes about modules without specs start with "note:". ``lessons`` are
    sources whose failures are expected (shown in the report, never counted)."""
    sources = list(sources) if sources is not None else default_sources()
    targets = list(targets or TARGETS)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    cache_dir = Path(cache_dir or os.environ.get("TRITON_MOE_CC_CACHE", DEFAULT_CACHE))
    cache_dir.mkdir(parents=True, exist_ok=True)
    results, errors = [], []
    groups = [(sources, False)] + ([(list(lessons), True)] if lessons else [])
    for srcs, is_lesson in groups:
        if not srcs:
            continue
        specs, problems = load_specs(srcs, subset, targets)  # here, once: the workers only compile
        r, e = _run_workers(specs, targets, jobs, cache_dir, timeout)
        for x in r:
            x.lesson = is_lesson
        results += r
        errors += [] if is_lesson else problems + e
    return results, errors


def _run_workers(specs, targets, jobs, cache_dir, timeout, extra_path: str = ""):
    """Compile ``specs`` (``(module, CompileSpec)`` pairs, or their :func:`_spec_to_json` dicts) for
    ``targets`` in ``jobs`` workers; ``extra_path`` goes on their PYTHONPATH (where a kernel's module lies)."""
    env = _env_for_workers(cache_dir, extra_path)
    with tempfile.TemporaryDirectory(prefix="triton_moe_cc_") as d:
        specs_file = Path(d) / "specs.json"
        specs_file.write_text(json.dumps([s if isinstance(s, dict) else _spec_to_json(*s) for s in specs]))
        procs = []
        for i in range(jobs if specs else 0):
            out = Path(d) / f"w{i}.jsonl"
            out.touch()
            cmd = [sys.executable, "-c", _WORKER_BOOT, str(out), str(i), str(jobs), str(specs_file), ",".join(targets)]
            procs.append((subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), out))
        results, errors = [], []
        deadline = time.monotonic() + timeout
        for p, out in procs:
            try:
                log, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                log, _ = p.communicate()
                errors.append(f"a cross-compile worker ran past {timeout:.0f} s and was stopped")
            started = None
            for line in out.read_text().splitlines():
                ev = json.loads(line)
                kind = ev.pop("event")
                if kind == "start":
                    started = ev
                elif kind == "result":
                    results.append(CompileResult(**ev))
                    started = None
                elif kind == "source_error":
                    errors.append(f"{ev['source']}: {ev['error']}")
                elif kind == "note":
                    errors.append(f"note: {ev['note']}")
            if p.returncode != 0:
                tail = (log or "").strip().splitlines()[-3:]
                if started:  # the compiler died on this one
                    results.append(CompileResult(started["spec"], started["kernel"], started["module"],
                                                 started["target"], shared_limit=TARGETS[started["target"]].shared_limit,
                                                 error=f"the compiler crashed (worker exit code {p.returncode}): "
                                                       + " | ".join(tail)))
                else:
                    errors.append(f"a cross-compile worker failed (exit code {p.returncode}): " + " | ".join(tail))
    order = {t: i for i, t in enumerate(TARGETS)}
    results.sort(key=lambda r: (r.module, r.kernel, r.spec, order.get(r.target, 99)))
    return results, errors


def failures(results: list[CompileResult], errors: list[str]) -> list[str]:
    """Every reason the check fails, one line each (lessons and notes excluded)."""
    out = [e for e in errors if not e.startswith("note:")]
    out += [f"{r.spec} on {r.target}: {p}" for r in results if not r.lesson for p in r.problems()]
    return out


def warnings(results: list[CompileResult]) -> list[str]:
    """Every warning (reported, not failing), one line each (lessons excluded)."""
    return [f"{r.spec} on {r.target}: {w}" for r in results if not r.lesson for w in r.warnings()]


# --------------------------------------------------------------------------------------------------
# The report


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n else "0"


def _row(r: CompileResult) -> str:
    amd = TARGETS[r.target].vendor == "amd"
    if not r.ok:
        err = error_summary(r.error)[:160].replace("|", "\\|")
        return f"| {r.spec} | **compile error**: {err} | | | | |" + (" |" if amd else "")
    if amd:
        regs = f"{r.registers} ({r.vgpr} V + {r.agpr} A), {r.sgpr} S"
        spills = ", ".join(f"{n} {k}" for n, k in ((r.vgpr_spill, "VGPR"), (r.sgpr_spill, "SGPR")) if n) or "0"
    else:
        regs = str(r.registers)
        spills = f"{r.spill_bytes} B" if r.spill_bytes > 0 else ("0" if not r.stack else f"stack {r.stack} B")
    shared = f"{_kb(r.shared)} ({100 * r.shared / r.shared_limit:.0f}%)"
    probs = [p.split(" > ")[0].replace("needs", "overflow: needs") for p in r.problems()]
    verdict = "ok" if not probs else "**" + "; ".join(probs) + "**"
    if r.warnings() and not probs:
        verdict = "ok, warning: " + "; ".join(r.warnings())
    row = f"| {r.spec} | {verdict} | {regs} | {spills} | {shared} | {r.matrix or '-'} |"
    return row + (f" {r.occupancy or ''} |" if amd else "")


def _table(rs: list[CompileResult], target: Target) -> list[str]:
    amd = target.vendor == "amd"
    head = (f"| spec | result | VGPRs per lane (arch + acc), SGPRs | spills | LDS (of limit) | matrix instr | "
            f"waves / SIMD |" if amd else
            "| spec | result | registers / thread | spills | shared memory (of limit) | matrix instr |")
    lines = [f"**{target.name}** ({target.gpu}, {'wavefront' if amd else 'warp'} {target.warp_size}, "
             f"{'LDS' if amd else 'shared memory'} limit {_kb(target.shared_limit)} per "
             f"{'workgroup' if amd else 'block'})", "", head, "|" + " --- |" * head.count(" | ") + ""]
    lines[-1] = "|" + " --- |" * (head.count("|") - 1)
    return lines + [_row(r) for r in rs] + [""]


def _summary(results: list[CompileResult]) -> list[str]:
    targets = [t for t in TARGETS if any(r.target == t for r in results)]
    lines = ["| kernel | " + " | ".join(targets) + " |", "|" + " --- |" * (len(targets) + 1)]
    for kernel in dict.fromkeys(r.kernel for r in results):
        cells = []
        for t in targets:
            rs = [r for r in results if r.kernel == kernel and r.target == t]
            bad = sum(not r.passed for r in rs)
            warn = sum(bool(r.passed and r.warnings()) for r in rs)
            cells.append("-" if not rs else (f"**{bad} of {len(rs)} fail**" if bad else f"{len(rs)} ok")
                         + (f" ({warn} with a warning)" if warn else ""))
        lines.append(f"| `{kernel}` | " + " | ".join(cells) + " |")
    return lines + [""]


def format_report(results: list[CompileResult], errors: list[str], command: str = "", subset: str = "all") -> str:
    import triton

    fails = failures(results, errors)
    warns = warnings(results)
    checked = [r for r in results if not r.lesson]
    verdict = f"- verdict: **{'PASS' if not fails else 'FAIL'}**" + (f" ({len(fails)} problems)" if fails else "")
    if warns:
        verdict += f", {len(warns)} warnings (SGPRs spilled into VGPR lanes, listed under Warnings)"
    lines = ["# Cross-compilation report", "",
             "Every kernel launch of the examples (`example_launches()` of each `triton_moe/kernels/*.py`), as the "
             "host wrappers make it on a simulated GPU of each target, compiled on a CPU with "
             "`triton.compile` for NVIDIA sm_90 / sm_80 and AMD gfx942 / gfx90a. Nothing here ran on a GPU: "
             "these are compiler outputs (registers, spills, shared memory / LDS, matrix instructions), not "
             "timings. Generated by `triton_moe/tools/crosscompile.py`; chapter 6 reads it.", "",
             f"- command: `{command or 'python -m triton_moe.tools.crosscompile --report docs/compile-report.md'}`",
             f"- triton {triton.__version__}, {_dt.date.today().isoformat()}, subset `{subset}`: "
             f"{len({r.spec for r in checked})} specs, {len(checked)} compiles",
             *_provenance(), verdict,
             "", "What is compiled: what a GPU of each target runs. Specs are the launches the host wrappers make, "
             "specialised as Triton's JIT specialises a real launch: ints equal to 1 (unit strides) become "
             "constants, 16-divisible ints and 16-byte aligned pointers carry `tt.divisibility=16`, and on AMD "
             "tensors under 2 GB carry `tt.pointer_range=32`. Every spec is recorded from a host wrapper called on "
             "`meta` tensors while the tool simulates a GPU of one target (its tables, its vendor's launch "
             "choices; a device with its own tuned table is simulated as well), so each launch is compiled for "
             "the targets whose GPU makes it (e.g. a table tuned on an H100 for sm_90 only). The `cpu` tables "
             "are not compiled: only Triton's interpreter runs them, and it compiles nothing.", "",
             "How to read it: a spec fails if it does not compile, spills registers to memory (NVIDIA local "
             "memory; AMD scratch: VGPR spills, or SGPR spills once no VGPR lane is left), or needs more "
             "shared memory / LDS than one block / workgroup may use. SGPRs spilled into VGPR lanes (no "
             "scratch memory) are a warning, not a failure: see the docstring of `triton_moe/tools/crosscompile.py`. "
             "NVIDIA registers come from `cuobjdump`, spilled bytes from `ptxas -v`; AMD numbers from the "
             "AMDGCN metadata (VGPRs are allocated in granules, so the total can exceed arch + acc by a few); "
             "waves / SIMD is the AMD compiler's occupancy estimate.", ""]
    if checked:
        lines += ["## Summary", ""] + _summary(checked)
    if warns:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warns] + [""]
    notes = [e[len("note: "):] for e in errors if e.startswith("note:")]
    other = [e for e in errors if not e.startswith("note:")]
    if other:
        lines += ["## Errors", ""] + [f"- {e.splitlines()[0][:300]}" for e in other] + [""]
    if notes:
        lines += ["## Modules without example launches", ""] + [f"- {n}" for n in notes] + [""]
    for lesson in (False, True):
        rs = [r for r in results if r.lesson == lesson]
        if not rs:
            continue
        if lesson:
            lines += ["## Lessons: configs expected to fail (not part of the check)", "",
                      "Planted configs that chapter 6 reads; the tests prove the check rejects them.", ""]
        for (module, kernel) in dict.fromkeys((r.module, r.kernel) for r in rs):
            lines += [f"{'###' if lesson else '##'} `{kernel}` ({module.replace('.', '/')}.py)", ""]
            for t in TARGETS.values():
                sub = [r for r in rs if r.module == module and r.kernel == kernel and r.target == t.name]
                if sub:
                    lines += _table(sub, t)
    return "\n".join(lines).rstrip() + "\n"


def _provenance() -> list[str]:
    """Report lines naming the commit and the config tables the report reflects (from git; none without)."""
    def git(*args):
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""

    head = git("log", "-1", "--format=%h %ad %s", "--date=short")
    if not head:
        return []
    dirty = git("status", "--porcelain", "--", "triton_moe")
    tables = []
    for p in sorted((ROOT / "triton_moe" / "tables").glob("*.json")):
        rel = p.relative_to(ROOT).as_posix()
        changed = git("status", "--porcelain", "--", rel)
        tables.append(f"`{p.name}` ({'uncommitted' if changed else git('log', '-1', '--format=%h', '--', rel) or '?'})")
    return [f"- source: commit {head}" + (" plus uncommitted changes under triton_moe/" if dirty else ""),
            "- tables (last commit of each): " + ", ".join(tables)]


def write_report(path: Path, results: list[CompileResult], errors: list[str], **kw) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_report(results, errors, **kw))
    lines = ",\n".join(json.dumps(asdict(r), separators=(",", ":")) for r in results)  # one result a line
    path.with_suffix(".json").write_text(f'{{"errors": {json.dumps(errors)},\n"results": [\n{lines}\n]}}\n')


def load_report(path: Path | str) -> list[CompileResult]:
    """The results of a committed report (its ``.json`` twin)."""
    data = json.loads(Path(path).with_suffix(".json").read_text())
    return [CompileResult(**r) for r in data["results"]]


LESSON_SOURCES = ["triton_moe.kernels.portability_demo:planted_spill_launches",
                  "triton_moe.kernels.portability_demo:planted_nvidia_spill_launches",
                  "triton_moe.kernels.portability_demo:planted_overflow_launches",
                  "triton_moe.kernels.portability_demo:planted_error_launches"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        out, shard, shards, specs_file, targets = argv[1:]
        return _worker(Path(specs_file), targets.split(","), int(shard), int(shards), Path(out))
    ap = argparse.ArgumentParser(prog="python -m triton_moe.tools.crosscompile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, help="write a markdown report here (and its .json twin)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, default all four")
    ap.add_argument("--source", action="append", help="module:function returning example launches (default: "
                                                      "every kernel module's example_launches); repeatable")
    ap.add_argument("--subset", choices=SUBSETS, default="all")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: min(2, cores))")
    ap.add_argument("--lessons", action="store_true", help="also compile chapter 6's planted failing configs "
                                                          "(reported, never counted)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    results, errors = run_check(a.source, a.targets.split(","), a.subset, a.jobs,
                                lessons=LESSON_SOURCES if a.lessons else ())
    dt = time.perf_counter() - t0
    for r in results:
        probs, warns = r.problems(), r.warnings()
        tag = "lesson" if r.lesson else ("FAIL" if probs else ("warn" if warns else "ok"))
        print(f"{tag:6s} {r.target:7s} {r.spec}: " + ("; ".join(probs or warns) if probs or warns else
              f"regs {r.registers}, shared {r.shared} B, {r.matrix or 'no matrix instr'}"))
    for e in errors:
        print(e.splitlines()[0])
    fails = failures(results, errors)
    if a.report:
        cmd = "python -m triton_moe.tools.crosscompile " + " ".join(argv)
        write_report(a.report, results, errors, command=cmd.strip(), subset=a.subset)
        print(f"wrote {a.report} and {a.report.with_suffix('.json')}")
    n = len([r for r in results if not r.lesson])
    warns = warnings(results)
    print(f"{n} compiles in {dt:.1f} s: " + ("PASS" if not fails else f"FAIL ({len(fails)} problems)")
          + (f", {len(warns)} warnings" if warns else ""))
    for f in fails:
        print("  " + f.splitlines()[0])
    for w in warns:
        print("  warning: " + w)
    return 1 if fails else 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: one CompileSpec class for isinstance checks.
    from triton_moe.tools.crosscompile import main as _main

    sys.exit(_main())
