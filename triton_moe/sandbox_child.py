"""The learner's side of grading: runs inside the child process, with the private package copy on its path.

It knows nothing of the seed, the inputs or the scoring. It reads messages from the grading parent on an
inherited pipe, executes the notebook's code cells it is sent, then serves calls: "call the function named
N with these arguments", replying with the return value, the post-call bytes of every tensor argument's
storage that changed (kernels write into output buffers in place), the Triton kernels launched during the
call and, when the learner's code raised, where in the learner's cells it did. The parent decides what
any of it is worth (see :mod:`triton_moe.sandbox`).

    python -S -m triton_moe.sandbox_child FD_IN FD_OUT
"""
from __future__ import annotations

import dataclasses
import io
import linecache
import os
import struct
import sys
import traceback

_HEADER = struct.Struct(">Q")


class _Channel:
    def __init__(self, fd_in: int, fd_out: int):
        self.fd_in, self.fd_out = fd_in, fd_out

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            b = os.read(self.fd_in, min(left, 1 << 20))
            if not b:
                os._exit(0)  # the parent is gone: nothing to serve
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)

    def recv(self):
        import torch

        (n,) = _HEADER.unpack(self._read_exact(_HEADER.size))
        # The sender is the grading parent (trusted): its messages may hold the course's dataclasses.
        return torch.load(io.BytesIO(self._read_exact(n)), weights_only=False)

    def send(self, obj) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.fd_out, view):]


# --------------------------------------------------------------------------------------------------
# Kernel launches


_launches: list | None = None


def _install_launch_hooks() -> None:
    """Record every Triton kernel launch (compiled and interpreted) as (kernel name, file it was defined in)."""
    from triton.runtime import jit

    targets = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        targets.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every supported Triton has the interpreter
        pass
    for cls in targets:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if _launches is not None:
                fn = getattr(self, "fn", None)
                code = getattr(fn, "__code__", None)
                _launches.append([str(getattr(fn, "__name__", "?")), str(getattr(code, "co_filename", "?"))])
            return _original(self, *args, **kwargs)

        cls.run = run


# --------------------------------------------------------------------------------------------------
# Values to the parent: plain types and tensors only (the parent loads them with weights_only=True)


def _encode(value, args: list, depth: int = 0):
    import torch

    if depth > 20:
        return {"__opaque__": "nested too deep"}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        for i, a in enumerate(args):  # a view of an argument (e.g. the output buffer): say which
            if (a.dtype == value.dtype and a.device == value.device and
                    value.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()):
                return {"__argview__": i, "offset": value.storage_offset(), "size": list(value.shape),
                        "stride": list(value.stride())}
        return value.detach().contiguous()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, args, depth + 1) for v in value]}
    if isinstance(value, list):
        return [_encode(v, args, depth + 1) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, args, depth + 1), _encode(v, args, depth + 1)] for k, v in value.items()]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"__dataclass__": f"{cls.__module__}.{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(value, f.name), args, depth + 1) for f in dataclasses.fields(value)}}
    return {"__opaque__": type(value).__name__}


def _tensors_in(obj, out: list) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_in(v, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. chapter 8's QuantizedExperts
        for f in dataclasses.fields(obj):
            _tensors_in(getattr(obj, f.name), out)
    return out


def _storage_bytes(t):
    import torch

    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


# --------------------------------------------------------------------------------------------------
# Where the learner's code failed


def _location(exc):
    from triton_moe.checking import learner_location  # the private copy's: same rule as in a notebook

    return learner_location(exc)


# --------------------------------------------------------------------------------------------------
# Serving


def _strip_magics(src: str) -> str:
    return "\n".join("pass  # " + line if line.lstrip().startswith(("%", "!")) else line for line in src.split("\n"))


def main(fd_in: int, fd_out: int) -> None:
    os.set_inheritable(fd_in, False)   # the learner's subprocesses do not get the pipe
    os.set_inheritable(fd_out, False)
    chan = _Channel(fd_in, fd_out)
    import triton_moe  # noqa: F401  (the private copy: decides the mode before any kernel exists)

    _install_launch_hooks()
    hello = chan.recv()
    names, cells, stem = hello["names"], hello["cells"], hello["stem"]
    ns: dict = {"__name__": "__main__", "display": print}
    errors, cell_files = [], {}
    cells_dir = os.path.abspath("cells")
    for number, src in cells:
        chan.send({"op": "cell", "cell": number})
        # The cell's source lives only in memory (linecache), under a file name that says which cell it is:
        # @triton.jit and tracebacks read it from there, and no neighbour running beside it can read it.
        path = os.path.join(cells_dir, f"{stem}_cell_{number:02d}.py")
        code = _strip_magics(src)
        linecache.cache[path] = (len(code), None, [ln + "\n" for ln in code.split("\n")], path)
        cell_files[path] = number
        try:
            exec(compile(code, path, "exec"), ns)
        except BaseException as exc:  # noqa: BLE001  (a learner's SystemExit must not end serving)
            text, where = _location(exc)
            errors.append(f"cell {number}: {text}" + (f" ({where})" if where and not where.startswith(f"cell {number},") else ""))
    functions = {}
    for name in names:
        obj = ns.get(name)
        if obj is None:
            functions[name] = {"kind": "missing"}
            continue
        kind = "jit" if hasattr(obj, "run") and hasattr(obj, "fn") else ("function" if callable(obj) else "other")
        arg_names = getattr(obj, "arg_names", None)
        functions[name] = {"kind": kind, "arg_names": [str(a) for a in arg_names] if arg_names else []}
    chan.send({"op": "ready", "errors": errors, "functions": functions})
    while True:
        msg = chan.recv()
        if msg.get("op") != "call":
            os._exit(0)
        _serve_call(chan, ns, msg, cell_files)


def _serve_call(chan, ns, msg, cell_files):
    global _launches
    import torch

    args, kwargs = msg["args"], msg["kwargs"]
    tensors = _tensors_in([args, kwargs], [])
    before = [_storage_bytes(t).clone() for t in tensors]
    _launches = []
    reply = {"op": "result", "id": msg["id"]}
    try:
        fn = ns[msg["name"]]
        if msg.get("grid") is not None:
            fn = fn[msg["grid"]]
        value = fn(*args, **kwargs)
        reply["ok"] = True
        reply["value"] = _encode(value, tensors)
    except BaseException as exc:  # noqa: BLE001
        text, where = _location(exc)
        reply["ok"] = False
        reply["error"] = {"type": type(exc).__name__, "text": text, "where": where}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    reply["launches"], _launches = _launches, None
    changed = {}
    for i, (t, old) in enumerate(zip(tensors, before)):
        now = _storage_bytes(t)
        if now.numel() != old.numel() or not torch.equal(now, old):
            changed[i] = now.clone()
    reply["storages"] = changed
    chan.send(reply)


def run(fd_in: int, fd_out: int) -> None:
    try:
        main(fd_in, fd_out)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)
    os._exit(0)


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]))
