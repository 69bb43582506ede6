"""The rules of direction of the house (README: The house), read from the source: what each
room may import. The teaching core (peftcore/, peftcore/methods/) is torch only, usable from a
notebook: it never imports the run service, threads, SQLite, exit hooks or streamlit. The run
service (peftcore/service/) never imports streamlit or the app. The ui package never imports a
page; the pages reach the service through ui only. The harness (harness/) never imports a benchmark. And `import peftcore`
loads no service module and registers no exit hook. CI runs the README's test command."""
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import imports, module_name

ROOT = Path(__file__).resolve().parent.parent

CORE = sorted([*ROOT.glob("peftcore/*.py"), *ROOT.glob("peftcore/methods/*.py")])
SERVICE = sorted(ROOT.glob("peftcore/service/*.py"))
PAGES = sorted(ROOT.glob("app_pages/*.py"))
UI = sorted(ROOT.glob("ui/*.py"))
HARNESS = sorted(ROOT.glob("harness/*.py"))

RULES = [  # (files, what they must not import: a module or any module below it)
    (CORE, ("peftcore.service", "threading", "sqlite3", "atexit", "streamlit", "ui", "app_pages", "views")),
    (SERVICE, ("streamlit", "ui", "app_pages", "views", "harness", "bench")),
    (UI, ("app_pages", "harness", "bench", "sqlite3")),
    (PAGES, ("peftcore.service", "sqlite3")),
    (HARNESS, ("bench",)),
]


def breaks(path, forbidden):
    return sorted(m for m in imports(path) for f in forbidden if m == f or m.startswith(f + "."))


@pytest.mark.parametrize("files, forbidden", RULES, ids=["core", "service", "ui", "pages", "harness"])
def test_each_room_imports_only_what_its_rule_allows(files, forbidden):
    assert files, "the room has no files: the tree moved and this test did not"
    broken = {module_name(f): b for f in files if (b := breaks(f, forbidden))}
    assert not broken, broken


def test_the_rule_reader_sees_a_broken_rule(tmp_path, monkeypatch):
    """A check that cannot fail is no check: a core file importing the store, sqlite3 inside a
    function, or the service through a relative import is seen."""
    monkeypatch.setattr(conftest, "ROOT", tmp_path)  # where imports() resolves relative imports from
    core = tmp_path / "peftcore" / "methods"
    core.mkdir(parents=True)
    for text in ("from ..service.store import Store\n", "def f():\n    import sqlite3\n",
                 "from peftcore import service\n", "import streamlit as st\n"):
        (core / "bad.py").write_text(text)
        assert breaks(core / "bad.py", RULES[0][1]), text


def test_importing_peftcore_loads_no_service_and_registers_no_exit_hook():
    code = ("import atexit, sys, torch, numpy, safetensors.torch\n"
            "before = atexit._ncallbacks()\n"
            "import peftcore\n"
            "print(atexit._ncallbacks() - before, sorted(m for m in sys.modules if m.startswith('peftcore.service')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split(None, 1) == ["0", "[]\n"], out


def test_ci_runs_the_readmes_test_command():
    """.ci/run is what a newcomer copies from the README's "Run every test", nothing else."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Run every test", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci == [block], (ci, block)
    assert "tests/run" in block and (ROOT / "tests/run").exists()
