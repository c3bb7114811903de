"""The pins resolve on every platform the README promises (Linux without a GPU, with NVIDIA, with AMD), proved
on a CPU without downloading torch: each platform's pinned set (``scripts/pins.py``, what ``./course``
installs) is checked against the ``Requires-Dist`` of its wheels, from the committed snapshot
``tests/fixtures/declared_requirements.json`` (``scripts/snapshot_requirements.py``), and against the
indexes' live metadata when they are reachable."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import pins  # noqa: E402
import snapshot_requirements as snap_mod  # noqa: E402

SNAP = json.loads(snap_mod.SNAPSHOT.read_text())


@pytest.mark.parametrize("platform", pins.PLATFORMS)
def test_snapshot_covers_every_pin(platform):
    declared = {**SNAP["wheels"]["any"], **SNAP["wheels"][platform]}
    for name, version in pins.pinned_for(platform).items():
        assert name in declared and declared[name]["version"] == version, (
            f"{name}=={version} ({platform}) is not in {snap_mod.SNAPSHOT.name}: run "
            "python scripts/snapshot_requirements.py after changing a pin")


@pytest.mark.parametrize("platform", pins.PLATFORMS)
def test_pins_resolve_on_every_platform(platform):
    found = pins.conflicts(pins.pinned_for(platform), snap_mod.declared(SNAP, platform))
    assert not found, f"the pins cannot install on {platform}:\n" + "\n".join(found)


def test_check_fails_on_the_pins_that_could_not_install_on_nvidia():
    """torch 2.13.0 with triton 3.6.0 (the pins before 2026-12-02) installs on a CPU and not on NVIDIA."""
    old = {**pins.pinned_for("linux-nvidia"), "torch": "2.13.0", "triton": "3.6.0"}
    found = pins.conflicts(old, snap_mod.declared(SNAP, "linux-nvidia"))
    assert any("torch==2.13.0 requires triton==3.7.1, but triton==3.6.0 is pinned" in f for f in found), found
    assert not pins.conflicts(old, snap_mod.declared(SNAP, "linux-cpu"))  # why CI never saw it


def test_amd_set_has_no_triton_pin_and_the_check_sees_why():
    assert "triton" not in pins.pinned_for("linux-amd") and "triton" in pins.pinned_for("linux-nvidia")
    with_triton = pins.pinned_for("linux-nvidia")  # requirements.txt as it is, on AMD
    found = pins.conflicts(with_triton, snap_mod.declared(SNAP, "linux-amd"))
    assert any("both triton and pytorch-triton-rocm would install the `triton` module" in f for f in found), found


def test_conflicts_honours_markers_and_ignores_unpinned():
    declared = {"a": ['b>=2; python_version < "3.0"', "c<1", 'b<2; extra == "tests"']}
    assert pins.conflicts({"a": "1", "b": "3"}, declared) == []
    assert pins.conflicts({"a": "1", "c": "2"}, declared) == ["a==1 requires c<1, but c==2 is pinned"]


def test_course_installs_the_checked_set():
    course = (ROOT / "course").read_text()
    assert 'scripts/pins.py "$platform"' in course and "-r \"$VENV/requirements.$platform.txt\"" in course
    assert "scripts/pins.py --rocm-index" in course


def test_live_metadata_matches_the_snapshot():
    """Where the indexes answer, the wheels' own metadata equals the snapshot (released wheels never change:
    a difference means the snapshot was written for other pins)."""
    if not snap_mod.reachable(snap_mod.PYPI_SIMPLE + "/pip/"):
        pytest.skip("PyPI is unreachable: the snapshot alone was checked")
    w = SNAP["wheels"]
    live = {name: snap_mod.remote_entry(snap_mod.PYPI_SIMPLE, name, e["version"]) for name, e in w["any"].items()}
    live_nv = snap_mod.remote_entry(snap_mod.PYPI_SIMPLE, "torch", w["linux-nvidia"]["torch"]["version"])
    for name, e in live.items():
        assert e["requires_dist"] == w["any"][name]["requires_dist"], f"{name}: re-run scripts/snapshot_requirements.py"
    assert live_nv["requires_dist"] == w["linux-nvidia"]["torch"]["requires_dist"]
    found = pins.conflicts(pins.pinned_for("linux-nvidia"),
                           {**{n: e["requires_dist"] for n, e in live.items()}, "torch": live_nv["requires_dist"]})
    assert not found, found
