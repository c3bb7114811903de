"""The checker library: one set of tools used by notebook cells, pytest and the grader.

A checker takes the learner's function, draws fresh random inputs (seed printed), poisons the outputs,
runs the function, compares with a float64 reference and returns a :class:`CheckResult` whose message
says what to fix ("rows 37-63 never written", "token 5 / expert 3: max error 0.4 at column 17").

Writing a checker::

    @exercise("01", "moe_forward_loop", points=2, hint="loop over experts, gather their tokens ...")
    def check_moe_forward_loop(fn, seed):
        ...                     # raise CheckFailure("what is wrong", hint="what to try") on a problem

The decorator registers it in ``REGISTRY`` (importing :mod:`triton_moe.checks` fills it) and turns
exceptions into results: ``NotImplementedError`` or an untouched stub -> "not attempted"; ``CheckFailure``
-> "failed"; any other exception -> "failed" with the exception named.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from .reference import new_seed

# The text the exercise generator puts where a solution was; a function whose source still holds it was
# not attempted (this is how stubs inside @triton.jit bodies, which cannot raise, are recognised).
STUB_MARKER = "YOUR CODE HERE"

# Relative Frobenius error ||out - ref|| / ||ref|| allowed per input dtype, against a float64 reference.
# fp32 allows for tf32 tensor-core dots on a GPU (Triton's default for fp32 tl.dot).
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-3,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}

PASSED, FAILED, NOT_ATTEMPTED, SKIPPED = "passed", "failed", "not attempted", "skipped"


@dataclass
class CheckResult:
    exercise: str
    status: str
    message: str = ""
    hint: str = ""
    seed: int | None = None
    cases: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        icon = {PASSED: "PASS", FAILED: "FAIL", NOT_ATTEMPTED: "TODO", SKIPPED: "SKIP"}.get(self.status, "?")
        lines = [f"[{icon}] {self.exercise}: {self.status}" + (f" (seed {self.seed})" if self.seed is not None else "")]
        if self.message:
            lines.append(f"  {self.message}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        if self.passed and self.cases:
            lines.append("  cases: " + "; ".join(self.cases))
        return "\n".join(lines)

    __repr__ = __str__

    def _ipython_display_(self):
        # The checker already printed this result; showing the returned value again would duplicate it.
        if not getattr(self, "_printed", False):
            print(self)


class CheckFailure(Exception):
    """Raised inside a checker: ``message`` says what is wrong, ``hint`` what to try."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


# --------------------------------------------------------------------------------------------------
# Inputs and outputs


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with values no correct kernel writes: NaN for floats, -7777 for integers."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-7777)


def poisoned(shape, dtype, device) -> torch.Tensor:
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


def ranges(indices) -> str:
    """[37, 38, ..., 63, 70] -> '37-63, 70'."""
    idx = sorted(int(i) for i in indices)
    out, start, prev = [], None, None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def expect_tensor(name: str, value, shape=None, dtype=None, device=None) -> torch.Tensor:
    """Shape/dtype/device checks with messages that say what was expected."""
    if not isinstance(value, torch.Tensor):
        raise CheckFailure(f"{name} should be a torch.Tensor, got {type(value).__name__}",
                           hint="return the tensor itself, not a tuple or a list")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise CheckFailure(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if dtype is not None:
        dtypes = dtype if isinstance(dtype, (tuple, list)) else (dtype,)
        if value.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            raise CheckFailure(f"{name} has dtype {value.dtype}, expected {want}",
                               hint="cast with .to(dtype) at the end, not in the middle of the computation")
    if device is not None and value.device.type != torch.device(device).type:
        raise CheckFailure(f"{name} is on {value.device}, expected {device}")
    return value


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            row_label: Callable[[int], str] = lambda i: f"row {i}", rows: torch.Tensor | None = None,
            tol: float | None = None) -> float:
    """Compare ``out`` (any float dtype) with a float64 ``ref`` of the same shape.

    Checks, in order: unwritten rows (poison left), inf, then the relative Frobenius error against the
    dtype's tolerance; on failure names the worst row and column. ``rows`` restricts the comparison to
    those row indices (e.g. real rows among padding). Returns the relative error."""
    tol = tolerance(dtype) if tol is None else tol
    if rows is not None:
        out, ref = out[rows], ref[rows]
        names = [int(r) for r in rows.tolist()]
    else:
        names = list(range(out.shape[0]))
    out64 = out.detach().double().cpu().reshape(out.shape[0], -1)
    ref64 = ref.detach().double().cpu().reshape(ref.shape[0], -1)
    nan_rows = torch.isnan(out64).any(dim=1).nonzero().flatten().tolist()
    if nan_rows:
        some_cols = torch.isnan(out64[nan_rows[0]]).nonzero().flatten()
        whole = bool(torch.isnan(out64[nan_rows]).all())
        what = "never written" if whole else f"partly unwritten (e.g. column {int(some_cols[0])})"
        raise CheckFailure(
            f"{name}: {len(nan_rows)} of {out64.shape[0]} rows {what}: rows {ranges(names[i] for i in nan_rows)} "
            "still hold the NaN poison",
            hint="check the store mask and the grid: every output row and column must be written (or NaN came "
                 "from your arithmetic, e.g. reading past the end of a tensor)")
    if torch.isinf(out64).any():
        r = int(torch.isinf(out64).any(dim=1).nonzero()[0])
        raise CheckFailure(f"{name}: {row_label(names[r])} contains inf", hint="overflow: accumulate in float32")
    err = relative_error(out64, ref64)
    if not err <= tol:
        diff = (out64 - ref64).abs()
        r, c = divmod(int(diff.argmax()), diff.shape[1])
        raise CheckFailure(
            f"{name}: relative error {err:.3g} > tolerance {tol:g} for {str(dtype).replace('torch.', '')}; worst at "
            f"{row_label(names[r])}: max error {float(diff[r, c]):.3g} at column {c} "
            f"(got {float(out64[r, c]):.4g}, expected {float(ref64[r, c]):.4g})")
    return err


def compare_exact(name: str, out: torch.Tensor, ref: torch.Tensor, what: str = "entry") -> None:
    """Integer outputs (indices, counts): must match exactly; names the first mismatch."""
    if tuple(out.shape) != tuple(ref.shape):
        raise CheckFailure(f"{name} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    bad = (out.cpu().long() != ref.cpu().long()).nonzero()
    if len(bad):
        i = tuple(int(v) for v in bad[0])
        where = i[0] if len(i) == 1 else i
        got, exp = int(out.cpu().long()[i]), int(ref.cpu().long()[i])
        unwritten = " (still the poison value: never written)" if got == -7777 else ""
        raise CheckFailure(f"{name}: {len(bad)} wrong {what}(s); first at {where}: got {got}, expected {exp}{unwritten}")


# --------------------------------------------------------------------------------------------------
# Running checkers


def is_untouched(fn) -> bool:
    """True when the function's source still holds the generator's stub marker."""
    src = getattr(fn, "src", None)  # triton.JITFunction keeps its source here
    while src is None and hasattr(fn, "fn"):  # the interpreter's InterpretedFunction wraps the Python function
        fn = fn.fn
        src = getattr(fn, "src", None)
    if src is None:
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            return False
    return STUB_MARKER in src


def grading() -> bool:
    """True while the grader runs a notebook: notebook check cells then do nothing (the grader runs the
    checkers itself, with its own seed) and GPU timing cells are skipped."""
    return os.environ.get("TRITON_MOE_GRADING") == "1"


@dataclass(frozen=True)
class KernelLaunch:
    """One Triton kernel launch seen while a checker ran the learner's function."""
    name: str
    origin: str                 # "learner" (defined in the notebook), "course" (the package) or "unknown"
    chapter: str | None = None  # for a course kernel: the chapter whose notebook shows its module
    stub: bool = False          # a learner kernel that is still the exercise's stub, unchanged


_recording = threading.local()
_hook_lock = threading.Lock()
_hooked: list = []


def _install_launch_hook() -> None:
    """Wrap the launch entry of compiled and interpreted Triton kernels once; the wrapper reports to the
    recorders active in the calling thread (none: it only launches)."""
    with _hook_lock:
        if _hooked:
            return
        from triton.runtime import jit

        classes = [jit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:  # pragma: no cover
            pass
        package = os.path.dirname(os.path.abspath(__file__)) + os.sep
        for cls in classes:
            original = cls.run

            def run(self, *args, _original=original, **kwargs):
                stack = getattr(_recording, "stack", None)
                if stack:
                    fn = getattr(self, "fn", None)
                    filename = os.path.abspath(getattr(getattr(fn, "__code__", None), "co_filename", "") or "?")
                    launch = KernelLaunch(getattr(fn, "__name__", "?"),
                                          "course" if filename.startswith(package) else "learner")
                    for seen in stack:
                        seen.append(launch)
                return _original(self, *args, **kwargs)

            cls.run = run
            _hooked.append(cls)


def report_launches(launches) -> None:
    """Add launches made elsewhere (the grader's child process) to the recorders active in this thread, so a
    checker's ``record_launches()`` sees a proxied call's kernels as it sees an in-process call's."""
    for seen in getattr(_recording, "stack", None) or []:
        seen.extend(launches)


@contextlib.contextmanager
def record_launches():
    """Record every Triton kernel launch this thread makes while the block runs (yields the list of
    :class:`KernelLaunch`). A kernel whose code lives in the package is the course's; any other the learner's.
    The grader's child process reports its launches through :mod:`triton_moe.sandbox_child` instead."""
    _install_launch_hook()
    seen: list[KernelLaunch] = []
    stack = _recording.__dict__.setdefault("stack", [])
    stack.append(seen)
    try:
        yield seen
    finally:
        stack.remove(seen)


CELL_FILE = re.compile(r"_cell_(\d+)\.py$")


def learner_location(exc: BaseException) -> tuple[str, str]:
    """(root cause as "Type: message", where) of an exception raised by the learner's code. Walks the
    traceback of the exception and of its __cause__/__context__ chain (an error inside an interpreted
    @triton.jit kernel is re-raised by Triton with the original as its cause) and names the deepest frame in
    the learner's code: "cell N, line L: <source>" for the notebook cells the course executes from files
    named after their cell, else the file and line of the deepest frame outside Triton, torch and the course."""
    chain, seen, e = [], set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    cell_where = other_where = ""
    for e in chain:  # outermost first: the innermost learner frame wins
        for fr in traceback.extract_tb(e.__traceback__):
            name = fr.filename or ""
            line = (fr.line or "").strip()
            if m := CELL_FILE.search(name):
                cell_where = f"cell {int(m.group(1))}, line {fr.lineno}: {line}"
            elif not (os.path.abspath(name).startswith(package) or "site-packages" in name or
                      "dist-packages" in name or name.startswith("<") or "/lib/python3" in name):
                other_where = f"{os.path.basename(name)}, line {fr.lineno}: {line}"
    root = chain[-1]
    return f"{type(root).__name__}: {root}", cell_where or other_where


@dataclass
class Exercise:
    chapter: str          # "01"
    name: str             # the function the learner writes, looked up by name in the notebook
    check: Callable       # check(fn, seed) raising CheckFailure; wrapped by run()
    points: int = 1
    hint: str = ""
    kernels: tuple = ()   # extra names (e.g. @triton.jit kernels) whose stubs mean "not attempted"

    @property
    def key(self) -> str:
        return f"{self.chapter}:{self.name}"

    def is_kernel_exercise(self, fn) -> bool:
        """The learner writes a @triton.jit kernel: the result must come from a kernel of theirs."""
        return bool(self.kernels) or (getattr(fn, "_kind", None) == "jit") or (hasattr(fn, "run") and hasattr(fn, "fn"))

    def run(self, fn, seed: int | None = None, namespace: dict | None = None, untouched: bool | None = None,
            judge_launches: bool | None = None) -> CheckResult:
        """Run the checker on ``fn``. ``untouched`` (the grader decides it from the notebook's source)
        overrides looking at the stub marker of ``fn`` and the exercise's kernels in ``namespace``. A
        ``fn`` with a ``launch_records`` list (the grader's proxy) reports the kernels its calls launched;
        otherwise launches in this process are recorded. ``judge_launches`` (default: unless ``fn`` is the
        course's own code, as in the tests of the package's kernels) applies :meth:`launch_problem`."""
        if fn is None:
            return CheckResult(self.key, NOT_ATTEMPTED, f"no function named {self.name!r} was defined",
                               hint="run the cell that defines it (and keep its name)")
        seed = new_seed() if seed is None else seed
        if untouched is None:
            watched = [fn] + [namespace.get(k) for k in self.kernels if namespace and namespace.get(k) is not None]
            untouched = any(is_untouched(f) for f in watched)
        stub_note = ("the exercise still holds its stub (the '# YOUR CODE HERE' block); if you wrote code, "
                     "delete that line and the stub lines under it")
        from .tools import learner_compile  # an interpreter pass must also compile for the GPU (CPU mode)

        try:
            with learner_compile.recording() as compiled, record_launches() as here:
                cases = self.check(fn, seed) or []
        except NotImplementedError as exc:
            return CheckResult(self.key, NOT_ATTEMPTED, str(exc) or "the function raises NotImplementedError",
                               hint=self.hint, seed=seed)
        except CheckFailure as exc:
            if untouched:
                return CheckResult(self.key, NOT_ATTEMPTED, f"{stub_note}. Checker: {exc.message}",
                                   exc.hint or self.hint, seed)
            return CheckResult(self.key, FAILED, exc.message, exc.hint or self.hint, seed)
        except Exception as exc:  # the learner's code crashed: say where
            text, where = learner_location(exc)
            text = getattr(exc, "learner_text", None) or text
            where = getattr(exc, "learner_where", None) or where
            status, prefix = (NOT_ATTEMPTED, f"{stub_note}. ") if untouched else (FAILED, "")
            return CheckResult(self.key, status, f"{prefix}your code raised {text}" + (f" (at {where})" if where else ""),
                               hint=self.hint, seed=seed)
        launches = list(here)  # a proxy's calls report theirs here too (report_launches)
        if judge_launches is None:
            judge_launches = hasattr(fn, "launch_records") or not _from_package(fn)
        problem = self.launch_problem(fn, launches) if judge_launches else ""
        if problem:
            return CheckResult(self.key, NOT_ATTEMPTED if untouched else FAILED, problem, self.hint, seed)
        # An interpreter pass must also compile for the GPU (CPU mode; kernels run in this process)
        problems = learner_compile.compile_problems(None, compiled) if learner_compile.enabled() else []
        if problems:
            return CheckResult(self.key, FAILED, problems[0], learner_compile.HINT, seed)
        return CheckResult(self.key, PASSED, seed=seed, cases=list(cases))

    def launch_problem(self, fn, launches: list) -> str:
        """Why the checked results do not count, or "": a kernel exercise must launch a kernel of the
        learner's own that is not the untouched stub, and no exercise may use a course kernel of its own
        or a later chapter (those are the answers)."""
        answer = sorted({la.name for la in launches if la.origin == "course" and la.chapter is not None
                         and la.chapter >= self.chapter})
        if answer:
            return (f"the results came from the course's kernel {', '.join(answer)}, not your own code "
                    "(the course's kernels of this and later chapters do not count)")
        if not self.is_kernel_exercise(fn):
            return ""
        mine = [la for la in launches if la.origin == "learner"]
        if not mine:
            others = sorted({la.name for la in launches})
            seen = f" (it launched only {', '.join(others)})" if others else ""
            return (f"{self.name} did not launch a @triton.jit kernel defined in your notebook{seen}: the result "
                    "must be computed by your kernel, not by torch on the host")
        if all(la.stub for la in mine):
            names = ", ".join(sorted({la.name for la in mine}))
            return (f"your kernel {names} is still the exercise's stub, unchanged: the result was computed "
                    "elsewhere (e.g. by torch in the host function), not by your kernel")
        return ""

    def __call__(self, fn, seed: int | None = None, **namespace) -> CheckResult:
        """Notebook entry point: ``check_x(my_fn)``; prints and returns the result."""
        if grading():
            return CheckResult(self.key, SKIPPED, "checked by the grader instead")
        result = self.run(fn, seed, namespace or _caller_globals())
        print(result)
        result._printed = True
        return result


def _from_package(fn) -> bool:
    """True for a function (or kernel) whose code lives in this package."""
    while hasattr(fn, "fn") and not hasattr(fn, "__code__"):
        fn = fn.fn
    filename = getattr(getattr(fn, "__code__", None), "co_filename", "") or ""
    return os.path.abspath(filename).startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _caller_globals() -> dict:
    frame = inspect.currentframe()
    try:
        return dict(frame.f_back.f_back.f_globals)
    finally:
        del frame


REGISTRY: dict[str, Exercise] = {}


def exercise(chapter: str, name: str, points: int = 1, hint: str = "", kernels: tuple = ()):
    """Register ``check(fn, seed) -> list of case descriptions`` as the checker of one exercise."""

    def wrap(check):
        ex = Exercise(chapter, name, check, points, hint, tuple(kernels))
        REGISTRY[ex.key] = ex
        functools.update_wrapper(ex, check)
        return ex

    return wrap


# --------------------------------------------------------------------------------------------------
# Guard memory (added for issue 10: no exercise can crash the checker, out-of-bounds reads show up)


class Guarded:
    """A tensor ``view`` inside one allocation with poisoned guard rows before and after it (NaN for floats,
    -7777 for integers). Outputs: guards that changed mean the kernel wrote past the view ("wrote rows ...
    past the end of out"). Inputs: a read past the view gets NaN, which shows in the result instead of being
    absorbed; :meth:`check` also proves the input itself was not overwritten.

    ``before``/``after`` count rows of ``shape[1:]`` (elements for a 1-D shape). Make them large enough for
    the plausible bug (row ``slot`` instead of ``token`` reaches top_k times too far), so such a write lands
    here and not in the heap."""

    def __init__(self, name: str, shape, dtype, device, before: int = 0, after: int = 0, init=None,
                 guard_value: float | None = None):
        shape = tuple(int(s) for s in shape)
        row = 1
        for s in shape[1:]:
            row *= s
        rows = shape[0] if shape else 1
        self.name, self.shape, self.before, self.after, self.row = name, shape, before, after, row
        self.buf = poison_(torch.empty((before + rows + after) * row, dtype=dtype, device=device))
        # an atomic add into NaN stays NaN: accumulators get a finite guard value, any change of it shows
        self.guard_value = guard_value
        if guard_value is not None:
            self.buf.fill_(guard_value)
        self.view = self.buf[before * row:(before + rows) * row].view(shape)
        self.initial = None
        if init is not None:
            self.view.copy_(init)
            self.initial = self.view.clone()

    def _poisoned(self, t: torch.Tensor) -> torch.Tensor:
        if self.guard_value is not None:
            return t == self.guard_value
        return torch.isnan(t) if t.dtype.is_floating_point else t == -7777

    def check(self, where: str = "", hint: str = "") -> None:
        """Raise a CheckFailure if a guard changed (or an input was overwritten)."""
        prefix = f"{where}: " if where else ""
        lead = self.buf[: self.before * self.row].view(-1, self.row) if self.before else None
        tail = self.buf[(self.before + self.shape[0]) * self.row:].view(-1, self.row) if self.after else None
        what = "rows" if len(self.shape) > 1 else "elements"
        for part, side, offset in ((tail, "past the end of", self.shape[0]), (lead, "before the start of", -self.before)):
            if part is None:
                continue
            hit = (~self._poisoned(part)).any(dim=1).nonzero().flatten()
            if len(hit):
                idx = [offset + int(r) for r in hit]
                raise CheckFailure(f"{prefix}wrote {what} {ranges(idx[:64])} {side} {self.name} "
                                   f"(it has {self.shape[0]} {what})",
                                   hint or "an index or a mask lets the kernel write outside the tensor: check the row "
                                           "each element goes to and mask rows and columns that are not real")
        if self.initial is not None:
            changed = (self.view != self.initial) & ~(torch.isnan(self.view) & torch.isnan(self.initial)
                                                      if self.view.dtype.is_floating_point else False)
            if changed.any():
                r = int(changed.reshape(self.shape[0], -1).any(dim=1).nonzero()[0])
                raise CheckFailure(f"{prefix}the input {self.name} was overwritten (row {r} changed)",
                                   hint="a kernel must not store into its inputs: check the pointer of each tl.store")


def fitted_tolerance(dtype: torch.dtype) -> float:
    """:data:`TOLERANCE`, tightened for float32 on the CPU: the interpreter's fp32 ``tl.dot`` is plain fp32
    (no tf32), so an error above ~1e-6 there means a rounding the exercise does not ask for (e.g. an fp16
    intermediate in an fp32 path)."""
    from .mode import ON_GPU

    if dtype == torch.float32 and not ON_GPU:
        return 2e-5
    return TOLERANCE[dtype]


def compare_facts(name: str, out, ref, dtype, row_label=lambda i: f"row {i}", rows=None, tol=None) -> float:
    """:func:`compare` whose inf case reports the facts instead of guessing overflow: inf comes as often from
    reading memory outside a tensor (a missing mask) as from fp16 overflow."""
    try:
        return compare(name, out, ref, dtype, row_label, rows, tol)
    except CheckFailure as exc:
        if "contains inf" in exc.message:
            o = out.detach().double().cpu().reshape(out.shape[0], -1)
            bad = torch.isinf(o).any(dim=1).nonzero().flatten().tolist()
            cols = torch.isinf(o).any(dim=0).nonzero().flatten().tolist()
            raise CheckFailure(f"{name}: {len(bad)} row(s) contain inf: rows {ranges(bad[:64])}, columns "
                               f"{ranges(cols[:64])}",
                               hint="inf comes from reading memory outside a tensor (a missing mask on a load) or "
                                    "from arithmetic that overflows its dtype") from None
        raise
