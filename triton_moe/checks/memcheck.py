"""Memory, race and launch checks around a learner's kernels while a checker runs them.

Triton's interpreter (CPU mode) runs every ``tl.load``/``tl.store``/``tl.atomic_*`` as a raw pointer access:
an out-of-bounds store there does not fail, it corrupts the heap and kills the process later
(``munmap_chunk(): invalid pointer``). :func:`watch` hooks the interpreter's memory operations for the time
a checker runs the learner's code and

- **bounds**: checks every unmasked address of every access against the tensors passed to that launch (the
  extent of each tensor argument's view). An access outside them is refused BEFORE it touches memory and
  reported as ``MemoryFault``: which kernel, load or store, how far past which argument ("rows 20-39 past the
  end of acc_ptr, a [20, 128] float32 tensor"), the kernel line, and which part of the tile was out of range
  (whole tile rows: a row index/mask bug; trailing tile columns: a column mask bug). Reads are checked as
  strictly as writes: a read past the end is a bug even where the interpreter would return a harmless value.
- **races**: two programs of one launch that ``tl.store`` DIFFERENT values to the same element race on a GPU
  (programs run concurrently, the last writer wins). The sequential interpreter hides this, so the check is
  done here: a read-modify-write (``tl.load`` + add + ``tl.store``) where ``tl.atomic_add`` is needed, or a
  plain store where rows must be added, fails on the CPU with a message naming the element. (Chosen over
  reading the kernel's source for ``tl.atomic_add``: it judges what the kernel does, so an unusual but correct
  combine is not rejected, and over running programs in another order: one run suffices.) Stores of the same
  value from several programs (a benign duplicate write) are allowed.
- **launches**: counts each kernel's launches and the elements it stored, so a checker can refuse a pass when
  the learner's kernel never ran or stored nothing (a torch computation in the host wrapper).

On a GPU only the launch count is recorded (guard memory around the checker's buffers does the bounds part).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checking import CheckFailure, is_untouched, ranges
from ..mode import ON_GPU


class MemoryFault(Exception):
    """An access outside every tensor of the launch, or a write-write race between programs."""

    def __init__(self, message: str, hint: str = "", kind: str = "", op: str = "", arg: str = ""):
        super().__init__(message)
        self.message, self.hint, self.kind, self.op, self.arg = message, hint, kind, op, arg


@dataclass
class _Arg:
    name: str
    tensor: torch.Tensor
    lo: int
    hi: int


@dataclass
class _Launch:
    kernel: str
    args: list
    writes: list = field(default_factory=list)   # (program, addresses uint64, values float64)


@dataclass
class Record:
    launches: dict = field(default_factory=dict)   # kernel name -> launches
    stored: dict = field(default_factory=dict)     # kernel name -> elements stored (atomics included)

    def require(self, fn, kernels, what: str = "the result") -> None:
        """Fail unless every kernel named in ``kernels`` (looked up in the learner's namespace, the globals of
        ``fn``) was touched, launched and stored something."""
        if hasattr(fn, "launch_records"):
            return  # a grading proxy: the kernels ran in the learner's process; the grader judges its launches
        ns = getattr(fn, "__globals__", {}) or {}
        for name in kernels:
            k = ns.get(name)
            if k is not None and is_untouched(k):
                raise CheckFailure(f"{name} still holds its stub ('# YOUR CODE HERE'), yet the results were right: "
                                   f"{what} must come from your kernel, not from torch code in the host function",
                                   hint=f"write the exercise part of {name} and launch it")
            if ON_GPU:
                continue
            if not self.launches.get(name):
                raise CheckFailure(f"{name} was never launched: {what} must be computed by your kernel "
                                   "(a torch computation in the host function does not count)",
                                   hint=f"launch it: {name}[grid](...)")
            if not self.stored.get(name):
                raise CheckFailure(f"{name} was launched but stored nothing: {what} did not come from it",
                                   hint="the kernel must tl.store (or tl.atomic_add) its results")


_state = {"launch": None, "record": None, "races": False}


def _extent(t: torch.Tensor) -> tuple[int, int]:
    es = t.element_size()
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    lo = hi = 0
    for n, s in zip(t.shape, t.stride()):
        if s >= 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    return t.data_ptr() + lo * es, t.data_ptr() + (hi + 1) * es


def _describe(arg: _Arg, addrs: np.ndarray, es: int) -> str:
    t = arg.tensor
    shape = "x".join(str(s) for s in t.shape) or "scalar"
    what = f"{arg.name} (a [{shape}] {str(t.dtype).replace('torch.', '')} tensor)"
    off = (addrs.astype(np.int64) - np.int64(t.data_ptr())) // t.element_size()
    after = bool((addrs >= arg.hi).all())
    side = "past the end of" if after else ("before the start of" if (addrs < arg.lo).all() else "outside")
    if t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        rows = np.unique(off // t.stride(0))
        return (f"{len(addrs)} element(s) {side} {what}: row{'s' if len(rows) > 1 else ''} "
                f"{ranges(rows[:64].tolist())} (it has {t.shape[0]} rows)")
    if t.dim() == 1:
        idx = np.unique(off // max(1, t.stride(0)))
        return f"{len(addrs)} element(s) {side} {what}: indices {ranges(idx[:64].tolist())} (it has {t.shape[0]})"
    if t.dim() >= 3 and t.is_contiguous():
        idx = np.unique(off // t.stride(0))
        return (f"{len(addrs)} element(s) {side} {what}: index {ranges(idx[:64].tolist())} along its first dimension "
                f"(it has {t.shape[0]})")
    return f"{len(addrs)} element(s) {side} {what}: element offsets {ranges(np.unique(off)[:64].tolist())}"


def _tile_shape(bad: np.ndarray, mask: np.ndarray) -> str:
    """Which part of the accessed tile was out of range: 'rows', 'columns' or ''."""
    if (bad == mask).all():
        return "all"
    if bad.ndim != 2:
        return ""
    bad_rows = bad.any(axis=1)
    # whole tile rows out of range (every active element of those rows): a row index or row mask bug
    if (bad[bad_rows] == mask[bad_rows]).all():
        return "rows"
    # in the rows with bad elements, the bad ones are trailing columns after good ones: a column mask bug
    first_bad = np.argmax(bad, axis=1)
    good_before = [bool((mask[r, :first_bad[r]] & ~bad[r, :first_bad[r]]).any()) for r in np.nonzero(bad_rows)[0]]
    trailing = all(bad[r, first_bad[r]:][mask[r, first_bad[r]:]].all() for r in np.nonzero(bad_rows)[0])
    if all(good_before) and trailing:
        return "columns"
    return ""


def _kernel_line(kernel: str) -> str:
    """' (in KERNEL, line N: source)' for the innermost frame of the launched kernel (or a @triton.jit function
    it called, the first frame outside Triton)."""
    import linecache

    f, first = sys._getframe(2), None
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        outside = "/triton/" not in name and "/numpy/" not in name and not name.endswith("memcheck.py")
        if f.f_code.co_name == kernel or (outside and first is None):
            line = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
            where = f" (in {f.f_code.co_name}, line {f.f_lineno}" + (f": {line}" if line else "") + ")"
            if f.f_code.co_name == kernel:
                return first or where
            first = where
        f = f.f_back
    return first or ""


def _check(op: str, ptrs, mask):
    launch = _state["launch"]
    if launch is None:
        return None
    p = ptrs.data
    m = np.ones(p.shape, dtype=bool) if mask is None else np.broadcast_to(mask.data.astype(bool), p.shape)
    addrs = p[m]
    if addrs.size == 0:
        return m
    es = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    inside = np.zeros(addrs.shape, dtype=bool)
    for a in launch.args:
        inside |= (addrs >= a.lo) & (addrs + es <= a.hi)
    if inside.all():
        return m
    bad_addrs = addrs[~inside]
    if not launch.args:
        raise MemoryFault(f"{launch.kernel}: a {op} through a pointer that is no tensor argument")

    def dist(a):
        return np.minimum(np.abs(bad_addrs.astype(np.int64) - a.hi), np.abs(a.lo - bad_addrs.astype(np.int64))).min()

    arg = min(launch.args, key=dist)
    bad = np.zeros(p.shape, dtype=bool)
    bad[m] = ~inside
    tile = _tile_shape(bad, m)
    verb = {"load": "read", "store": "wrote", "atomic": "atomically updated"}[op]
    where = _describe(arg, bad_addrs, es)
    shape = "x".join(str(d) for d in p.shape)
    tile_txt = {"all": f"; the whole [{shape}] tile accessed is out of range (its base: a row, block or expert "
                       "index)",
                "rows": f"; the out-of-range elements are whole rows of the [{shape}] tile accessed",
                "columns": f"; the out-of-range elements are trailing columns of the [{shape}] tile accessed "
                           "(a column mask)"}.get(tile, "")
    hint = {"all": "check the index the tile starts from (the row, block or expert index of the program)",
            "rows": "check the row index of the access (e.g. token = slot // top_k, or the padding sentinel rows) "
                    "and mask rows that are not real (slot < num_slots)",
            "columns": "mask the columns: offs_n < N (and the K tail: offs_k < K - k0 * BLOCK_K) with other=0.0 "
                       "on loads"}.get(tile, "mask every load and store to the tensor's real extent")
    raise MemoryFault(f"{launch.kernel} {verb} {where}{tile_txt}{_kernel_line(launch.kernel)}", hint, tile, op, arg.name)


def _install():
    from triton.runtime import interpreter as ip

    if getattr(ip, "_triton_moe_memcheck", False):
        return
    B = ip.InterpreterBuilder
    load0, store0, rmw0, cas0 = B.create_masked_load, B.create_masked_store, B.create_atomic_rmw, B.create_atomic_cas
    call0 = ip.GridExecutor.__call__

    def create_masked_load(self, ptrs, mask, other, *a):
        _check("load", ptrs, mask)
        return load0(self, ptrs, mask, other, *a)

    def create_masked_store(self, ptrs, value, mask, *a):
        m = _check("store", ptrs, mask)
        launch = _state["launch"]
        if launch is not None and m is not None and _state["races"]:
            vals = np.broadcast_to(value.data, ptrs.data.shape)[m]
            addrs = ptrs.data[m]
            if addrs.size:
                launch.writes.append((tuple(self.grid_idx), addrs.copy(), vals.astype(np.float64)))
        if launch is not None and m is not None:
            _count(launch.kernel, int(m.sum()))
        return store0(self, ptrs, value, mask, *a)

    def create_atomic_rmw(self, op, ptr, val, mask, *a):
        m = _check("atomic", ptr, mask)
        if _state["launch"] is not None and m is not None:
            _count(_state["launch"].kernel, int(m.sum()))
        return rmw0(self, op, ptr, val, mask, *a)

    def create_atomic_cas(self, ptr, cmp, val, *a):
        m = _check("atomic", ptr, None)
        if _state["launch"] is not None and m is not None:
            _count(_state["launch"].kernel, int(m.sum()))
        return cas0(self, ptr, cmp, val, *a)

    def __call__(self, *args, **kwargs):
        if _state["record"] is None:
            return call0(self, *args, **kwargs)
        name = getattr(self.fn, "__name__", "kernel")
        rec = _state["record"]
        rec.launches[name] = rec.launches.get(name, 0) + 1
        import inspect
        names = inspect.getfullargspec(self.fn).args
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        targs = [_Arg(k, v, *_extent(v)) for k, v in bound.items() if isinstance(v, torch.Tensor)]
        outer = _state["launch"]
        _state["launch"] = launch = _Launch(name, targs)
        try:
            out = call0(self, *args, **kwargs)
        finally:
            _state["launch"] = outer
        _race_check(launch)
        return out

    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    B.create_atomic_rmw, B.create_atomic_cas = create_atomic_rmw, create_atomic_cas
    ip.GridExecutor.__call__ = __call__
    ip._triton_moe_memcheck = True


def _count(kernel: str, n: int):
    rec = _state["record"]
    if rec is not None:
        rec.stored[kernel] = rec.stored.get(kernel, 0) + n


def _race_check(launch: _Launch):
    if len(launch.writes) < 2:
        return
    progs, addrs, vals = [], [], []
    for i, (_, a, v) in enumerate(launch.writes):
        x, y, z = launch.writes[i][0]
        progs.append(np.full(a.shape, x + (y << 21) + (z << 42), dtype=np.int64))
        addrs.append(a)
        vals.append(v)
    prog, addr, val = np.concatenate(progs), np.concatenate(addrs), np.concatenate(vals)
    order = np.lexsort((prog, addr))
    prog, addr, val = prog[order], addr[order], val[order]
    same = addr[1:] == addr[:-1]
    other_prog = prog[1:] != prog[:-1]
    differ = (val[1:] != val[:-1]) & ~(np.isnan(val[1:]) & np.isnan(val[:-1]))
    clash = same & other_prog & differ
    if not clash.any():
        return
    n = int(np.unique(addr[1:][clash]).size)
    a0 = addr[1:][clash][0]
    arg = next((a for a in launch.args if a.lo <= a0 < a.hi), None)
    where = ""
    if arg is not None:
        t = arg.tensor
        off = (int(a0) - t.data_ptr()) // t.element_size()
        if t.dim() == 2 and t.stride(1) == 1:
            where = f" of {arg.name} (e.g. row {off // t.stride(0)}, column {off % t.stride(0)})"
        else:
            where = f" of {arg.name} (e.g. element {off})"
    raise MemoryFault(
        f"{launch.kernel}: {n} element(s){where} are written by two different programs with different values: on a "
        "GPU programs run at the same time and one of the writes is lost (a race the CPU interpreter, which runs "
        "programs one after another, hides)",
        "where several programs add into the same row, use tl.atomic_add (a tl.load + add + tl.store is a "
        "read-modify-write race); otherwise give every program its own rows", "race", "store",
        arg.name if arg else "")


@contextlib.contextmanager
def watch(races: bool = False):
    """``with watch() as rec: fn(...)``: bounds-checked launches (CPU), launch counts in ``rec``; with
    ``races=True`` also the write-write race check (for kernels whose programs combine into shared rows).
    A fault becomes a :class:`CheckFailure` with the fault's message and hint."""
    rec = Record()
    if ON_GPU:
        _state["record"] = rec
        try:
            yield rec
        finally:
            _state["record"] = None
        return
    _install()
    outer, outer_races = _state["record"], _state["races"]
    _state["record"], _state["races"] = rec, races
    try:
        yield rec
    except Exception as exc:  # noqa: BLE001 - find a fault in the cause chain
        fault = _fault_in(exc)
        if fault is None:
            raise
        failure = CheckFailure(fault.message, fault.hint)
        failure.kind = fault.kind
        raise failure from None
    finally:
        _state["record"], _state["races"] = outer, outer_races
        if outer is not None:
            for k, v in rec.launches.items():
                outer.launches[k] = outer.launches.get(k, 0) + v
            for k, v in rec.stored.items():
                outer.stored[k] = outer.stored.get(k, 0) + v


def _fault_in(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MemoryFault):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
