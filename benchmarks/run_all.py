"""Run every benchmark of the course on this GPU, NVIDIA or AMD, and write ``results/<device>/``.

    PYTHONPATH=. python benchmarks/run_all.py [--quick] [--tune] [--only ch03,ch06] [--dry-run]
    benchmarks/amd.sh [same options]        # on a ROCm machine: checks the ROCm PyTorch first

Each chapter's script ``benchmarks/chNN_*.py`` runs in its own process (one failing script does not stop the
others) and writes ``results/<device slug>/chNN_*.csv`` in the one format the notebooks read
(``triton_moe.timing.COLUMNS``: device, vendor, versions, dtype, shapes, routing, ceilings measured in the same
run, floor per row). The device folder comes from the GPU's name, so an MI300X run lands in
``results/amd-instinct-mi300x/`` next to ``results/nvidia-h100-80gb-hbm3/`` and the chapters show both.

``--tune`` first runs the tuning scripts, which write this vendor's (or this device's) config tables into
``triton_moe/tables/``; without it the benchmarks use the committed tables, or on a vendor without one the
documented fallback of :mod:`triton_moe.vendor` (an adapted table, marked as such). The whole log goes to
``results/<device>/run_all.log``. To contribute numbers: commit ``results/<device>/`` (and the tables, if you
tuned) with the log.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Tuning scripts, in order (routers and dispatch first: later kernels' tables do not depend on them, but the
# benchmarks of chapter 2 do), with the arguments that make each write its table.
TUNERS = [("benchmarks/tune_routing.py", []), ("benchmarks/tune_grouped_gemm.py", []),
          ("scripts/tune_fused_moe.py", ["--write-tables"]), ("benchmarks/ch06_portability.py", ["--tune"])]


def benchmarks(only: list[str] | None = None) -> list[Path]:
    found = sorted((ROOT / "benchmarks").glob("ch[0-9][0-9]_*.py"))
    if only:
        found = [p for p in found if any(p.name.startswith(o) for o in only)]
    return found


def plan(quick: bool, tune: bool, only: list[str] | None) -> list[list[str]]:
    cmds = []
    if tune:
        for script, args in TUNERS:
            p = ROOT / script
            if p.exists() and (not only or any(p.name.startswith(o) or o in p.name for o in only)):
                extra = ["--quick"] if quick and "--quick" in p.read_text() else []
                cmds.append([script, *args, *extra])
    for p in benchmarks(only):
        if tune and p.name == "ch06_portability.py":
            continue  # its --tune run above also timed it
        extra = ["--quick"] if quick and "--quick" in p.read_text() else []
        cmds.append([str(p.relative_to(ROOT)), *extra])
    return cmds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes, where a script offers --quick")
    ap.add_argument("--tune", action="store_true", help="run the tuning scripts first (writes config tables)")
    ap.add_argument("--only", default="", help="comma-separated prefixes, e.g. ch03,ch06")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    a = ap.parse_args(argv)
    cmds = plan(a.quick, a.tune, [o for o in a.only.split(",") if o] or None)
    if a.dry_run:
        for c in cmds:
            print("python " + " ".join(c))
        return 0
    from triton_moe import mode
    from triton_moe.timing import results_path

    mode.require_gpu("run_all.py")
    info = mode.info()
    log_path = results_path("run_all").with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
               PYTHONUNBUFFERED="1")
    status = []
    with open(log_path, "a") as log:
        def say(text):
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"== run_all {_dt.datetime.now().isoformat(timespec='seconds')}: {info.device_name} ({info.vendor}), "
            f"torch {info.torch_version}, triton {info.triton_version}, {info.runtime_version}")
        for c in cmds:
            say(f"== python {' '.join(c)}")
            t0 = time.perf_counter()
            p = subprocess.Popen([sys.executable, *c], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            for line in p.stdout:
                print(line, end="", flush=True)
                log.write(line)
            p.wait()
            status.append((c[0], p.returncode, time.perf_counter() - t0))
            say(f"== exit {p.returncode} after {status[-1][2]:.0f} s")
        say("== summary")
        for script, rc, sec in status:
            say(f"{'ok  ' if rc == 0 else 'FAIL'} {script} ({sec:.0f} s)")
        say(f"results in {log_path.parent.relative_to(ROOT)}/")
    return 0 if all(rc == 0 for _, rc, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
