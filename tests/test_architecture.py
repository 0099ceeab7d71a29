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
