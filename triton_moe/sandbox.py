"""The grading parent's side of one notebook: a child process that runs the learner's code, and proxies the
checkers call instead of the learner's functions.

Why this shape (the threat model is in docs/grading.md): the score must not be decided by code the learner
controls. The parent (this process, loaded before any submission runs) runs the course's checkers itself,
with its own seed, inputs and float64 references. The learner's notebook runs in a child that only executes
its cells and then serves calls over a private pipe (inherited file descriptors: not stdout, argv or a
path). A :class:`Proxy` stands in for the learner's function: calling it sends the arguments to the child,
and copies back the return value and the bytes the call wrote into the argument tensors (output buffers,
guard memory included). Replies are loaded with ``torch.load(weights_only=True)`` under a size cap and
rebuilt from plain types only; anything else fails that exercise as an invalid reply.

The child runs with ``python -S`` in a fresh temporary directory holding a copy of the notebook and a
PRIVATE copy of the package (:func:`private_package`) in which the graded chapter's and every later chapter's
exercise regions are stubs and the course's answers (references, baselines, torch fallbacks) raise. It runs
under a nanny process (so killing its parent kills only the nanny), in its own session; at its end the
session is killed whole, and so is any process whose environment carries the run's random token.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import os
import re
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .checking import KernelLaunch, report_launches

PKG = Path(__file__).resolve().parent
ROOT = PKG.parent
_HEADER = struct.Struct(">Q")
OUTPUT_CAP = 1 << 20            # bytes of the child's stdout/stderr kept (the last ones); the rest is discarded
REPLY_SLACK = 64 << 20          # a reply may be this much larger than 4x its request
TOKEN_VAR = "TRITON_MOE_RUN_TOKEN"

NANNY = r"""
import os, subprocess, sys
fds = (int(sys.argv[1]), int(sys.argv[2]))
p = subprocess.Popen(sys.argv[3:], pass_fds=fds)
for fd in fds:
    os.close(fd)
rc = p.wait()
sys.exit(rc if rc >= 0 else 128 - rc)
"""


ZYGOTE_CODE = r"""
import json, os, signal, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
import torch, triton, triton.language, numpy  # the slow imports, once; no learner code ever runs here
try:
    import triton.runtime.interpreter
except ImportError:
    pass
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # nannies are reaped automatically
sock.sendall(b"up\n")
while True:
    try:
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
    except OSError:
        os._exit(0)
    if not msg:
        os._exit(0)
    req = json.loads(msg)
    p2c_r, c2p_w, out_w, status_w = fds
    pid = os.fork()
    if pid == 0:  # the nanny: a session of its own; the learner's process is its child
        try:
            sock.close()
            os.setsid()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            child = os.fork()
            if child == 0:
                os.close(status_w)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out_w, 1)
                os.dup2(out_w, 2)
                os.close(out_w)
                os.chdir(req["dir"])
                os.environ.clear()
                os.environ.update(req["env"])
                sys.path[:0] = [req["dir"]]
                sys.argv = ["sandbox_child"]
                from triton_moe.sandbox_child import run
                run(p2c_r, c2p_w)
                os._exit(0)
            for fd in (p2c_r, c2p_w, out_w):
                os.close(fd)
            os.write(status_w, b"c%d\n" % child)
            _, status = os.waitpid(child, 0)
            rc = os.waitstatus_to_exitcode(status)
            os.write(status_w, b"r%d\n" % (rc if rc >= 0 else 128 - rc))
        finally:
            os._exit(0)
    for fd in fds:
        os.close(fd)
    sock.sendall(json.dumps({"pid": pid}).encode() + b"\n")
"""


class _ForkedNanny:
    """The nanny of a child forked by the zygote: its pid (= its session and process group) and the exit
    code it reports through a pipe. Quacks like the Popen it replaces."""

    def __init__(self, pid: int, status_r: int):
        self.pid, self.status_r, self.rc, self.child, self.buf = pid, status_r, None, None, b""

    def poll(self):
        while self.rc is None and self.status_r is not None:
            r, _, _ = select.select([self.status_r], [], [], 0)
            if not r:
                break
            data = os.read(self.status_r, 64)
            if not data:  # the nanny is gone without a word: it was killed
                os.close(self.status_r)
                self.status_r = None
                self.rc = -9
                break
            self.buf += data
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.startswith(b"c") and line[1:].isdigit():
                    self.child = int(line[1:])
                elif line.startswith(b"r"):
                    try:
                        self.rc = int(line[1:])
                    except ValueError:
                        self.rc = -9
        return self.rc

    def wait(self, timeout=None):
        end = time.monotonic() + (timeout or 0)
        while self.poll() is None:
            if time.monotonic() >= end:
                raise subprocess.TimeoutExpired("nanny", timeout)
            time.sleep(0.05)
        return self.rc


class Zygote:
    """A fork server: one process that imported torch and Triton (nothing of the course, no learner code)
    forks each child, so a notebook's start-up does not pay those imports again (seconds each)."""

    def __init__(self):
        self.proc, self.sock, self.lock = None, None, threading.Lock()
        self.token = secrets.token_hex(16)  # carried by every process it forks (see kill_token)

    def _start(self, env):
        import socket

        if self.proc is not None:
            self.stop()
        mine, theirs = socket.socketpair()
        zenv = dict(env)
        zenv[TOKEN_VAR] = self.token
        zenv["PYTHONPATH"] = os.pathsep.join(child_sys_path())
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", ZYGOTE_CODE, str(theirs.fileno())],
                                     env=zenv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     pass_fds=(theirs.fileno(),),
                                     start_new_session=True, cwd=tempfile.gettempdir())
        theirs.close()
        self.sock = mine
        self.sock.settimeout(300)
        self._line()  # "up": the imports are done

    def _line(self) -> bytes:
        buf = b""
        while not buf.endswith(b"\n"):
            b = self.sock.recv(4096)
            if not b:
                raise OSError("the fork server ended")
            buf += b
        return buf

    def spawn(self, directory: str, env: dict, p2c_r: int, c2p_w: int, out_w: int) -> _ForkedNanny:
        import json
        import socket

        status_r, status_w = os.pipe()
        try:
            with self.lock:
                for attempt in (0, 1):
                    try:
                        if self.proc is None or self.proc.poll() is not None:
                            self._start(env)
                        socket.send_fds(self.sock, [json.dumps({"dir": directory, "env": env}).encode()],
                                        [p2c_r, c2p_w, out_w, status_w])
                        pid = json.loads(self._line())["pid"]
                        return _ForkedNanny(int(pid), status_r)
                    except (OSError, ValueError, KeyError):
                        if attempt:
                            raise
                        self.stop()
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
            self.proc = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        kill_token(self.token)


ZYGOTE = Zygote()
USE_ZYGOTE = hasattr(os, "fork") and os.environ.get("TRITON_MOE_NO_ZYGOTE") != "1"


def end_of_run() -> None:
    """Stop the fork server and kill whatever any child of this run left behind."""
    ZYGOTE.stop()


import atexit as _atexit  # noqa: E402

_atexit.register(end_of_run)


class ChildDied(BaseException):
    """The learner's process ended (exit, crash, kill) or stopped answering. A BaseException so that a
    checker's ``except Exception`` cannot mistake it for the learner's error."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidReply(Exception):
    pass


class CannotSend(BaseException):
    """A checker passed the proxy something that cannot travel to the child (a checker's limitation, not the
    learner's error)."""


# --------------------------------------------------------------------------------------------------
# The private package copy


_MIRRORS = re.compile(r"#\s*mirrors:\s*(triton_moe/[\w/]+\.py)")


def module_chapters() -> dict[str, str]:
    """Package file (relative to the repository, 'triton_moe/kernels/routing.py') -> the first chapter whose
    solution notebook shows it (cell metadata ``triton_moe.from`` or a ``# mirrors:`` line)."""
    import nbformat

    out: dict[str, str] = {}
    for nb_path in sorted((ROOT / "solutions").glob("[0-9][0-9]-*.ipynb")):
        chapter = nb_path.name[:2]
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            files = _MIRRORS.findall(cell.source)
            mod = (cell.metadata.get("triton_moe") or {}).get("from")
            if mod:
                files.append(mod.replace(".", "/") + ".py")
            for f in files:
                out.setdefault(f, chapter)
    return out


UNAVAILABLE = "not available while grading: write it yourself in the notebook"
# Functions that compute an exercise's answer; in the private copy they raise.
ANSWER_MODULES = {"triton_moe/baselines.py": None, "triton_moe/reference.py": {
    "route_reference", "expert_mlp_reference", "swiglu_intermediate_reference", "moe_reference",
    "expert_contributions", "sorted_dispatch_reference"}}
# Host functions of a later chapter's module that compute an earlier exercise's answer (replaced while an
# earlier chapter is graded; the chapter that owns them may use them).
LATER_ANSWERS = {"route", "dispatch"}


def _answer_function(rel: str, name: str, later_chapter: bool) -> bool:
    if rel in ANSWER_MODULES:
        names = ANSWER_MODULES[rel]
        return names is None or name in names
    if name.endswith(("_reference", "_torch")):
        return True
    return later_chapter and name in LATER_ANSWERS


def _neutralise(source: str, rel: str, later_chapter: bool) -> str:
    """Replace the bodies of answer functions with ``raise RuntimeError(UNAVAILABLE)``; keep any function
    that module-level code uses (the module must still import) and every ``@triton.jit`` kernel (their
    exercise regions are already stubs; launches of course kernels are judged separately)."""
    tree = ast.parse(source)
    used_at_import = set()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            used_at_import |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.ClassDef):
            used_at_import |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        else:
            for d in node.decorator_list:
                used_at_import |= {n.id for n in ast.walk(d) if isinstance(n, ast.Name)}
    lines = source.split("\n")
    edits = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name in used_at_import or _is_jit(node):
            continue
        if not _answer_function(rel, node.name, later_chapter):
            continue
        first = node.body[0]
        indent = " " * first.col_offset
        edits.append((first.lineno - 1, node.end_lineno, f"{indent}raise RuntimeError({node.name + ': ' + UNAVAILABLE!r})"))
    for start, end, text in sorted(edits, reverse=True):
        lines[start:end] = [text]
    return "\n".join(lines)


def _is_jit(node) -> bool:
    for d in getattr(node, "decorator_list", []):
        target = d.func if isinstance(d, ast.Call) else d
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name in ("jit", "autotune", "heuristics"):
            return True
    return False


_PACKAGE_CACHE: dict[str, dict[str, bytes]] = {}
DATA_FOLDERS = ("docs", "results")             # data the notebooks read, copied beside the private package
DATA_SUFFIXES = (".json", ".csv", ".md", ".txt", ".log")
_PACKAGE_LOCK = threading.Lock()


def private_package(chapter: str) -> dict[str, bytes]:
    """{relative path: bytes} of the package as a submission of ``chapter`` sees it (cached per chapter)."""
    from .notebooks import strip_solutions

    with _PACKAGE_LOCK:
        if chapter in _PACKAGE_CACHE:
            return _PACKAGE_CACHE[chapter]
        chapters = module_chapters_cached()
        files = {}
        for path in sorted(PKG.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".so"):
                continue
            rel = path.relative_to(ROOT).as_posix()
            data = path.read_bytes()
            if path.suffix == ".py":
                text = data.decode()
                own = chapters.get(rel)
                later = own is not None and own >= chapter
                if later and "### BEGIN SOLUTION" in text:
                    text = strip_solutions(text, rel)
                text = _neutralise(text, rel, own is not None and own > chapter)
                data = text.encode()
            files[rel] = data
        for folder in DATA_FOLDERS:  # what the notebooks read beside the package (the compile report, timings)
            for path in sorted((ROOT / folder).rglob("*")):
                if path.is_file() and path.suffix in DATA_SUFFIXES and path.stat().st_size <= 8 << 20:
                    files[path.relative_to(ROOT).as_posix()] = path.read_bytes()
        _PACKAGE_CACHE[chapter] = files
        return files


def child_sys_path() -> list[str]:
    """The parent's import path without the repository (the child gets the private copy instead)."""
    root = str(ROOT)
    out = []
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        rp = os.path.realpath(p)
        installed = os.sep + "site-packages" in rp or os.sep + "dist-packages" in rp  # e.g. the course's .venv
        if rp == root or (rp.startswith(root + os.sep) and not installed) or rp == os.path.realpath(os.getcwd()):
            continue
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# Killing


def kill_token(token: str) -> int:
    """SIGKILL every process whose environment carries ``TOKEN_VAR=token`` (daemonised grandchildren too)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    killed = 0
    for _ in range(3):  # a dying fork bomb can spawn a few more: sweep until none is left
        found = 0
        for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                try:
                    os.kill(int(d), signal.SIGKILL)
                    found += 1
                except OSError:
                    pass
        killed += found
        if not found:
            break
        time.sleep(0.05)
    return killed


# --------------------------------------------------------------------------------------------------
# One child


class _OutputTail(threading.Thread):
    """Reads the child's stdout+stderr, keeping the last OUTPUT_CAP bytes (never unbounded in memory)."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd, self.buf, self.total, self.stop = fd, bytearray(), 0, False

    def run(self):
        try:
            while not self.stop:
                r, _, _ = select.select([self.fd], [], [], 0.2)
                if not r:
                    continue
                b = os.read(self.fd, 1 << 16)
                if not b:
                    break
                self.total += len(b)
                self.buf += b
                if len(self.buf) > 2 * OUTPUT_CAP:
                    del self.buf[: len(self.buf) - OUTPUT_CAP]
        except OSError:
            pass
        finally:
            os.close(self.fd)

    def tail(self, n: int = 600) -> str:
        text = bytes(self.buf[-OUTPUT_CAP:]).decode(errors="replace")
        return text[-n:]


@dataclasses.dataclass
class CellInfo:
    number: int        # position of the cell in the notebook, 1-based
    source: str


class Child:
    """The learner's process: started, fed the cells, then serving calls until closed."""

    def __init__(self, cells: list[CellInfo], names: list[str], stem: str, chapter: str, deadline: float):
        self.deadline = deadline
        self.calls = 0
        self.last_call = ""
        self.dead: str | None = None
        self.token = secrets.token_hex(16)
        self.dir = Path(tempfile.mkdtemp(prefix="triton_moe_grade_"))
        for rel, data in private_package(chapter).items():
            p = self.dir / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        # No copy of the notebook and no cell files here: a neighbour graded at the same time could read them.
        self.cells_dir = os.path.realpath(self.dir / "cells")
        self.pkg_dir = os.path.realpath(self.dir / "triton_moe")
        p2c_r, self.p2c = os.pipe()
        self.c2p, c2p_w = os.pipe()
        out_r, out_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_MOE_SEED", "PYTHONPATH", "PYTHONSTARTUP")}
        env.update(TRITON_MOE_GRADING="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=os.pathsep.join([str(self.dir)] + child_sys_path()), **{TOKEN_VAR: self.token})
        try:
            self.nanny = ZYGOTE.spawn(str(self.dir), env, p2c_r, c2p_w, out_w) if USE_ZYGOTE else None
        except OSError:
            self.nanny = None
        try:
            if self.nanny is None:  # no fork server: start Python afresh (slower: imports torch again)
                child_cmd = [sys.executable, "-S", "-m", "triton_moe.sandbox_child", str(p2c_r), str(c2p_w)]
                self.nanny = subprocess.Popen(
                    [sys.executable, "-S", "-c", NANNY, str(p2c_r), str(c2p_w), *child_cmd],
                    cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w,
                    pass_fds=(p2c_r, c2p_w), start_new_session=True)
        finally:
            for fd in (p2c_r, c2p_w, out_w):
                os.close(fd)
        self.output = _OutputTail(out_r)
        self.output.start()
        self.cell = None
        self.hello = {"op": "hello", "names": names, "stem": stem, "cells": [(c.number, c.source) for c in cells]}

    # -- transport --------------------------------------------------------------------------------

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def _send(self, obj) -> int:
        buf = io.BytesIO()
        try:
            torch.save(obj, buf)
        except Exception as exc:  # noqa: BLE001
            raise CannotSend(f"the grader cannot send these arguments to the notebook's process: "
                             f"{type(exc).__name__}: {exc}") from None
        data = _HEADER.pack(len(buf.getvalue())) + buf.getvalue()
        view = memoryview(data)
        os.set_blocking(self.p2c, False)
        try:
            while view:
                _, w, _ = select.select([], [self.p2c], [], min(self._remaining(), 1.0))
                if w:
                    view = view[os.write(self.p2c, view):]
        except (BrokenPipeError, ConnectionResetError):
            raise EOFError from None
        return len(data)

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            r, _, _ = select.select([self.c2p], [], [], min(self._remaining(), 1.0))
            if not r:
                continue
            b = os.read(self.c2p, min(left, 1 << 20))
            if not b:
                raise EOFError
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)

    def _recv(self, cap: int):
        (n,) = _HEADER.unpack(self._read_exact(_HEADER.size))
        if n > cap:
            raise InvalidReply(f"a reply of {n} bytes (more than the {cap} allowed)")
        data = self._read_exact(n)
        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location=None)
        except Exception as exc:  # noqa: BLE001  (garbage from the learner's process)
            raise InvalidReply(f"unreadable reply ({type(exc).__name__})") from None

    # -- protocol ---------------------------------------------------------------------------------

    def wait_ready(self) -> dict:
        """Run the cells; returns {"errors": [...], "functions": {...}}. Raises ChildDied."""
        try:
            self._send(self.hello)
            while True:
                msg = self._recv(16 << 20)
                if not isinstance(msg, dict):
                    raise InvalidReply("a reply that is not a message")
                if msg.get("op") == "cell" and isinstance(msg.get("cell"), int):
                    self.cell = msg["cell"]
                    self.output_mark = self.output.total
                    continue
                if msg.get("op") == "ready":
                    self.output_mark = self.output.total
                    errors = [str(e)[:2000] for e in msg.get("errors", [])][:200] \
                        if isinstance(msg.get("errors"), list) else []
                    fns = msg.get("functions") if isinstance(msg.get("functions"), dict) else {}
                    return {"errors": errors, "functions": fns}
                raise InvalidReply(f"an unexpected message {str(msg.get('op'))[:40]!r}")
        except TimeoutError:
            raise self._died("timeout", self._where_cells()) from None
        except EOFError:
            raise self._died("eof", self._where_cells()) from None
        except InvalidReply as exc:
            raise self._died(f"invalid reply ({exc})", self._where_cells()) from None

    first_lines: dict = {}

    def _where_cells(self) -> str:
        if self.cell is None:
            return "while starting"
        first = self.first_lines.get(self.cell, "")
        return f"while running notebook cell {self.cell}" + (f" ({first[:60]!r})" if first else "")

    def call(self, name: str, grid, args: tuple, kwargs: dict, recorder: list):
        if self.dead:
            raise ChildDied(self.dead)
        self.calls += 1
        self.exercise_calls += 1
        self.output_mark = self.output.total
        self.last_call = f"call {self.exercise_calls}: {name}{'[grid]' if grid is not None else ''}({_describe(args, kwargs)})"
        tensors = _tensors_in([args, kwargs], [])
        try:
            size = self._send({"op": "call", "id": self.calls, "name": name, "grid": grid,
                               "args": args, "kwargs": kwargs})
            reply = self._recv(4 * size + REPLY_SLACK)
            return self._apply(reply, tensors, recorder)
        except TimeoutError:
            raise self._died("timeout", f"during {self.last_call}") from None
        except EOFError:
            raise self._died("eof", f"during {self.last_call}") from None
        except InvalidReply as exc:
            raise self._died(f"invalid reply ({exc})", f"to {self.last_call}") from None

    def _apply(self, reply, tensors, recorder):
        if not (isinstance(reply, dict) and reply.get("op") == "result" and reply.get("id") == self.calls):
            raise InvalidReply("a reply to a call it was not asked")
        storages = reply.get("storages", {})
        if not isinstance(storages, dict):
            raise InvalidReply("storages")
        for i, data in storages.items():
            if not (isinstance(i, int) and 0 <= i < len(tensors) and isinstance(data, torch.Tensor)
                    and data.dtype == torch.uint8 and data.dim() == 1):
                raise InvalidReply("a tensor it was not given")
            target = _storage_bytes(tensors[i])
            if data.numel() != target.numel():
                raise InvalidReply("a tensor of the wrong size")
            target.copy_(data)
        launches = reply.get("launches", [])
        if not isinstance(launches, list) or len(launches) > 1_000_000:
            raise InvalidReply("launches")
        seen = []
        for item in launches:
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item)):
                raise InvalidReply("launches")
            seen.append(self.classify(*item))
        recorder.extend(seen)
        report_launches(seen)
        if reply.get("ok") is True:
            return _decode(reply.get("value"), tensors)
        err = reply.get("error")
        if not isinstance(err, dict):
            raise InvalidReply("error")
        raise _learner_error(*(str(err.get(k, ""))[:3000] for k in ("type", "text", "where")))

    def classify(self, name: str, filename: str) -> KernelLaunch:
        real = os.path.realpath(filename) if filename.startswith("/") else filename
        if real.startswith(self.cells_dir + os.sep) and name in self.learner_kernels:
            return KernelLaunch(name, "learner", stub=name in self.stub_kernels)
        if real.startswith(self.pkg_dir + os.sep):
            rel = "triton_moe/" + os.path.relpath(real, self.pkg_dir).replace(os.sep, "/")
            return KernelLaunch(name, "course", chapter=module_chapters_cached().get(rel))
        return KernelLaunch(name, "unknown")

    exercise_calls = 0   # calls of the exercise being checked (the grader resets it per exercise)
    output_mark = 0      # output bytes before the current call: only output printed since is shown on a crash
    learner_kernels: set = frozenset()
    stub_kernels: set = frozenset()

    def _died(self, how: str, where: str) -> ChildDied:
        """Kill the child and say what happened: how ("timeout", "eof" or "invalid reply (...)") and where."""
        rc = self.nanny.poll()
        if rc is None and how == "eof":
            try:
                rc = self.nanny.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                rc = None
        code = ""
        if rc not in (None, 0):
            code = f" (exit code {rc}" + (f", signal {signal.Signals(rc - 128).name}" if 128 < rc < 160 else "") + ")"
        if how == "timeout":
            verb = "process timed out"
        elif how == "eof":
            verb = "process crashed" if rc not in (None, 0) else "process exited"
        else:
            verb = f"process sent an {how}"
        time.sleep(0.1)  # let the reader thread take what the dying process printed
        fresh = self.output.total > self.output_mark
        tail = [ln for ln in self.output.tail(400).strip().splitlines() if ln.strip()]
        last = f"; its last output: {tail[-1][:200]!r}" if tail and fresh and how != "timeout" else ""
        self.dead = f"the notebook's {verb} {where}{code}{last}"
        self.close()
        return ChildDied(self.dead)

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            os.killpg(self.nanny.pid, signal.SIGKILL)
        except OSError:
            pass
        child = getattr(self.nanny, "child", None)
        if child is None and hasattr(self.nanny, "poll"):
            self.nanny.poll()
            child = getattr(self.nanny, "child", None)
        if child:
            try:  # the learner's process may have left the nanny's session (os.setsid)
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        kill_token(self.token)
        try:
            self.nanny.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.output.stop = True
        self.output.join(timeout=2)
        for fd in (self.p2c, self.c2p):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


_MC = None


def module_chapters_cached() -> dict:
    global _MC
    if _MC is None:
        _MC = module_chapters()
    return _MC


# --------------------------------------------------------------------------------------------------
# Values


from .sandbox_child import _tensors_in  # noqa: E402  (one walk over call values, both sides of the pipe)


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _describe(args, kwargs) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"tensor{list(v.shape)} {str(v.dtype).replace('torch.', '')}"
        if isinstance(v, (int, float, bool, str)) or v is None:
            return repr(v)[:20]
        return type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)[:300]


def _dataclasses() -> dict:
    from .configs import KernelConfig
    from .shapes import MoEShape

    return {"triton_moe.configs.KernelConfig": KernelConfig, "triton_moe.shapes.MoEShape": MoEShape}


class Opaque:
    """A value of a type that cannot travel (the learner returned e.g. a generator): checkers see its name."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self):
        return f"<{self.type_name} from the notebook>"


def _decode(v, tensors, depth=0):
    if depth > 22:
        raise InvalidReply("nested too deep")
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return v
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, list):
        return [_decode(x, tensors, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) >= 1:
        if "__tuple__" in v and isinstance(v["__tuple__"], list):
            return tuple(_decode(x, tensors, depth + 1) for x in v["__tuple__"])
        if "__dict__" in v and isinstance(v["__dict__"], list):
            out = {}
            for kv in v["__dict__"]:
                if not (isinstance(kv, list) and len(kv) == 2):
                    raise InvalidReply("dict")
                k = _decode(kv[0], tensors, depth + 1)
                if not isinstance(k, (str, int, float, bool, type(None), tuple)):
                    raise InvalidReply("dict key")
                out[k] = _decode(kv[1], tensors, depth + 1)
            return out
        if "__argview__" in v:
            i, off, size, stride = v.get("__argview__"), v.get("offset"), v.get("size"), v.get("stride")
            ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and x >= 0 for x in xs)  # noqa: E731
            if not (isinstance(i, int) and 0 <= i < len(tensors) and isinstance(off, int) and off >= 0
                    and ints(size) and ints(stride) and len(size) == len(stride)):
                raise InvalidReply("view")
            try:
                return tensors[i].as_strided(size, stride, off)
            except RuntimeError:
                raise InvalidReply("a view outside its tensor") from None
        if "__dataclass__" in v:
            cls = _dataclasses().get(v["__dataclass__"])
            fields = v.get("fields")
            if cls is None or not isinstance(fields, dict):
                return Opaque(str(v["__dataclass__"]).rsplit(".", 1)[-1][:60])
            values = {str(k): _decode(x, tensors, depth + 1) for k, x in fields.items()}
            try:
                return cls(**values)
            except Exception:  # noqa: BLE001
                raise InvalidReply(f"a {cls.__name__} that cannot be rebuilt") from None
        if "__opaque__" in v:
            return Opaque(str(v["__opaque__"])[:60])
    raise InvalidReply(f"a value of type {type(v).__name__}")


_BUILTIN_ERRORS = {}
for _n in ("NotImplementedError", "ValueError", "TypeError", "IndexError", "KeyError", "RuntimeError",
           "AssertionError", "AttributeError", "ZeroDivisionError", "NameError", "UnboundLocalError",
           "OverflowError", "ArithmeticError"):
    import builtins as _b

    _BUILTIN_ERRORS[_n] = getattr(_b, _n)


class LearnerError(Exception):
    """An exception the learner's code raised in the child (one that is no builtin exception here)."""


def _learner_error(type_name: str, text: str, where: str) -> Exception:
    cls = _BUILTIN_ERRORS.get(type_name, LearnerError)
    message = text.split(": ", 1)[1] if text.startswith(type_name + ": ") else text
    exc = cls(message) if cls is not LearnerError else LearnerError(text)
    exc.learner_text = text
    exc.learner_where = where
    return exc


class Proxy:
    """Stands in for the learner's function in the parent's checker: ``proxy(*args)`` and
    ``proxy[grid](*args)`` (for a ``@triton.jit`` kernel) run it in the child."""

    def __init__(self, session, name: str, info: dict):
        self._session, self.__name__, self._info = session, name, info
        self.launch_records: list = []

    def __call__(self, *args, **kwargs):
        return self._session.call(self.__name__, None, args, kwargs, self.launch_records)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid
            if callable(g):
                meta = dict(zip(self._info.get("arg_names") or [], args))
                meta.update(kwargs)
                g = g(meta)
            g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
            return self._session.call(self.__name__, g, args, kwargs, self.launch_records)
        return launch

    def __repr__(self):
        return f"<the notebook's {self.__name__}>"
