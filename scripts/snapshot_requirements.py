"""Write ``tests/fixtures/declared_requirements.json``: the ``Requires-Dist`` lines of every pinned wheel on each
platform, read from the package indexes' per-wheel metadata (PEP 658 ``<wheel>.metadata``: about 40 KB for
torch's 530 MB CUDA wheel), so ``tests/test_pins_resolve.py`` can check the pins offline.

    python scripts/snapshot_requirements.py          # re-run after changing a pin in requirements.txt

Sources, per platform: ``linux-nvidia`` torch and every other pin from PyPI (cp312, manylinux x86_64 or a pure
wheel); ``linux-cpu`` torch from PyTorch's CPU index, or, where that is unreachable, a ``torch-<v>+cpu`` wheel in
one of pip's ``find-links`` folders (its METADATA read from the zip); ``linux-amd`` torch from
:data:`pins.ROCM_INDEX`, or, where unreachable, the entry already in the snapshot is kept (with its stated
source). Every entry records where it came from.
"""
from __future__ import annotations

import datetime as _dt
import email.parser
import io
import json
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pins  # noqa: E402

SNAPSHOT = pins.ROOT / "tests" / "fixtures" / "declared_requirements.json"
PYPI_SIMPLE = "https://pypi.org/simple"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PY = "312"  # the wheel build whose metadata is read (the GPU machine's Python)


def _get(url: str, timeout: float = 10.0, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        _get(url, timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means "use the snapshot"
        return False


def index_files(index: str, name: str) -> list[dict]:
    """``[{"filename", "url"}]`` of ``name`` on a PEP 691 (JSON) or PEP 503 (HTML) simple index."""
    url = f"{index.rstrip('/')}/{pins.canonical(name)}/"
    body = _get(url, accept="application/vnd.pypi.simple.v1+json, text/html;q=0.5").decode()
    if body.lstrip().startswith("{"):
        return [{"filename": f["filename"], "url": f["url"]} for f in json.loads(body)["files"]]
    out = []
    for href in re.findall(r'href="([^"]+)"', body):
        href = href.split("#", 1)[0]
        full = urllib.request.urljoin(url, href)
        out.append({"filename": urllib.request.unquote(full.rsplit("/", 1)[-1]), "url": full})
    return out


def pick_wheel(files: list[dict], name: str, version: str, local: str = "") -> dict:
    """The Linux x86_64 cp312 wheel of ``name==version`` (``+local`` label if given), else a pure wheel."""
    stem = re.sub(r"[-_.]+", "_", name).lower()
    want = f"{version}+{local}" if local else version
    mine = [f for f in files if f["filename"].endswith(".whl")
            and f["filename"].lower().startswith(f"{stem}-{want.lower()}-")]
    for pattern in (rf"-cp{PY}-cp{PY}-.*manylinux.*x86_64", rf"-cp{PY}-cp{PY}-linux_x86_64",
                    r"-abi3-.*manylinux.*x86_64", r"-py3-none-any", r"-py2\.py3-none-any"):
        for f in mine:
            if re.search(pattern, f["filename"]):
                return f
    raise LookupError(f"no Linux x86_64 cp{PY} or pure wheel of {name}=={want} among {len(files)} files")


def requires_dist(metadata: bytes | str) -> list[str]:
    text = metadata.decode() if isinstance(metadata, bytes) else metadata
    return email.parser.Parser().parsestr(text, headersonly=True).get_all("Requires-Dist") or []


class _RemoteFile(io.RawIOBase):
    """A wheel on an index read by HTTP range requests (for :mod:`zipfile`: the central directory and one
    member, a few KB, instead of the whole file), for wheels whose index serves no ``.metadata`` file."""

    def __init__(self, url: str):
        self.url, self.pos = url, 0
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=30) as r:
            self.size = int(r.headers["Content-Length"])

    def seekable(self):
        return True

    def readable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
        self.pos += len(data)
        return data


def wheel_metadata(url: str) -> tuple[bytes, str]:
    """(the wheel's METADATA, where it was read): the PEP 658 ``.metadata`` file, else the zip member."""
    try:
        return _get(url + ".metadata", timeout=30), url + ".metadata"
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
    with zipfile.ZipFile(_RemoteFile(url)) as z:
        member = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(member), f"{url} ({member}, read by HTTP range requests)"


def remote_entry(index: str, name: str, version: str, local: str = "") -> dict:
    f = pick_wheel(index_files(index, name), name, version, local)
    metadata, source = wheel_metadata(f["url"].split("#")[0])
    return {"version": version, "wheel": f["filename"], "source": source, "requires_dist": requires_dist(metadata)}


def local_entry(name: str, version: str, local: str) -> dict | None:
    """The entry of a ``<name>-<version>+<local>`` wheel in one of pip's find-links folders, if any."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    for folder in dict.fromkeys(folders):
        for whl in sorted(Path(folder).glob(f"{name}-{version}+{local}-*.whl")) if Path(folder).is_dir() else []:
            with zipfile.ZipFile(whl) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                lines = requires_dist(z.read(meta))
            return {"version": version, "wheel": whl.name,
                    "source": f"local copy of PyTorch's CPU wheel ({whl.name}; METADATA read from the zip); "
                              f"{CPU_INDEX} was unreachable when the snapshot was written",
                    "requires_dist": lines}
    return None


def snapshot(old: dict | None = None) -> dict:
    pinned = pins.pinned()
    torch_v = pinned["torch"]
    wheels = {"any": {}, "linux-nvidia": {}, "linux-cpu": {}, "linux-amd": {}}
    for name, version in pinned.items():
        if name != "torch":
            wheels["any"][name] = remote_entry(PYPI_SIMPLE, name, version)
    wheels["linux-nvidia"]["torch"] = remote_entry(PYPI_SIMPLE, "torch", torch_v)
    if reachable(CPU_INDEX + "/torch/"):
        wheels["linux-cpu"]["torch"] = remote_entry(CPU_INDEX, "torch", torch_v, "cpu")
    else:
        entry = local_entry("torch", torch_v, "cpu")
        if entry is None:
            raise SystemExit(f"{CPU_INDEX} is unreachable and no local torch-{torch_v}+cpu wheel was found")
        wheels["linux-cpu"]["torch"] = entry
    rocm = pins.ROCM_INDEX.rsplit("/", 1)[-1]
    if reachable(pins.ROCM_INDEX + "/torch/"):
        wheels["linux-amd"]["torch"] = remote_entry(pins.ROCM_INDEX, "torch", torch_v, rocm)
    else:
        kept = ((old or {}).get("wheels", {}).get("linux-amd", {}).get("torch"))
        if not kept or kept.get("version") != torch_v:
            raise SystemExit(f"{pins.ROCM_INDEX} is unreachable and the snapshot has no ROCm entry for torch "
                             f"{torch_v}: write it by hand (its Requires-Dist on pytorch-triton-rocm, with its "
                             "source) or run this where the index is reachable")
        wheels["linux-amd"]["torch"] = kept
    return {"about": "Requires-Dist of every pinned wheel per platform (Linux x86_64, cp312), for "
                     "tests/test_pins_resolve.py; written by scripts/snapshot_requirements.py. 'any' holds the "
                     "wheels every platform installs alike.",
            "written": _dt.date.today().isoformat(), "marker_env": pins.MARKER_ENV, "wheels": wheels}


def declared(snap: dict, platform: str) -> dict[str, list[str]]:
    """name -> Requires-Dist of the pinned wheels installed on ``platform``, from a snapshot."""
    w = snap["wheels"]
    return {name: e["requires_dist"] for name, e in {**w["any"], **w[platform]}.items()}


def main() -> int:
    old = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else None
    snap = snapshot(old)
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(snap, indent=1) + "\n")
    for platform in pins.PLATFORMS:
        found = pins.conflicts(pins.pinned_for(platform), declared(snap, platform))
        print(f"{platform}: " + ("; ".join(found) if found else "consistent"))
    print(f"wrote {SNAPSHOT.relative_to(pins.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
