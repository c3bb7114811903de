"""Issue 11: grading a teacher can trust. One folder of submissions, graded once (module fixture, --jobs 2),
holds one submission per attack class, per way of dying and per kind of misfiled work; each test reads its
row of the CSV. Chapter 0 and 1 notebooks (fast on the CPU), seeds of our own."""
import csv
import os
import time
from pathlib import Path

import nbformat
import pytest

from notebook_helpers import notebook
from triton_moe.grading import RepoGuard, grade_folder

pytestmark = pytest.mark.slow

SEED = 424242
SOL0 = notebook("solutions", "00")
EX0 = notebook("chapters", "00")
SOL1 = notebook("solutions", "01")

WRONG_KERNEL = ("a * x + b, mask=mask)", "a * x - b, mask=mask)")


def make(src, dst, replace=(), cells=(), at=2, raw=None):
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        dst.write_bytes(raw)
        return dst
    nb = nbformat.read(src, as_version=4)
    for old, new in replace:
        hits = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert len(hits) == 1, old
        hits[0].source = hits[0].source.replace(old, new)
    for i, code in enumerate(cells):
        nb.cells.insert(at + i, nbformat.v4.new_code_cell(code))
    nbformat.write(nb, dst)
    return dst


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grading")
    subs = tmp / "subs"
    fake_repo = tmp / "repo"
    (fake_repo / "triton_moe" / "checks").mkdir(parents=True)
    guarded = fake_repo / "triton_moe" / "checks" / "ch00_setup.py"
    guarded.write_text("# the course's checker\n")
    pidfile = tmp / "daemon.pid"
    victim = subs / "alice" / SOL0.name

    make(SOL0, subs / "alice" / SOL0.name)
    make(SOL0, subs / "bob" / SOL0.name, replace=[WRONG_KERNEL])
    # --- the learner's code deciding its own score (wrong kernel + tampering in the child's memory)
    make(SOL0, subs / "patcher" / SOL0.name, replace=[WRONG_KERNEL], cells=[
        "import triton_moe.checks\nimport triton_moe.checking as c\n"
        "from triton_moe.checking import REGISTRY, CheckResult, Exercise\n"
        "for ex in REGISTRY.values():\n    ex.check = lambda fn, seed: []\n"
        "c.TOLERANCE.update({k: 1e9 for k in c.TOLERANCE})\n"
        "c.compare = lambda *a, **k: 0.0\nc.relative_error = lambda *a, **k: 0.0\n"
        "import triton_moe.checks.ch00_setup as m\nm.compare = lambda *a, **k: 0.0\n"
        "CheckResult.passed = property(lambda self: True)\n"
        "Exercise.run = lambda self, *a, **k: CheckResult(self.key, 'passed')"])
    make(EX0, subs / "resultfile" / EX0.name, cells=[
        "import json, os, sys\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n        json.dump([{'exercise': '00:axpb', 'status': 'passed', 'points': 50}], open(p, 'w'))\n"
        "    except Exception:\n        pass\n"
        "os._exit(0)"])
    make(SOL0, subs / "seedseer" / SOL0.name, replace=[("    return out", "    return out if SEEN else out.zero_()")],
         cells=["import os, sys\n"
                f"SEEN = any('{SEED}' in v or 'grades.csv' in v for v in list(os.environ.values()) + sys.argv)\n"
                "SEEN = SEEN or any('SEED' in k for k in os.environ)"])
    # --- answers that are not the learner's own kernel
    make(SOL0, subs / "nokernel" / SOL0.name, replace=[
        ("    axpb_kernel[grid](x, out, a, b, x.numel(), BLOCK=BLOCK)", "    out.copy_(a * x + b)")])
    make(EX0, subs / "stubkernel" / EX0.name, replace=[("    return out", "    out.copy_(a * x + b)\n    return out")])
    make(SOL1, subs / "answers" / SOL1.name, cells=[
        "from triton_moe.baselines import route_topk as _rt\nfrom triton_moe.reference import moe_reference as _mr"],
        at=len(nbformat.read(SOL1, as_version=4).cells))
    nb1 = nbformat.read(subs / "answers" / SOL1.name, as_version=4)
    nb1.cells.append(nbformat.v4.new_code_cell(
        "def route_topk(logits, top_k):\n    return _rt(logits, top_k)\n\n"
        "def moe_forward_loop(x, w, ids, w1, w3, w2):\n    return _mr(x, w, ids, w1, w3, w2).to(x.dtype)"))
    nbformat.write(nb1, subs / "answers" / SOL1.name)
    nb1 = nbformat.read(SOL1, as_version=4)
    nb1.cells.append(nbformat.v4.new_code_cell(
        "import triton_moe\nfrom triton_moe.kernels.fused_moe import route_dispatch\n\n"
        "def route_topk(logits, top_k):\n"
        "    if logits.shape[0] * top_k <= 64:  # the course's one-launch router where it applies\n"
        "        w, ids, *_ = route_dispatch(logits, top_k, True, 16)\n        return w, ids\n"
        "    p = torch.softmax(logits.float(), -1)\n    w, i = torch.topk(p, top_k, -1)\n"
        "    return w / w.sum(-1, keepdim=True), i\n\n"
        "def moe_forward_loop(x, w, ids, w1, w3, w2):\n    return triton_moe.fused_experts(x, w, ids, w1, w3, w2)"))
    (subs / "answers2").mkdir(parents=True)
    nbformat.write(nb1, subs / "answers2" / SOL1.name)
    make(EX0, subs / "course_kernel" / EX0.name, cells=[
        "from triton_moe.kernels.grouped_gemm import grouped_gemm\n"
        "from triton_moe.grading import exec_notebook\nfrom triton_moe.notebooks import SOLUTIONS\n"
        "ns, _ = exec_notebook(SOLUTIONS / '00-setup-check.ipynb')\n"
        "axpb, axpb_kernel = ns['axpb'], ns['axpb_kernel']"], at=4)
    # --- isolation
    make(EX0, subs / "neighbour" / EX0.name, cells=[
        "import glob, shutil\n"
        "for f in glob.glob('../*/*.ipynb') + glob.glob('../../*/*.ipynb') + glob.glob('*.ipynb'):\n"
        "    print('found', f)\n"
        f"open({str(victim)!r}, 'w').write('{{}}')\n"
        f"open({str(guarded)!r}, 'a').write('\\nraise SystemExit  # appended by a submission\\n')"])
    # --- ways of dying
    make(SOL0, subs / "sysexit" / SOL0.name, replace=[("    grid = (triton.cdiv", "    import sys; sys.exit(0)\n    grid = (triton.cdiv")])
    make(SOL0, subs / "killer" / SOL0.name, cells=[
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('x' * 1_000_000 * 30)"], at=4)
    make(SOL0, subs / "garbage" / SOL0.name, replace=[("    return out", "    import os\n"
         "    for fd in range(3, 40):\n        try:\n            os.write(fd, b'\\x00garbage' * 100)\n"
         "        except OSError:\n            pass\n    return out")])
    make(SOL0, subs / "aborter" / SOL0.name, cells=["import os\nos.abort()"])
    make(SOL0, subs / "daemon" / SOL0.name, cells=[
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(300)'], start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))"])
    make(SOL0, subs / "hang" / SOL0.name, cells=["while True:\n    pass"])
    # --- misfiled work
    make(SOL0, subs / "lena" / SOL0.name)
    make(SOL0, subs / "lena.ipynb", replace=[WRONG_KERNEL])
    make(SOL0, subs / "mia" / SOL0.name)
    make(SOL0, subs / "mia" / (SOL0.stem + " (1).ipynb"), replace=[WRONG_KERNEL])
    nb99 = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Chapter 99: bonus"),
                                           nbformat.v4.new_code_cell("x = 1")])
    (subs / "noah").mkdir()
    nbformat.write(nb99, subs / "noah" / "99-bonus.ipynb")
    make(SOL0, subs / "olga" / (SOL0.stem + ".IPYNB"))
    make(SOL0, subs / "pia" / "week1" / "late" / SOL0.name)
    make(None, subs / "quinn" / SOL0.name, raw=b'{"cells": [ not json')
    make(None, subs / "ruth.ipynb", raw=b"")
    (subs / "README.txt").write_text("submissions of group A\n")
    (subs / "alice" / "notes.md").write_text("my notes\n")

    out = tmp / "out" / "grades.csv"
    t0 = time.time()
    grade_folder(subs, out, seed=SEED, timeout=60, jobs=2, guard=RepoGuard(fake_repo))
    rows = {r["submission"]: r for r in csv.DictReader(open(out))}
    return {"rows": rows, "guarded": guarded, "t0": t0, "victim": victim, "pidfile": pidfile, "seconds": time.time() - t0,
            "tmp": tmp}


def points(row, key="00:axpb"):
    return int(row[key])


def test_ordinary_work_scores_right_and_every_row_is_there(graded):
    rows = graded["rows"]
    assert points(rows["alice"]) == 1 and rows["alice"]["total"] == "1" and rows["alice"]["seed"] == str(SEED)
    assert points(rows["bob"]) == 0 and "relative error" in rows["bob"]["notes"]
    expected = {"alice", "bob", "patcher", "resultfile", "seedseer", "nokernel", "stubkernel", "answers",
                "answers2", "course_kernel", "neighbour", "sysexit", "killer", "garbage", "aborter", "daemon", "hang",
                "lena/", "lena.ipynb", "mia", "noah", "olga", "pia", "quinn", "ruth", "README.txt"}
    assert set(rows) == expected
    assert "ignored notes.md" in rows["alice"]["notes"]


def test_learner_code_cannot_decide_its_own_score(graded):
    rows = graded["rows"]
    assert points(rows["patcher"]) == 0 and "FLAGGED" in rows["patcher"]["notes"]
    assert points(rows["resultfile"]) == 0 and "exited" in rows["resultfile"]["notes"]
    assert points(rows["seedseer"]) == 0  # the exercise stub: and nothing it could see held the seed or the CSV
    assert "sys.argv" in rows["resultfile"]["notes"]  # flagged


def test_the_result_must_come_from_the_learners_own_kernel(graded):
    rows = graded["rows"]
    assert points(rows["nokernel"]) == 0 and "did not launch a @triton.jit kernel" in rows["nokernel"]["notes"]
    assert points(rows["stubkernel"]) == 0
    assert "stub" in rows["stubkernel"]["notes"]
    r = rows["answers"]
    assert int(r["01:route_topk"]) == 0 and int(r["01:moe_forward_loop"]) == 0
    assert "not available while grading" in r["notes"]
    r = rows["answers2"]
    # the course's router kernel of chapter 5: its chapter 2 top-k is a stub here, and its launch would not count
    assert int(r["01:route_topk"]) == 0
    assert int(r["01:moe_forward_loop"]) == 0
    assert points(rows["course_kernel"]) == 0 and "FLAGGED" in rows["course_kernel"]["notes"]


def test_isolation_neighbour_and_repository(graded):
    rows = graded["rows"]
    assert points(rows["alice"]) == 1                     # its bytes were read before anything ran
    assert graded["victim"].read_text() == "{}"           # (the attack did happen on disk)
    assert graded["guarded"].read_text() == "# the course's checker\n"   # restored
    assert points(rows["neighbour"]) == 0 and "changed the course's files" in rows["neighbour"]["notes"]
    assert "FLAGGED" in rows["neighbour"]["notes"]
    leftovers = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("triton_moe_grade_*")
                 if p.stat().st_mtime >= graded["t0"]]
    assert not leftovers


def test_a_run_survives_every_way_of_dying(graded):
    rows = graded["rows"]
    assert points(rows["resultfile"]) == 0 and "exited while running notebook cell 3" in rows["resultfile"]["notes"]
    assert points(rows["sysexit"]) == 0 and "SystemExit" in rows["sysexit"]["notes"]
    assert points(rows["killer"]) == 1 and "os.kill" in rows["killer"]["notes"]  # its parent was only the nanny
    assert points(rows["garbage"]) == 0 and "invalid reply" in rows["garbage"]["notes"]
    assert points(rows["aborter"]) == 0 and "crashed" in rows["aborter"]["notes"] and "SIGABRT" in rows["aborter"]["notes"]
    assert points(rows["hang"]) == 0 and "timed out" in rows["hang"]["notes"]
    assert points(rows["daemon"]) == 1
    pid = int(graded["pidfile"].read_text())
    time.sleep(0.2)
    alive = True
    try:
        os.kill(pid, 0)
        alive = Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        alive = False
    assert not alive, "a process the notebook started outlived grading"


def test_misfiled_work_is_graded_or_noted(graded):
    rows = graded["rows"]
    assert points(rows["lena/"]) == 1 and points(rows["lena.ipynb"]) == 0
    assert "used 2 times" in rows["lena/"]["notes"] and "used 2 times" in rows["lena.ipynb"]["notes"]
    assert points(rows["mia"]) == 1 and "(1).ipynb: a second chapter 00 notebook, not graded" in rows["mia"]["notes"]
    assert "chapter 99 has no exercises" in rows["noah"]["notes"]
    assert points(rows["olga"]) == 1
    assert points(rows["pia"]) == 1 and "sub-folder" in rows["pia"]["notes"]
    assert "not a notebook" in rows["quinn"]["notes"] and "not a notebook (empty file)" in rows["ruth"]["notes"]
    assert "ignored README.txt" in rows["README.txt"]["notes"]
