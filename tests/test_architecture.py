"""The dependency rule a newcomer relies on: evaluation, export and chat read a run folder; they never
import the trainer (engine/)."""

import json
import subprocess
import sys

READERS = ["snugtune.evaluate.tasks", "snugtune.evaluate.results_table", "snugtune.export.merge", "snugtune.chat"]


def test_readers_of_a_run_folder_do_not_import_the_engine():
    probe = ("import importlib, json, sys\n"
             f"found = {{}}\nfor name in {READERS!r}:\n"
             "    importlib.import_module(name)\n"
             "    found[name] = sorted(m for m in sys.modules if m.startswith('snugtune.engine'))\n"
             "print(json.dumps(found))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {name: [] for name in READERS}


def test_test_files_have_unique_names_across_the_folders():
    # tests/ mirrors the package without __init__ files: pytest imports each test file by its bare name
    from collections import Counter
    from pathlib import Path
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
