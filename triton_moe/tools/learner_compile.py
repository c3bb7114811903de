"""A kernel that passes in the interpreter must also compile for a GPU: after a pass on a CPU, the learner's
``@triton.jit`` kernels are compiled for sm_90 and gfx942, as their checker launched them (no GPU needed).

The interpreter runs a kernel as Python, so it accepts what Triton's compiler rejects: ``tl.dot`` with K < 16
(NVIDIA), a value first defined inside a loop and used after it, a run-time bound in ``tl.arange``. The
checker library records the launches a check makes (:func:`recording`, which lets them run), then
:func:`compile_problems` compiles each distinct launch of each learner kernel with
:mod:`triton_moe.tools.crosscompile` and maps a compiler error to the learner's cell and line::

    with recording() as launches:
        check(fn, seed)                    # the interpreter runs the learner's kernels, as before
    problems = compile_problems(None, launches)   # [] or ["your kernel compiles in the interpreter but ..."]

How the learner's kernel becomes a compilable function: the notebook defines it as an interpreter function
(``TRITON_INTERPRET=1``), which ``triton.compile`` cannot take. Its source (and that of the ``@triton.jit``
helpers it calls from the notebook) is written to a temporary module, after the imports and module-level
constants it uses (read from the function's globals); a worker process without ``TRITON_INTERPRET`` imports
it and compiles it. Anything the module cannot reproduce (a global of another kind) skips the check for that
kernel rather than reject a correct one; only Triton's own ``CompilationError`` fails an exercise.

Cost: a worker process (about 5 s: it imports torch and Triton) per new kernel source; results are cached by
the module's source, the launches' specialisation, the targets and the Triton version
(``.triton_cache/learner_compile``), so a re-check costs nothing. ``TRITON_MOE_COMPILE_CHECK=0`` turns the
check off (tests that do not need it); it never runs on a GPU machine (the kernel compiled there already).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import types
from pathlib import Path

from . import crosscompile as cc

TARGETS = ("sm_90", "gfx942")
ENV = "TRITON_MOE_COMPILE_CHECK"
MAX_LAUNCHES_PER_KERNEL = 4   # distinct specialisations compiled per kernel (shapes of one check differ little)
CACHE = cc.ROOT / ".triton_cache" / "learner_compile"
HINT = ("the interpreter runs a kernel as Python; the GPU compiler is stricter: tl.dot needs K >= 16 (NVIDIA), "
        "tl.static_range and tl.arange need tl.constexpr bounds, a value used after a loop must exist before it, "
        "and a global a kernel reads must be a tl.constexpr (X = tl.constexpr(16))")
PACKAGE_DIRS = (str(cc.ROOT / "triton_moe"),)


def enabled() -> bool:
    """On unless ``TRITON_MOE_COMPILE_CHECK=0``; only in CPU (interpreter) mode."""
    from .. import mode

    return os.environ.get(ENV, "1") != "0" and not mode.ON_GPU


def is_learner_kernel(fn) -> bool:
    """A ``@triton.jit`` function defined outside the package and Triton (a notebook cell, a test file)."""
    import triton

    code = getattr(getattr(fn, "fn", None), "__code__", None)
    if code is None:
        return False
    path = os.path.abspath(code.co_filename)
    return not path.startswith(PACKAGE_DIRS + (os.path.dirname(os.path.abspath(triton.__file__)),))


@contextlib.contextmanager
def recording(kernels=None):
    """Record the launches of learner kernels made inside (yields ``[(kernel, CompileSpec)]``), while they still
    run. ``kernels``: only these (default: every :func:`is_learner_kernel`). At most
    :data:`MAX_LAUNCHES_PER_KERNEL` distinct specialisations per kernel are kept. Records nothing (and costs
    nothing) unless :func:`enabled`."""
    from triton.runtime.jit import KernelInterface

    records: list = []
    if not enabled():
        yield records
        return
    seen: set = set()
    wanted = None if kernels is None else {id(k) for k in kernels}
    old = KernelInterface.__getitem__

    def getitem(self, grid):
        run = old(self, grid)
        if (wanted is not None and id(self) not in wanted) or (wanted is None and not is_learner_kernel(self)):
            return run

        def launch(*args, **kwargs):
            try:
                if sum(k is self for k, _ in records) >= MAX_LAUNCHES_PER_KERNEL:
                    return run(*args, **kwargs)
                spec = cc.spec_from_args("", self, args, kwargs)
                key = cc._identity(spec)
                if key not in seen:
                    seen.add(key)
                    records.append((self, spec))
            except Exception:  # noqa: BLE001 - an argument the spec cannot describe: run it, record nothing
                pass
            return run(*args, **kwargs)
        return launch

    KernelInterface.__getitem__ = getitem
    try:
        yield records
    finally:
        KernelInterface.__getitem__ = old


# --------------------------------------------------------------------------------------------------
# The learner's kernels as a module


class _Unsupported(Exception):
    pass


def _names(code) -> set:
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names(c)
    return out


def _def_line(fn) -> tuple[str, int, str]:
    """(the file, the line of ``def`` in it, the source with decorators) of a jit function's Python function."""
    lines, start = inspect.getsourcelines(fn.fn)
    offset = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("def ")), 0)
    return fn.fn.__code__.co_filename, start + offset, "".join(lines)


def _global_line(name: str, value) -> str:
    import triton.language as tl

    if isinstance(value, types.ModuleType):
        return f"import {value.__name__} as {name}"
    if isinstance(value, tl.constexpr):
        value = value.value
        if isinstance(value, (bool, int, float, str, type(None))):
            return f"{name} = tl.constexpr({value!r})"
        raise _Unsupported(name)
    if isinstance(value, (bool, int, float, str, type(None))):
        return f"{name} = {value!r}"
    mod = getattr(value, "__module__", None) or getattr(getattr(value, "fn", None), "__module__", None)
    qual = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    if mod and mod != "__main__" and qual and "<" not in qual:
        return f"from {mod} import {qual} as {name}"
    raise _Unsupported(name)


def module_source(kernels) -> tuple[str, dict]:
    """(the source of a module defining ``kernels`` and the learner's jit helpers they call, ``{function
    name: (file, def line)}`` of where each came from). Raises :class:`_Unsupported` naming a global it cannot
    reproduce."""
    header = ["import triton", "import triton.language as tl", ""]
    defs, where, done = [], {}, set()
    todo = list(kernels)
    imports: dict = {}
    while todo:
        fn = todo.pop(0)
        name = fn.__name__
        if name in done:
            continue
        done.add(name)
        path, line, src = _def_line(fn)
        where[name] = (path, line)
        defs.append(src)
        g = fn.fn.__globals__
        for n in sorted(_names(fn.fn.__code__)):
            if n not in g or n in ("triton", "tl") and g[n].__name__ in ("triton", "triton.language"):
                continue
            v = g[n]
            if hasattr(v, "arg_names") and is_learner_kernel(v):
                todo.append(v)
            elif n not in imports:
                imports[n] = _global_line(n, v)
    body = header + list(imports.values()) + [""]
    return "\n".join(body) + "\n\n" + "\n\n".join(defs), where


# --------------------------------------------------------------------------------------------------
# Compiling and reporting


def _cell(path: str) -> str:
    """"cell 5" for a file the grader wrote (``<notebook>_cell_05.py``), else "the cell"."""
    m = re.search(r"_cell_(\d+)\.py$", path)
    return f"cell {int(m.group(1))}" if m else "the cell"


def _locate(error: str, where: dict) -> str:
    """'cell 5, line 12: c = tl.dot(a, b)' from Triton's "at L:C:" (L counts from the ``def`` line) and the
    excerpt's ``def name(`` line."""
    m = re.search(r"at (\d+):(\d+):", error)
    d = re.search(r"^\s*def (\w+)\(", error, re.M)
    if not m or not d or d.group(1) not in where:
        return ""
    path, def_line = where[d.group(1)]
    line = def_line + int(m.group(1)) - 1
    text = ""
    with contextlib.suppress(OSError, IndexError):
        text = Path(path).read_text().splitlines()[line - 1].strip()
    return f"{_cell(path)}, line {line}" + (f": {text}" if text else "")  # the file is the cell (grader, Jupyter)


def compile_problems(kernels, launches, targets=TARGETS, timeout: float = 300) -> list[str]:
    """Compile the recorded ``launches`` (:func:`recording`) of ``kernels`` (None: every recorded kernel) for
    ``targets``; returns one message per kernel that Triton's compiler rejects (empty: all compile). A kernel
    whose module cannot be reproduced, or a worker that fails for another reason, is not held against the
    learner (nothing is returned for it)."""
    if not launches:
        return []
    chosen = [(k, s) for k, s in launches if kernels is None or any(k is x for x in kernels)]
    by_kernel: dict = {}
    for k, s in chosen:
        by_kernel.setdefault(k.__name__, (k, []))[1].append(s)
    groups = [list(by_kernel.values())]  # one module and one worker for all of them when possible
    try:
        module_source([k for k, _ in groups[0]])
    except (_Unsupported, OSError, TypeError):
        groups = [[g] for g in groups[0]]
    problems = []
    for group in groups:
        try:
            source, where = module_source([k for k, _ in group])
        except (_Unsupported, OSError, TypeError):
            continue  # a global the module cannot reproduce: skip, never reject a correct kernel
        try:
            problems += _compile_group(group, source, where, list(targets), timeout)
        except (TypeError, ValueError, OSError):  # e.g. a constexpr JSON cannot hold: skip, never reject
            continue
    return problems


def _compile_group(group, source, where, targets, timeout) -> list[str]:
    import triton

    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    module = f"triton_moe_learner_{digest}"
    rows = []
    for kernel, specs in group:
        for s in specs:
            d = cc._spec_to_json(module, s)
            d.update(kernel_module=module, kernel=kernel.__name__, targets=tuple(targets), vendors=("nvidia", "amd"))
            rows.append(d)
    key = hashlib.sha256(json.dumps([source, rows, targets, triton.__version__], sort_keys=True,
                                    default=repr).encode()).hexdigest()[:24]
    CACHE.mkdir(parents=True, exist_ok=True)
    hit = CACHE / f"{key}.json"
    if hit.exists():
        results = json.loads(hit.read_text())
    else:
        (CACHE / f"{module}.py").write_text(source)
        found, errors = cc._run_workers(rows, targets, 1, CACHE / "triton", timeout, extra_path=str(CACHE))
        if errors or not found:
            return []  # the worker failed for another reason: not the learner's fault
        results = [{"kernel": r.kernel, "target": r.target, "ok": r.ok, "error": r.error} for r in found]
        hit.write_text(json.dumps(results))
    out = []
    for kernel, _ in group:
        for r in results:
            if r["kernel"] == kernel.__name__ and not r["ok"] and r["error"].startswith("CompilationError"):
                where_text = _locate(r["error"], where)
                reason = cc.error_summary(r["error"]).split(" (CompilationError: at ")[0].split(". Note that")[0][:300]
                out.append(f"your kernel {kernel.__name__} compiles in the interpreter but not for the GPU "
                           f"({r['target']}): {reason}" + (f" ({where_text})" if where_text else ""))
                break
    return out
