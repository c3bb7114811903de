"""Does every planted-bug replacement of tests/test_ch*.py still match its notebook exactly once?

Runs those tests with notebook execution switched off (nothing is computed, so it takes seconds) and lists
each test whose (old, new) replacement no longer occurs exactly once in the solution notebook's code. Run it
after `python -m triton_moe sync` changed solution cells:  python scripts/check_planted_strings.py
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class NoExecution:
    def __init__(self):
        self.broken = []

    def pytest_configure(self, config):
        import triton_moe.grading as grading

        grading._exec_cells = lambda *args, **kwargs: None  # count the replacements, run nothing

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        rep = (yield).get_result()
        text = str(rep.longrepr) if rep.failed else ""
        if "expected exactly once" in text:
            line = next(l for l in text.splitlines() if "occurs" in l and "exactly once" in l)
            self.broken.append((item.nodeid, line.strip()))


if __name__ == "__main__":
    plugin = NoExecution()
    pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-k", "planted or bug",
                 *map(str, sorted((ROOT / "tests").glob("test_ch*.py")))], plugins=[plugin])
    for nodeid, line in plugin.broken:
        print(f"BROKEN {nodeid}: {line}")
    print(f"{len(plugin.broken)} planted replacements no longer match exactly once")
    sys.exit(1 if plugin.broken else 0)
