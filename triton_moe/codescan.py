"""What the grading parent reads from a submission's source, with ``ast`` (no learner code runs here).

- the names of the ``@triton.jit`` kernels and of the functions the notebook defines (a launch counts as the
  learner's only for a kernel the notebook itself defines),
- whether an exercise's function or kernel is still the exercise's stub (the course's own stub, unchanged,
  or holding the ``YOUR CODE HERE`` marker),
- constructs that can reach around the grader (dynamic code, the interpreter's internals, other processes,
  files outside the working directory, the grader's own modules): they are FLAGGED in the teacher's notes,
  not silently trusted. A flag is a reason to read the notebook, not proof of cheating.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

from .checking import STUB_MARKER

FLAG_CALLS = {
    "exec": "dynamic code (exec)", "eval": "dynamic code (eval)", "compile": "dynamic code (compile)",
    "__import__": "dynamic import (__import__)", "globals": "globals()", "setattr": "setattr", "delattr": "delattr",
}
FLAG_ATTRS = {
    ("os", "_exit"): "os._exit", ("os", "kill"): "os.kill", ("os", "killpg"): "os.killpg", ("os", "fork"): "os.fork",
    ("os", "system"): "os.system", ("os", "popen"): "os.popen", ("os", "write"): "os.write to a file descriptor",
    ("os", "fdopen"): "os.fdopen", ("os", "dup2"): "os.dup2", ("os", "setsid"): "os.setsid",
    ("os", "getppid"): "os.getppid", ("os", "execv"): "os.exec*", ("os", "execve"): "os.exec*",
    ("os", "environ"): "os.environ", ("os", "chdir"): "os.chdir",
    ("sys", "modules"): "sys.modules", ("sys", "path"): "sys.path", ("sys", "argv"): "sys.argv",
    ("sys", "_getframe"): "frame inspection (sys._getframe)", ("sys", "settrace"): "sys.settrace",
    ("sys", "setprofile"): "sys.setprofile", ("sys", "exit"): "sys.exit",
}
FLAG_MODULES = {
    "importlib": "importlib", "ctypes": "ctypes", "gc": "gc (object graph access)", "inspect": "inspect (frames)",
    "subprocess": "subprocess", "multiprocessing": "multiprocessing", "signal": "signal", "socket": "socket",
    "pickle": "pickle", "marshal": "marshal", "types": "types (code objects)", "builtins": "builtins",
    "shutil": "shutil", "threading": "threading", "atexit": "atexit", "mmap": "mmap", "pty": "pty",
    "triton_moe.grading": "the grader's internals (triton_moe.grading)",
    "triton_moe.checking": "the checker library's internals (triton_moe.checking)",
    "triton_moe.sandbox": "the grader's internals (triton_moe.sandbox)",
    "triton_moe.sandbox_child": "the grader's internals (triton_moe.sandbox_child)",
    "triton_moe.notebooks": "the exercise generator (triton_moe.notebooks)",
    "triton.runtime": "Triton's launch internals (triton.runtime)",
}
FLAG_NAMES = {"__builtins__": "__builtins__", "__code__": "code objects (__code__)", "f_back": "frames (f_back)",
              "f_globals": "frames (f_globals)", "f_locals": "frames (f_locals)", "__subclasses__": "__subclasses__",
              "__globals__": "function globals (__globals__)", "REGISTRY": "the checker registry (REGISTRY)",
              "TOLERANCE": "the checker tolerances (TOLERANCE)", "InterpretedFunction": "Triton's interpreter internals",
              "JITFunction": "Triton's launch internals (JITFunction)", "GridExecutor": "Triton's interpreter internals"}


@dataclass
class Scan:
    jit_kernels: set = field(default_factory=set)          # @triton.jit functions the notebook defines
    functions: dict = field(default_factory=dict)          # name -> ast.dump of its (last) definition
    sources: dict = field(default_factory=dict)            # name -> source text of its (last) definition
    flags: list = field(default_factory=list)              # (cell, line, what, source line)
    syntax_errors: list = field(default_factory=list)


def _is_jit(node) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "jit":
            return True
    return False


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _outside_cwd(path: str) -> bool:
    return path.startswith(("/", "~")) or ".." in path.replace("\\", "/").split("/")


def body_dump(node) -> str:
    """The definition without its docstring, as ast.dump (comments and formatting do not matter)."""
    node = ast.parse(ast.unparse(node)).body[0]
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    node.decorator_list = []
    return ast.dump(node, annotate_fields=False)


def scan_cells(cells) -> Scan:
    """``cells``: [(cell number, source)] of the code cells the grader runs."""
    from .sandbox_child import _strip_magics

    s = Scan()
    for number, src in cells:
        try:
            tree = ast.parse(_strip_magics(src))
        except SyntaxError as exc:
            s.syntax_errors.append(f"cell {number}, line {exc.lineno}: {exc.msg}")
            continue
        lines = src.split("\n")

        def flag(node, what):
            text = lines[node.lineno - 1].strip() if 0 < node.lineno <= len(lines) else ""
            s.flags.append((number, node.lineno, what, text))

        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if _is_jit(node):
                    s.jit_kernels.add(node.name)
                s.functions[node.name] = body_dump(node)
                s.sources[node.name] = "\n".join(lines[node.lineno - 1: node.end_lineno])
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.module:
                    mods += [f"{node.module}.{a.name}" for a in node.names]
                for m in mods:
                    for bad, what in FLAG_MODULES.items():
                        if m == bad or m.startswith(bad + "."):
                            flag(node, f"imports {what}")
                            break
                if isinstance(node, ast.ImportFrom) and node.module in ("os", "sys"):
                    for a in node.names:
                        if (node.module, a.name) in FLAG_ATTRS:
                            flag(node, FLAG_ATTRS[(node.module, a.name)])
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name in FLAG_CALLS:
                    flag(node, FLAG_CALLS[name])
                if name in ("open", "io.open", "pathlib.Path", "Path") and node.args:
                    a = node.args[0]
                    if not isinstance(a, ast.Constant) or (isinstance(a.value, str) and _outside_cwd(a.value)):
                        shown = repr(a.value) if isinstance(a, ast.Constant) else "a computed path"
                        flag(node, f"{name}({shown}): a file outside the working directory")
                if name.endswith(("glob", "iglob", "rglob", "listdir", "scandir", "walk")):
                    flag(node, f"{name}(): lists files")
            elif isinstance(node, ast.Attribute):
                d = _dotted(node)
                for (mod, attr), what in FLAG_ATTRS.items():
                    if d == f"{mod}.{attr}" or d.startswith(f"{mod}.{attr}."):
                        flag(node, what)
                if node.attr in FLAG_NAMES:
                    flag(node, FLAG_NAMES[node.attr])
            elif isinstance(node, ast.Name) and node.id in FLAG_NAMES:
                flag(node, FLAG_NAMES[node.id])
    s.flags = list(dict.fromkeys(s.flags))
    return s


def flag_notes(scan: Scan, course: Scan | None) -> list[str]:
    """The flags of a submission that the course's own notebook of the chapter does not raise too."""
    known = {(what, text) for _, _, what, text in (course.flags if course else [])}
    return [f"cell {c}, line {ln}: {what}" for c, ln, what, text in scan.flags if (what, text) not in known]


def is_stub_source(src: str | None) -> bool:
    return src is not None and STUB_MARKER in src
