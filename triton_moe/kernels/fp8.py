"""Chapter 8: fp8 experts -- half the bytes of bf16, in DeepSeek-V3's block-scaled format or weight-only.

Two schemes, one pair of kernels (a ``BLOCK_SCALED`` constexpr chooses):

- **"block" (w8a8, DeepSeek-V3's format)**: each weight matrix ``[N, K]`` is fp8 e4m3 with one fp32
  ``scale_inv`` per 128x128 block, ``[ceil(N/128), ceil(K/128)]`` (the checkpoint's ``weight_scale_inv``):
  ``w = fp8 * scale_inv``. Activations are quantised per token in groups of 128 along K (one fp32 scale per
  group, ``[M, ceil(K/128)]``) by :func:`quantize_act` (one small launch). Each K step of the GEMM lies in one
  K block, so the fp8 x fp8 dot of that step is exact up to fp32 accumulation and is multiplied by
  ``x_scale[row] * w_scale[column's block]`` before it joins the fp32 accumulator: the scales are applied
  once per K block, in the loop.
- **"channel" (w8a16, weight-only)**: one fp32 scale per output column (``[E, N]``); activations stay in
  bf16 (fp32 or fp16 on the CPU). The fp8 tile is upcast to the activation dtype before the dot, and since
  the scale is constant along K it is applied once, in the epilogue.

The fp8 format is chosen in ONE place, :func:`fp8_dtype` (the kernels read it from the tensors' dtype and
take its largest value and smallest normal exponent as constexprs from :func:`fp8_format`):

- NVIDIA sm_89+ and the CPU interpreter: ``torch.float8_e4m3fn`` (OCP e4m3: bias 7, max 448, NaN = 0x7f/0xff,
  a negative zero); AMD gfx942 (MI300X) and gfx90a: ``torch.float8_e4m3fnuz`` (bias 8, max 240, NaN = 0x80,
  no negative zero): the same bits are worth half as much. gfx950 uses e4m3fn.
- NVIDIA sm_80 (A100) is **refused with a clear error**: Triton compiles no e4m3 (fp8e4nv) there at all, not
  even the load and upcast the weight-only path would need; use the bf16 ``fused_moe``.
- The CPU interpreter cannot run e4m3fnuz ("fail to convert fp8e4b8"): :func:`check_runnable` says so.

Rounding is written out (:func:`round_to_fp8`: saturate, round to nearest even on the e4m3 grid) before the
cast, so every backend casts a value it represents exactly: NVIDIA's ``cvt.rn.satfinite``, AMD's
``v_cvt_pk_fp8_f32`` and the interpreter (whose own fp32 -> fp8 cast rounds ties up and drops the carry:
31.2 becomes 16, 500 becomes 256) give the same bits as ``torch``'s cast.

Everything is graph-capturable: static grids (the dispatch's worst case, programs past
``num_tokens_post_padded`` return at once), no host synchronisation. Launch configs: module-level tables
(:data:`CPU_TABLES`, :data:`GPU_TABLES`), **untuned** (a reasonable fallback until a tuning run writes
tables), chosen with :func:`triton_moe.configs.pick`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import configs, validate
from ..configs import KernelConfig
from ..target import current as current_target
from ..mode import ON_GPU, check_interpreter_dtype, default_dtype
from .down_combine import SUM_BLOCK_N, moe_sum_kernel
from .fused_gate_up import blocks_bound, check_dispatch
from .grouped_gemm import grouped_launch_order
from .fused_moe import dispatch, route, route_dispatch, small_path

__all__ = ["QuantizedExperts", "fp8_dtype", "fp8_format", "quantize_experts", "from_deepseek_v3_checkpoint",
           "quantize_act", "fused_gate_up_fp8", "down_combine_fp8", "fused_experts_fp8", "fused_moe_fp8",
           "dequantize", "to_fnuz", "run_experts", "example_launches"]

GROUP = 128            # DeepSeek-V3's block: 128x128 weight blocks, 1x128 activation groups
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
SCHEMES = ("block", "channel")
INF = 1 << 30

# --------------------------------------------------------------------------------------------------
# The format: which fp8 on which target (the one place that decides)


def _this_target() -> str:
    t = current_target()   # detected once for the whole package (and simulated by the compile check)
    return t.arch if t.on_gpu else "cpu"


def fp8_dtype(target: str | None = None) -> torch.dtype:
    """The e4m3 dtype of a target: ``"cpu"``, ``"sm_90"`` (any ``sm_NN``), ``"gfx942"``, ``"gfx90a"``,
    ``"gfx950"``; None = this machine. e4m3fn on NVIDIA sm_89+, gfx950 and the CPU; e4m3fnuz on gfx942 and
    gfx90a. Raises ValueError on NVIDIA below sm_89 (Triton has no e4m3 there: use bf16)."""
    target = _this_target() if target is None else target
    if not isinstance(target, str):
        raise ValueError(f"target must be a string such as 'sm_90' or 'gfx942', got {type(target).__name__}")
    if target == "cpu":
        return torch.float8_e4m3fn
    m = re.fullmatch(r"sm_(\d+)a?", target)
    if m:
        if int(m.group(1)) < 89:
            raise ValueError(f"target {target}: fp8 experts need NVIDIA sm_89 or newer (Triton refuses e4m3, "
                             "fp8e4nv, below sm_89, even for a load and upcast); use the bf16 fused_moe there")
        return torch.float8_e4m3fn
    if target in ("gfx942", "gfx940", "gfx941", "gfx90a"):
        return torch.float8_e4m3fnuz
    if target == "gfx950":
        return torch.float8_e4m3fn
    raise ValueError(f"target must be 'cpu', 'sm_NN' or an AMD gfx name (gfx942, gfx90a, gfx950), got {target!r}")


def fp8_format(dtype: torch.dtype) -> tuple[float, int]:
    """(largest finite value, exponent of the smallest normal) of an e4m3 dtype: the two numbers a kernel
    needs to round onto its grid. e4m3fn: (448, -6); e4m3fnuz: (240, -7)."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.float8_e4m3fnuz, got {dtype}")
    return float(torch.finfo(dtype).max), (-6 if dtype == torch.float8_e4m3fn else -7)


def check_runnable(name: str, t: torch.Tensor) -> None:
    """Refuse what the CPU interpreter cannot run: e4m3fnuz tensors (Triton 3.6: 'fail to convert fp8e4b8')."""
    if not ON_GPU and t.device.type == "cpu" and t.dtype == torch.float8_e4m3fnuz:
        raise ValueError(f"{name}: float8_e4m3fnuz (AMD's fp8) cannot run in the CPU interpreter; quantize "
                         "with dtype=torch.float8_e4m3fn on the CPU (fnuz runs on gfx942)")


# --------------------------------------------------------------------------------------------------
# Quantised weights


@dataclass(frozen=True, eq=False)   # eq=False: comparing tensors elementwise is not equality
class QuantizedExperts:
    """fp8 expert weights and their fp32 dequantisation scales (``w = fp8 * scale``, i.e. ``scale_inv``).

    ``w1, w3: [E, ffn, hidden]``, ``w2: [E, hidden, ffn]`` in one e4m3 dtype. ``scheme="block"``: scales
    ``[E, ceil(N/128), ceil(K/128)]`` (one per 128x128 block; ``block_shape=(128, 128)``);
    ``scheme="channel"``: scales ``[E, N]`` (one per output row of each matrix; ``block_shape=None``).
    Why an explicit type and not ``w1_scale=`` keywords on ``fused_moe``: six tensors, a scheme and a block
    shape must agree with each other; one object validated once cannot mix them up, and ``fused_moe``'s
    bf16 signature stays as it is."""
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    w1_scale: torch.Tensor
    w3_scale: torch.Tensor
    w2_scale: torch.Tensor
    scheme: str = "block"
    block_shape: tuple | None = (GROUP, GROUP)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be 'block' or 'channel', got {self.scheme!r}")
        want = (GROUP, GROUP) if self.scheme == "block" else None
        if (tuple(self.block_shape) if self.block_shape is not None else None) != want:
            raise ValueError(f"block_shape must be {want} for scheme {self.scheme!r}, got {self.block_shape}")
        validate.tensor("w1", self.w1, ndim=3, dtypes=FP8_DTYPES)
        E, F, H = self.w1.shape
        dev = self.w1.device
        validate.tensor("w3", self.w3, shape=(E, F, H), dtypes=(self.w1.dtype,), device=dev)
        validate.tensor("w2", self.w2, shape=(E, H, F), dtypes=(self.w1.dtype,), device=dev)
        for name, s, (n, k) in (("w1_scale", self.w1_scale, (F, H)), ("w3_scale", self.w3_scale, (F, H)),
                                ("w2_scale", self.w2_scale, (H, F))):
            shape = (E, -(-n // GROUP), -(-k // GROUP)) if self.scheme == "block" else (E, n)
            validate.tensor(name, s, shape=shape, dtypes=(torch.float32,), device=dev, contiguous=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.w1.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        """(experts, ffn, hidden)."""
        return tuple(self.w1.shape)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) in float32: what the fp8 weights stand for (the checkers' references start here)."""
        return (dequantize(self.w1, self.w1_scale, self.scheme), dequantize(self.w3, self.w3_scale, self.scheme),
                dequantize(self.w2, self.w2_scale, self.scheme))

    def to(self, device) -> "QuantizedExperts":
        """The same experts on another device."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def nbytes(self) -> int:
        """Bytes of the weights and their scales (what a forward streams for all experts)."""
        return sum(t.numel() * t.element_size() for t in (self.w1, self.w3, self.w2, self.w1_scale,
                                                            self.w3_scale, self.w2_scale))


def _expand(scale: torch.Tensor, n: int, k: int, scheme: str) -> torch.Tensor:
    """The per-element scale [E, n, k] of a scale tensor."""
    if scheme == "channel":
        return scale[:, :, None].expand(-1, n, k)
    return scale.repeat_interleave(GROUP, 1)[:, :n].repeat_interleave(GROUP, 2)[:, :, :k]


def dequantize(wq: torch.Tensor, scale: torch.Tensor, scheme: str = "block") -> torch.Tensor:
    """float32 ``wq * scale`` of stacked ``[E, N, K]`` fp8 weights (block or channel scales)."""
    E, n, k = wq.shape
    return wq.float() * _expand(scale.float(), n, k, scheme)


def _quantize_weight(w: torch.Tensor, scheme: str, dtype: torch.dtype):
    fmax, _ = fp8_format(dtype)
    E, n, k = w.shape
    q = torch.empty((E, n, k), dtype=dtype, device=w.device)
    scale = torch.empty((E, n) if scheme == "channel" else (E, -(-n // GROUP), -(-k // GROUP)), dtype=torch.float32,
                        device=w.device)
    for e in range(E):   # one expert at a time: full DeepSeek-V3 experts in fp32 would need 45 GB at once
        we = w[e].float()
        if scheme == "channel":
            amax = we.abs().amax(dim=1)
        else:
            pn, pk = -(-n // GROUP) * GROUP, -(-k // GROUP) * GROUP
            padded = torch.nn.functional.pad(we, (0, pk - k, 0, pn - n))
            amax = padded.view(pn // GROUP, GROUP, pk // GROUP, GROUP).abs().amax(dim=(1, 3))
        scale[e] = amax.clamp_min(1e-12) / fmax
        q[e] = (we / _expand(scale[e:e + 1], n, k, scheme)[0]).clamp(-fmax, fmax).to(dtype)
    return q, scale


def quantize_experts(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, scheme: str = "block",
                     dtype: torch.dtype | None = None) -> QuantizedExperts:
    """fp8 experts from float weights (``w1, w3: [E, ffn, hidden]``, ``w2: [E, hidden, ffn]``): per 128x128
    block (``"block"``) or per output row (``"channel"``), ``scale = amax / fp8 max``, round to nearest.
    ``dtype``: the e4m3 dtype, default :func:`fp8_dtype` of this machine."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be 'block' or 'channel', got {scheme!r}")
    dtype = fp8_dtype() if dtype is None else dtype
    fp8_format(dtype)
    floats = validate.FLOAT_DTYPES + (torch.float64,)
    validate.tensor("w1", w1, ndim=3, dtypes=floats)
    E, F, H = w1.shape
    validate.tensor("w3", w3, shape=(E, F, H), dtypes=floats, device=w1.device)
    validate.tensor("w2", w2, shape=(E, H, F), dtypes=floats, device=w1.device)
    (q1, s1), (q3, s3), (q2, s2) = (_quantize_weight(w, scheme, dtype) for w in (w1, w3, w2))
    return QuantizedExperts(q1, q3, q2, s1, s3, s2, scheme, (GROUP, GROUP) if scheme == "block" else None)


def to_fnuz(wq: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn weights as e4m3fnuz, exactly: the same bits are worth half in fnuz (exponent bias 8, not 7), so
    keep the bits and double the scale; fn's negative zero (0x80) is fnuz's NaN, so it becomes 0x00."""
    if wq.dtype != torch.float8_e4m3fn:
        raise ValueError(f"wq must be float8_e4m3fn, got {wq.dtype}")
    bits = wq.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    return bits.view(torch.float8_e4m3fnuz), scale * 2


_DS_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")


def from_deepseek_v3_checkpoint(tensors: dict, layer: int | None = None,
                                dtype: torch.dtype | None = None) -> QuantizedExperts:
    """The routed experts of one MoE layer as DeepSeek-V3's checkpoint stores them:
    ``model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight`` (e4m3fn, ``[out, in]``) and
    ``...weight_scale_inv`` (fp32, ``[ceil(out/128), ceil(in/128)]``). gate = w1, up = w3, down = w2.
    ``tensors``: a dict name -> tensor (e.g. from ``safetensors.torch.load_file``; other keys are ignored);
    ``layer``: which layer, needed when the dict holds experts of several. ``dtype``: the e4m3 dtype to
    return (default :func:`fp8_dtype` of this machine: on gfx942 the weights become fnuz, :func:`to_fnuz`)."""
    if not isinstance(tensors, dict):
        raise ValueError(f"tensors must be a dict of name -> tensor, got {type(tensors).__name__}")
    found: dict = {}
    for key, t in tensors.items():
        m = _DS_KEY.search(key) if isinstance(key, str) else None
        if m:
            found.setdefault(int(m.group(1)), {})[(int(m.group(2)), m.group(3), m.group(4))] = (key, t)
    if not found:
        raise ValueError("tensors holds no 'model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight' entries")
    if layer is None:
        if len(found) > 1:
            raise ValueError(f"tensors holds experts of layers {sorted(found)}: pass layer=")
        layer = next(iter(found))
    if layer not in found:
        raise ValueError(f"layer {layer} has no experts in tensors (layers present: {sorted(found)})")
    entries = found[layer]
    E = 1 + max(e for e, _, _ in entries)
    stacks = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for what in ("weight", "weight_scale_inv"):
            missing = [e for e in range(E) if (e, proj, what) not in entries]
            if missing:
                raise ValueError(f"layer {layer}: experts {missing[:8]} have no {proj}.{what}")
            ts = [entries[(e, proj, what)] for e in range(E)]
            want = (torch.float8_e4m3fn,) if what == "weight" else (torch.float32,)
            for key, t in ts:
                validate.tensor(key, t, ndim=2, dtypes=want, device=ts[0][1].device)
            stacks[proj, what] = torch.stack([t for _, t in ts]).contiguous()
    w1, w3, w2 = (stacks[p, "weight"] for p in ("gate_proj", "up_proj", "down_proj"))
    s1, s3, s2 = (stacks[p, "weight_scale_inv"] for p in ("gate_proj", "up_proj", "down_proj"))
    dtype = fp8_dtype() if dtype is None else dtype
    fp8_format(dtype)
    if dtype == torch.float8_e4m3fnuz:
        (w1, s1), (w3, s3), (w2, s2) = to_fnuz(w1, s1), to_fnuz(w3, s3), to_fnuz(w2, s2)
    return QuantizedExperts(w1, w3, w2, s1, s3, s2, "block", (GROUP, GROUP))


# --------------------------------------------------------------------------------------------------
# Activation quantisation: one small launch, one program per (token, group of 128)


@triton.jit
def round_to_fp8(v, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr):
    """v (fp32) saturated to [-FP8_MAX, FP8_MAX] and rounded to the nearest e4m3 value (ties to even), still
    in fp32: e4m3 keeps 3 fraction bits, so the grid step at exponent e is 2^(e-3) (below the smallest
    normal exponent MIN_EXP the step stays 2^(MIN_EXP-3): subnormals)."""
    v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, MIN_EXP)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)     # 2^(e-3), built from its bits: exact
    t = v / step
    r = tl.floor(t + 0.5)
    r = tl.where((r - t == 0.5) & (r % 2 != 0), r - 1.0, r)      # a tie went up to an odd value: go down
    return r * step


@triton.jit
def quantize_act_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm,
                        GROUP_K: tl.constexpr, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr):
    """q[m, k] = round(x[m, k] / s[m, g]) in fp8 and s[m, g] = amax(|x[m, group g]|) / FP8_MAX, for the
    group g = k // GROUP_K of one token m (program (m, g))."""
    m = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP_K + tl.arange(0, GROUP_K)
    mask = offs < K
    x = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    ### BEGIN SOLUTION
    # HINT: amax = tl.max(tl.abs(x), axis=0); scale = tl.maximum(amax, 1e-10) / FP8_MAX (an all-zero group stays finite)
    # HINT: q = round_to_fp8(x / scale, FP8_MAX, MIN_EXP): DIVIDE by the scale (w = q * scale dequantises)
    # HINT: store q cast to q_ptr.dtype.element_ty (mask), and the scale at s_ptr + m * stride_sm + g
    # STUB: pass
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax, 1e-10) / FP8_MAX
    q = round_to_fp8(x / scale, FP8_MAX, MIN_EXP)
    tl.store(q_ptr + m * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + m * stride_sm + g, scale)
    ### END SOLUTION


def quantize_act(x: torch.Tensor, dtype: torch.dtype | None = None, group: int = GROUP, out=None, scale=None):
    """Per-token-group fp8 quantisation: ``(q [M, K] fp8, scale [M, ceil(K/group)] fp32)`` with
    ``x ~= q * scale`` (``scale`` is a scale_inv, as DeepSeek-V3 stores it). One launch, grid
    ``(M, ceil(K/group))``. ``dtype``: e4m3fn or e4m3fnuz (default :func:`fp8_dtype`)."""
    validate.tensor("x", x, ndim=2, dtypes=validate.FLOAT_DTYPES, nonempty=True)
    dtype = fp8_dtype() if dtype is None else dtype
    fmax, min_exp = fp8_format(dtype)
    if not isinstance(group, int) or group < 16 or group & (group - 1):
        raise ValueError(f"group must be a power of two >= 16, got {group!r}")
    M, K = x.shape
    if out is None:
        out = torch.empty((M, K), dtype=dtype, device=x.device)
    validate.tensor("out", out, shape=(M, K), dtypes=(dtype,), device=x.device)
    check_runnable("out", out)
    if scale is None:
        scale = torch.empty((M, triton.cdiv(K, group)), dtype=torch.float32, device=x.device)
    validate.tensor("scale", scale, shape=(M, triton.cdiv(K, group)), dtypes=(torch.float32,), device=x.device)
    quantize_act_kernel[(M, triton.cdiv(K, group))](x, out, scale, K, x.stride(0), out.stride(0), scale.stride(0),
                                                    GROUP_K=group, FP8_MAX=fmax, MIN_EXP=min_exp, num_warps=1)
    return out, scale


# --------------------------------------------------------------------------------------------------
# Fused gate + up + SwiGLU on fp8 weights


@triton.jit(do_not_specialize=["num_slots", "top_k"])
def fused_gate_up_fp8_kernel(
    x_ptr, xs_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, out_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, EM, num_slots, top_k,
    stride_xm, stride_xk, stride_xsm, stride_xsk, stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_SCALED: tl.constexpr,
):
    """out[slot, n] = silu(x . w1[e, n]) * (x . w3[e, n]) with fp8 weights, as chapter 4's kernel.
    BLOCK_SCALED: x is fp8 with scales xs [M, K / GROUP_K], the weights' scales are [E, N / GROUP_N,
    K / GROUP_K] (each K step lies in one K block: BLOCK_K divides GROUP_K). Otherwise x is bf16/fp32, the
    weights have one scale per column (GROUP_N = 1, stride_sk = 0), applied after the loop."""
    pid_m, pid_n = grouped_launch_order(tl.program_id(0), EM // BLOCK_M, tl.cdiv(N, BLOCK_N), GROUP_M)

    num_post = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_token_ids_ptr + offs_m)
    row_mask = slot < num_slots                       # padding slots hold the sentinel num_slots
    token = tl.where(row_mask, slot // top_k, 0)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n_safe = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_offs = expert * stride_we + offs_n_safe[None, :] * stride_wn + offs_k[:, None] * stride_wk
    w1_ptrs = w1_ptr + w_offs
    w3_ptrs = w3_ptr + w_offs
    # Each column's scale row: its 128-row block (block scales) or itself (GROUP_N = 1: per channel).
    s_offs = expert * stride_se + (offs_n_safe // GROUP_N) * stride_sn
    xs_ptrs = xs_ptr + token * stride_xsm

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_remaining = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_remaining), other=0.0)
        w_gate = tl.load(w1_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        w_up = tl.load(w3_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        if BLOCK_SCALED:
            ### BEGIN SOLUTION
            # HINT: kb = (k * BLOCK_K) // GROUP_K is the K block (and the activation group) of this step
            # HINT: a_s = tl.load(xs_ptrs + kb * stride_xsk, mask=row_mask, other=0.0): one scale per row
            # HINT: w_s = tl.load(s1_ptr + s_offs + kb * stride_sk): one per column (its 128-row block); same for s3
            # HINT: acc_gate += tl.dot(a, w_gate) * (a_s[:, None] * w_s[None, :]): the fp8 dot returns fp32; keep acc fp32
            # STUB: pass
            kb = (k * BLOCK_K) // GROUP_K
            a_s = tl.load(xs_ptrs + kb * stride_xsk, mask=row_mask, other=0.0)
            s_gate = tl.load(s1_ptr + s_offs + kb * stride_sk)
            s_up = tl.load(s3_ptr + s_offs + kb * stride_sk)
            acc_gate += tl.dot(a, w_gate) * (a_s[:, None] * s_gate[None, :])
            acc_up += tl.dot(a, w_up) * (a_s[:, None] * s_up[None, :])
            ### END SOLUTION
        else:
            # Weight-only: fp8 -> the activation dtype is exact (e4m3 fits bf16, fp16 and fp32).
            acc_gate = tl.dot(a, w_gate.to(a.dtype), acc_gate)
            acc_up = tl.dot(a, w_up.to(a.dtype), acc_up)
        a_ptrs += BLOCK_K * stride_xk
        w1_ptrs += BLOCK_K * stride_wk
        w3_ptrs += BLOCK_K * stride_wk

    if not BLOCK_SCALED:
        # A per-column scale is the same for every K: one multiply per output, after the loop.
        ### BEGIN SOLUTION
        # HINT: load one scale per column from s1_ptr + s_offs (and s3_ptr + s_offs) and multiply acc_gate (acc_up) by it [None, :]
        # STUB: pass
        acc_gate = acc_gate * tl.load(s1_ptr + s_offs)[None, :]
        acc_up = acc_up * tl.load(s3_ptr + s_offs)[None, :]
        ### END SOLUTION
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ptrs = out_ptr + slot[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_n[None, :] < N))


# --------------------------------------------------------------------------------------------------
# Down projection + routing weight + top-k combine on fp8 weights


@triton.jit(do_not_specialize=["num_slots", "top_k", "split_k"])
def down_combine_fp8_kernel(
    h_ptr, hs_ptr, w2_ptr, s2_ptr, topk_weights_ptr, acc_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, EM, num_slots, top_k, split_k,
    stride_hm, stride_hk, stride_hsm, stride_hsk, stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk, stride_am, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_SCALED: tl.constexpr, ATOMIC: tl.constexpr,
):
    """acc[slot // top_k] += w * (h[slot] . w2[e, n]) (ATOMIC) or acc[slot] = ... with fp8 W2, as chapter 5's
    kernel; scales as in :func:`fused_gate_up_fp8_kernel` (h fp8 + hs when BLOCK_SCALED). N = hidden,
    K = ffn; program axis 1 is the K slice (its start is a multiple of GROUP_K when BLOCK_SCALED)."""
    pid_m, pid_n = grouped_launch_order(tl.program_id(0), EM // BLOCK_M, tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)

    num_post = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_M >= num_post:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_token_ids_ptr + offs_m)
    row_mask = slot < num_slots
    slot = tl.where(row_mask, slot, 0)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n_safe = offs_n % N
    k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + slot[:, None] * stride_hm + (k_start + offs_k[None, :]) * stride_hk
    w_ptrs = w2_ptr + expert * stride_we + offs_n_safe[None, :] * stride_wn + (k_start + offs_k[:, None]) * stride_wk
    s_offs = expert * stride_se + (offs_n_safe // GROUP_N) * stride_sn
    hs_ptrs = hs_ptr + slot * stride_hsm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = min(K, k_start + k_per_split)
    for k in range(0, tl.cdiv(k_end - k_start, BLOCK_K)):
        k_remaining = k_end - k_start - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < k_remaining), other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        if BLOCK_SCALED:
            kb = (k_start + k * BLOCK_K) // GROUP_K
            a_s = tl.load(hs_ptrs + kb * stride_hsk, mask=row_mask, other=0.0)
            w_s = tl.load(s2_ptr + s_offs + kb * stride_sk)
            acc += tl.dot(a, w) * (a_s[:, None] * w_s[None, :])
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
        a_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: the per-channel scale (weight-only), the routing weight, then the combine.
    weight = tl.load(topk_weights_ptr + slot, mask=row_mask, other=0.0)
    if BLOCK_SCALED:
        acc = acc * weight[:, None]
    else:
        acc = acc * (weight[:, None] * tl.load(s2_ptr + s_offs)[None, :])
    mask = row_mask[:, None] & (offs_n[None, :] < N)
    if ATOMIC:
        token = slot // top_k
        tl.atomic_add(acc_ptr + token[:, None] * stride_am + offs_n[None, :] * stride_an, acc, mask=mask,
                      sem="relaxed")
    else:
        tl.store(acc_ptr + slot[:, None] * stride_am + offs_n[None, :] * stride_an, acc, mask=mask)


# --------------------------------------------------------------------------------------------------
# Launch configs (untuned): BLOCK_K = 128, one activation group / weight block per K step.

CPU_TABLES = {   # the interpreter: about 7 ms per (program x K step) whatever the tile, so few big tiles
    "fused_gate_up_fp8": [(INF, KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4,
                                             num_stages=1))],
    "down_combine_fp8": [(INF, KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4,
                                            num_stages=1, extra={"SPLIT_K": 1}))],
}
GPU_TABLES = {   # a reasonable fallback, never tuned: small BLOCK_M and deep pipelines at decode. At most 64 fp32
    # accumulator values per thread per dot (the block scheme also holds each step's dot result before it is
    # scaled): the first guesses, 2 x 128x128 accumulators on 8 warps, spilled 0.5-1.9 KB on sm_90.
    "fused_gate_up_fp8": [
        (16, KernelConfig(16, 64, 128, 8, 4, 4)),
        (64, KernelConfig(32, 64, 128, 8, 4, 4)),
        (512, KernelConfig(64, 64, 128, 8, 8, 3)),
        (INF, KernelConfig(128, 64, 128, 8, 8, 3)),
    ],
    "down_combine_fp8": [
        (16, KernelConfig(16, 64, 128, 8, 4, 4, extra={"SPLIT_K": 2})),
        (64, KernelConfig(32, 64, 128, 8, 4, 4, extra={"SPLIT_K": 1})),
        (512, KernelConfig(64, 128, 128, 8, 8, 3, extra={"SPLIT_K": 1})),
        (INF, KernelConfig(128, 64, 128, 8, 8, 3, extra={"SPLIT_K": 1})),
    ],
}
B_TILES = {"fused_gate_up_fp8": 2, "down_combine_fp8": 1}
for _op in CPU_TABLES:   # the one chooser's registry: tables/<op>.<device|vendor>.json win once a tuning run writes them
    configs.register(configs.Op(_op, key="tokens M", cpu=tuple(CPU_TABLES[_op]), portable=tuple(GPU_TABLES[_op]),
                                weight_tiles=B_TILES[_op]))


def fit(cfg: KernelConfig, op: str, a_bytes: int, amd: bool) -> KernelConfig:
    """Make a config fit the target: AMD pipelines at most 2 stages and has 64 KB of LDS; bf16 activations
    (weight-only) double the x tile. Halve BLOCK_K (it must keep dividing 128), then drop stages. (Not
    :func:`configs.fit_shared`: here the x and weight tiles have different element sizes, 1-4 and 1 bytes.)"""
    limit = configs.AMD_LDS_BYTES if amd else configs.NVIDIA_SHARED_BYTES
    c = dataclasses.replace(cfg, num_stages=min(cfg.num_stages, 2) if amd else cfg.num_stages, extra=dict(cfg.extra))

    def staged(c):
        return c.num_stages * (c.BLOCK_M * c.BLOCK_K * a_bytes + B_TILES[op] * c.BLOCK_K * c.BLOCK_N)

    while staged(c) > limit and (c.BLOCK_K > 32 or c.num_stages > 2):
        if c.BLOCK_K > 32:
            c = dataclasses.replace(c, BLOCK_K=c.BLOCK_K // 2, extra=c.extra)
        else:
            c = dataclasses.replace(c, num_stages=c.num_stages - 1, extra=c.extra)
    return c


def pick_config(op: str, M: int, a_bytes: int = 1, vendor_name: str | None = None) -> KernelConfig:
    """The launch config of ``op`` ("fused_gate_up_fp8", "down_combine_fp8") at M tokens; ``a_bytes``: bytes
    per activation element (1 for w8a8, 2 or 4 weight-only)."""
    vendor_name = vendor_name or current_target().vendor
    cfg = configs.choose(op, M, target={"cpu": "cpu", "nvidia": "sm_90", "amd": "gfx942"}[vendor_name]
                         if vendor_name != current_target().vendor else None)
    return cfg if vendor_name == "cpu" else fit(cfg, op, a_bytes, vendor_name == "amd")


# --------------------------------------------------------------------------------------------------
# Host wrappers


def check_experts(q) -> tuple[int, int, int]:
    if not isinstance(q, QuantizedExperts):
        raise ValueError(f"q must be a QuantizedExperts (see quantize_experts), got {type(q).__name__}")
    check_runnable("q", q.w1)
    return q.shape


def scale_strides(q: QuantizedExperts, s: torch.Tensor) -> tuple[int, int, int, int]:
    """(stride_se, stride_sn, stride_sk, GROUP_N) of a weight's scale tensor."""
    if q.scheme == "block":
        return s.stride(0), s.stride(1), s.stride(2), GROUP
    return s.stride(0), s.stride(1), 0, 1


def check_activations(name, a, a_scale, q: QuantizedExperts, rows: int | None, k: int):
    """Activations of a GEMM: fp8 of q's dtype + fp32 group scales (block), or float (channel)."""
    if q.scheme == "block":
        validate.tensor(name, a, ndim=2, dtypes=(q.dtype,), nonempty=True, device=q.w1.device)
        validate.tensor(f"{name}_scale", a_scale, ndim=2, dtypes=(torch.float32,), device=q.w1.device,
                        contiguous=False)   # strided views are fine: the kernels take strides
        if tuple(a_scale.shape) != (a.shape[0], triton.cdiv(k, GROUP)):
            raise ValueError(f"{name}_scale must have shape [{a.shape[0]}, {triton.cdiv(k, GROUP)}] (one scale per row "
                             f"per group of {GROUP} columns: the activation groups must match the weights' {GROUP}-wide "
                             f"K blocks), got {list(a_scale.shape)}")
    else:
        validate.tensor(name, a, ndim=2, dtypes=validate.FLOAT_DTYPES, nonempty=True, device=q.w1.device)
        if a.device.type == "cpu":   # (meta tensors: the cross-compile check records launches for GPUs)
            check_interpreter_dtype(name, a.dtype)
        if a_scale is not None:
            raise ValueError(f"{name}_scale must be None for scheme 'channel' (activations stay unquantised)")
    if a.shape[1] != k or (rows is not None and a.shape[0] != rows):
        raise ValueError(f"{name} must have shape [{rows if rows is not None else '*'}, {k}], got {list(a.shape)}")


def check_block_k(cfg: KernelConfig, q: QuantizedExperts) -> None:
    if q.scheme == "block" and GROUP % cfg.BLOCK_K:
        raise ValueError(f"config.BLOCK_K must divide the scale block {GROUP} (one scale per K step), got {cfg.BLOCK_K}")


def fused_gate_up_fp8(x, q: QuantizedExperts, sorted_token_ids, expert_ids, num_tokens_post_padded, top_k,
                      x_scale=None, config=None, out=None, out_dtype=None):
    """silu(x W1[e]^T) * (x W3[e]^T) for every slot of the dispatch, with fp8 weights: ``[M * top_k, ffn]``.

    Block scheme: ``x`` fp8 ``[M, hidden]`` and ``x_scale`` fp32 ``[M, ceil(hidden/128)]`` from
    :func:`quantize_act`; the output dtype is ``out_dtype`` (default: bf16 on a GPU, fp32 on the CPU).
    Channel scheme: ``x`` bf16/fp16/fp32, no ``x_scale``; the output has x's dtype. Dispatch tensors follow
    chapter 2's contract; their block size is the kernel's BLOCK_M."""
    E, F, H = check_experts(q)
    check_activations("x", x, x_scale, q, None, H)
    M = x.shape[0]
    validate.top_k(top_k, E)
    block_m = check_dispatch(sorted_token_ids, expert_ids, num_tokens_post_padded, x.device)
    if out_dtype is None:
        out_dtype = default_dtype() if q.scheme == "block" else x.dtype
    cfg = config or pick_config("fused_gate_up_fp8", M, x.element_size())
    cfg = cfg if cfg.BLOCK_M == block_m else dataclasses.replace(cfg, BLOCK_M=block_m)
    check_block_k(cfg, q)
    if out is None:
        out = torch.empty((M * top_k, F), dtype=out_dtype, device=x.device)
    validate.tensor("out", out, shape=(M * top_k, F), dtypes=(out_dtype,), device=x.device)
    xs = x_scale if x_scale is not None else q.w1_scale   # never read without BLOCK_SCALED
    xs_strides = (x_scale.stride(0), x_scale.stride(1)) if x_scale is not None else (0, 0)
    se, sn, sk, group_n = scale_strides(q, q.w1_scale)
    num_blocks = blocks_bound(M * top_k, E, block_m, expert_ids.numel())
    grid = (num_blocks * triton.cdiv(F, cfg.BLOCK_N),)
    fused_gate_up_fp8_kernel[grid](
        x, xs, q.w1, q.w3, q.w1_scale, q.w3_scale, out, sorted_token_ids, expert_ids, num_tokens_post_padded,
        F, H, num_blocks * block_m, M * top_k, top_k,
        x.stride(0), x.stride(1), *xs_strides, q.w1.stride(0), q.w1.stride(1), q.w1.stride(2),
        se, sn, sk, out.stride(0), out.stride(1),
        GROUP_N=group_n, GROUP_K=GROUP, BLOCK_SCALED=q.scheme == "block",
        **{k: v for k, v in cfg.meta().items() if k != "SPLIT_K"})
    return out


def down_combine_fp8(h, q: QuantizedExperts, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                     h_scale=None, deterministic=False, config=None, out=None, out_dtype=None, acc=None):
    """The MoE output ``[M, hidden]``: each slot's ``h @ W2[e]^T`` (fp8 W2) times its routing weight, summed
    over each token's top-k slots (atomic fp32 adds, or per-slot rows + an ordered sum when
    ``deterministic``). ``h``: fp8 + ``h_scale`` (block) or float (channel), ``[M * top_k, ffn]``.
    ``acc``: an fp32 [M, hidden] buffer already zero (atomic mode)."""
    E, F, H = check_experts(q)
    check_activations("h", h, h_scale, q, None, F)
    validate.tensor("topk_weights", topk_weights, ndim=2, dtypes=validate.FLOAT_DTYPES, device=h.device)
    M, top_k = topk_weights.shape
    if h.shape[0] != M * top_k:
        raise ValueError(f"h must have shape [M * top_k, ffn] = [{M * top_k}, {F}] for topk_weights of shape "
                         f"{list(topk_weights.shape)}, got {list(h.shape)}")
    validate.top_k(top_k, E)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    block_m = check_dispatch(sorted_token_ids, expert_ids, num_tokens_post_padded, h.device)
    if out_dtype is None:
        out_dtype = default_dtype() if q.scheme == "block" else h.dtype
    cfg = config or pick_config("down_combine_fp8", M, h.element_size())
    cfg = cfg if cfg.BLOCK_M == block_m else dataclasses.replace(cfg, BLOCK_M=block_m)
    check_block_k(cfg, q)
    meta = cfg.meta()
    split_k = 1 if deterministic else int(meta.pop("SPLIT_K", 1))
    meta.pop("SPLIT_K", None)
    if out is None:
        out = torch.empty((M, H), dtype=out_dtype, device=h.device)
    validate.tensor("out", out, shape=(M, H), dtypes=(out_dtype,), device=h.device)
    weights = topk_weights.float().reshape(-1)
    if deterministic:
        acc = torch.empty((M * top_k, H), dtype=torch.float32, device=h.device)
    elif acc is None:
        acc = torch.zeros((M, H), dtype=torch.float32, device=h.device)
    else:
        validate.tensor("acc", acc, shape=(M, H), dtypes=(torch.float32,), device=h.device)
    hs = h_scale if h_scale is not None else q.w2_scale
    hs_strides = (h_scale.stride(0), h_scale.stride(1)) if h_scale is not None else (0, 0)
    se, sn, sk, group_n = scale_strides(q, q.w2_scale)
    num_blocks = blocks_bound(M * top_k, E, block_m, expert_ids.numel())
    grid = (num_blocks * triton.cdiv(H, cfg.BLOCK_N), split_k)
    down_combine_fp8_kernel[grid](
        h, hs, q.w2, q.w2_scale, weights, acc, sorted_token_ids, expert_ids, num_tokens_post_padded,
        H, F, num_blocks * block_m, M * top_k, top_k, split_k,
        h.stride(0), h.stride(1), *hs_strides, q.w2.stride(0), q.w2.stride(1), q.w2.stride(2),
        se, sn, sk, acc.stride(0), acc.stride(1),
        GROUP_N=group_n, GROUP_K=GROUP, BLOCK_SCALED=q.scheme == "block", ATOMIC=not deterministic, **meta)
    rows = top_k if deterministic else 1
    block = min(SUM_BLOCK_N, triton.next_power_of_2(H))
    moe_sum_kernel[(M, triton.cdiv(H, block))](acc, out, H, acc.stride(0), out.stride(0), TOP_K=rows, BLOCK_N=block)
    return out


def check_inputs(x, q):
    """Validate x against q: (M, hidden, experts, ffn)."""
    E, F, H = check_experts(q)
    validate.tensor("x", x, shape=(None, H), dtypes=validate.FLOAT_DTYPES, device=q.w1.device, nonempty=True)
    check_interpreter_dtype("x", x.dtype)
    return x.shape[0], H, E, F


def run_experts(x, topk_weights, q, top_k, dispatch_tensors, cfg_up, cfg_down, deterministic=False, out=None,
                acc=None):
    """Gate+up and down+combine on one dispatch; the block scheme quantises x, and the intermediate, per token
    group first (the weights' K blocks are 128 wide, so the activation groups are too)."""
    if q.scheme == "block":
        ### BEGIN SOLUTION
        # HINT: xq, xs = quantize_act(x, q.dtype) (groups of 128 along hidden: the weights' K blocks)
        # HINT: h = fused_gate_up_fp8(xq, q, *dispatch_tensors, top_k, x_scale=xs, config=cfg_up, out_dtype=x.dtype)
        # HINT: hq, hs = quantize_act(h, q.dtype) (h is the down projection's input: its K is ffn)
        # HINT: return down_combine_fp8(hq, q, topk_weights, *dispatch_tensors, h_scale=hs, deterministic=deterministic,
        # HINT:                         config=cfg_down, out=out, out_dtype=x.dtype, acc=acc)
        xq, xs = quantize_act(x, q.dtype)
        h = fused_gate_up_fp8(xq, q, *dispatch_tensors, top_k, x_scale=xs, config=cfg_up, out_dtype=x.dtype)
        hq, hs = quantize_act(h, q.dtype)
        return down_combine_fp8(hq, q, topk_weights, *dispatch_tensors, h_scale=hs, deterministic=deterministic,
                                config=cfg_down, out=out, out_dtype=x.dtype, acc=acc)
        ### END SOLUTION
    h = fused_gate_up_fp8(x, q, *dispatch_tensors, top_k, config=cfg_up)
    return down_combine_fp8(h, q, topk_weights, *dispatch_tensors, deterministic=deterministic, config=cfg_down,
                            out=out, acc=acc)


def configs_for(M, x, q):
    """(gate+up config, down config with the same BLOCK_M) for M tokens of x with experts q."""
    a_bytes = 1 if q.scheme == "block" else x.element_size()
    cfg_up = pick_config("fused_gate_up_fp8", M, a_bytes)
    cfg_down = pick_config("down_combine_fp8", M, a_bytes if q.scheme == "block" else x.element_size())
    return cfg_up, dataclasses.replace(cfg_down, BLOCK_M=cfg_up.BLOCK_M, extra=dict(cfg_down.extra))


def fused_experts_fp8(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, q: QuantizedExperts,
                      *, deterministic: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~triton_moe.kernels.fused_moe.fused_experts` with fp8 experts ``q``: ``[M, hidden]`` in x's
    dtype. Block scheme: x and the intermediate are quantised per token group (two small launches)."""
    M, H, E, F = check_inputs(x, q)
    validate.tensor("topk_ids", topk_ids, ndim=2, dtypes=validate.INDEX_DTYPES, device=x.device)
    top_k = topk_ids.shape[1]
    validate.top_k(top_k, E)
    validate.tensor("topk_ids", topk_ids, shape=(M, top_k))
    validate.tensor("topk_weights", topk_weights, shape=(M, top_k), dtypes=validate.FLOAT_DTYPES, device=x.device)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    cfg_up, cfg_down = configs_for(M, x, q)
    d = dispatch(topk_ids, E, cfg_up.BLOCK_M)    # one dispatch, with the gate+up config's BLOCK_M
    return run_experts(x, topk_weights, q, top_k, d, cfg_up, cfg_down, deterministic, out)


def fused_moe_fp8(x: torch.Tensor, router_logits: torch.Tensor, q: QuantizedExperts, top_k: int, *,
                  renormalize: bool = True, deterministic: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~triton_moe.kernels.fused_moe.fused_moe` with fp8 experts ``q`` (softmax top-k routing on
    ``router_logits`` [M, E]); decode sizes route, dispatch and zero the combine buffer in one launch.
    No host synchronisation: capturable in a CUDA graph."""
    M, H, E, F = check_inputs(x, q)
    validate.tensor("router_logits", router_logits, shape=(M, E), dtypes=validate.FLOAT_DTYPES, device=x.device)
    validate.top_k(top_k, E)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if small_path(M, E, top_k):
        cfg_up, cfg_down = configs_for(M, x, q)
        acc = None if deterministic else torch.empty((M, H), dtype=torch.float32, device=x.device)
        tw, _, *d = route_dispatch(router_logits, top_k, bool(renormalize), cfg_up.BLOCK_M, acc)
        return run_experts(x, tw, q, top_k, d, cfg_up, cfg_down, deterministic, out, acc)
    tw, ti = route(router_logits, top_k, bool(renormalize))
    return fused_experts_fp8(x, tw, ti, q, deterministic=deterministic, out=out)


# --------------------------------------------------------------------------------------------------
# Example launches for the cross-compile check (triton_moe/tools/crosscompile.py): host wrappers on meta tensors,
# as a GPU of the target the check simulates (triton_moe.target.current()) would launch them.

EXAMPLE_TARGETS = ("sm_90", "gfx942")  # checked: sm_80 has no e4m3 (fp8_dtype refuses it); gfx90a (no fp8
#   MFMA) is left out: compiling its fnuz kernels after gfx942's in one process once aborted LLVM


def example_launches() -> list:
    """(label, zero-argument callable) per launch worth compiling: each scheme, decode and prefill configs of
    the GPU tables, Mixtral's and DeepSeek-V3's shapes, in the fp8 dtype of the simulated target (e4m3fn on
    sm_90, e4m3fnuz on gfx942); tensors on ``meta``. On other targets the callables launch nothing."""
    from ..reference import dispatch_sizes
    from ..shapes import MODELS
    from ..target import current

    def launch(shape, M, scheme):
        t = current()
        if t.arch not in EXAMPLE_TARGETS:
            return
        dtype = fp8_dtype(t.arch)
        E, F, H, k = shape.experts, shape.ffn, shape.hidden, shape.top_k
        meta = dict(device="meta")
        if scheme == "block":
            sc = lambda n, kk: torch.empty(E, -(-n // GROUP), -(-kk // GROUP), **meta)  # noqa: E731
        else:
            sc = lambda n, kk: torch.empty(E, n, **meta)  # noqa: E731
        q = QuantizedExperts(torch.empty(E, F, H, dtype=dtype, **meta), torch.empty(E, F, H, dtype=dtype, **meta),
                             torch.empty(E, H, F, dtype=dtype, **meta), sc(F, H), sc(F, H), sc(H, F), scheme,
                             (GROUP, GROUP) if scheme == "block" else None)
        a_bytes = 1 if scheme == "block" else 2
        up = pick_config("fused_gate_up_fp8", M, a_bytes, t.vendor)
        down = dataclasses.replace(pick_config("down_combine_fp8", M, a_bytes, t.vendor), BLOCK_M=up.BLOCK_M)
        size, blocks = dispatch_sizes(M, k, E, up.BLOCK_M)
        d = (torch.empty(size, dtype=torch.int32, **meta), torch.empty(blocks, dtype=torch.int32, **meta),
             torch.empty(1, dtype=torch.int32, **meta))
        x = torch.empty(M, H, dtype=torch.bfloat16, **meta)
        tw = torch.empty(M, k, dtype=torch.float32, **meta)
        if scheme == "block":
            xq, xs = quantize_act(x, dtype)
            h = fused_gate_up_fp8(xq, q, *d, k, x_scale=xs, config=up, out_dtype=torch.bfloat16)
            hq, hs = quantize_act(h, dtype)
            down_combine_fp8(hq, q, tw, *d, h_scale=hs, config=down, out_dtype=torch.bfloat16)
        else:
            h = fused_gate_up_fp8(x, q, *d, k, config=up)
            down_combine_fp8(h, q, tw, *d, config=down)

    return [(f"fp8 {scheme} {key} M={M}", lambda s=MODELS[key], M=M, sc=scheme: launch(s, M, sc))
            for key in ("mixtral", "deepseek_v3") for M in (1, 256, 4096) for scheme in SCHEMES]
