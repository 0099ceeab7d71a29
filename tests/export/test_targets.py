"""export/targets.py: the table of what `snugtune merge` writes stays complete, and merge walks it."""

import dataclasses
import inspect
import json
import pkgutil
import re

import pytest
from typer.testing import CliRunner

import snugtune.export
from conftest import REPO_ROOT
from snugtune import cli
from snugtune.export import targets
from snugtune.export.targets import TARGETS, ExportRequest
from snugtune.extras import EXTRAS

# export modules no row writes with: helpers of a writer
HELPERS = {"quantize": "llama.cpp's quantizer, called by gguf_file.export_gguf", "targets": "this table"}


def _modules_written_with(target) -> set[str]:
    """The export modules whose functions a row's writer calls (its lambda's names, looked up in targets)."""
    names = target.write.__code__.co_names
    return {getattr(targets, name).__module__.rpartition(".")[2] for name in names
            if inspect.isfunction(getattr(targets, name, None))}


def test_every_export_module_is_written_by_a_row_or_is_a_named_helper():
    modules = {info.name for info in pkgutil.iter_modules(snugtune.export.__path__)}
    written = set().union(*(_modules_written_with(target) for target in TARGETS.values()))
    assert written | set(HELPERS) == modules and not written & set(HELPERS)


def test_every_row_is_asked_for_by_a_merge_option_and_names_a_real_extra():
    request_fields = {field.name for field in dataclasses.fields(ExportRequest)}
    merge_options = set(inspect.signature(cli.merge).parameters) - {"debug"}
    assert request_fields == merge_options  # the command passes every option on, and nothing else
    for name, target in TARGETS.items():
        assert target.asked_by is None or isinstance(getattr(ExportRequest(None, None), target.asked_by), bool)
        assert target.extra is None or target.extra in EXTRAS
    assert list(TARGETS)[0] == "merged" and TARGETS["merged"].asked_by is None  # the others read it


def test_docs_table_lists_every_row():
    text = (REPO_ROOT / "docs" / "export.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \| (.+?) \|$", text, re.M)
    assert {name: (option, extra, leaves) for name, option, extra, leaves in rows} == {
        name: ("always" if t.asked_by is None else f"`--{t.asked_by}`",
               "—" if t.extra is None else f"`{t.extra}`", t.leaves) for name, t in TARGETS.items()}


def test_wanted_follows_the_options():
    plain = ExportRequest(REPO_ROOT, REPO_ROOT)
    assert list(targets.wanted(plain)) == ["merged"]
    assert list(targets.wanted(dataclasses.replace(plain, gguf=True))) == ["merged", "gguf", "ollama"]


@pytest.mark.parametrize("gguf_type", ["Q4_K_M", "q4_k_m ", "", "f32", "../q8_0", "q8_0;rm"])
def test_a_bad_gguf_type_is_refused_before_anything_is_merged(gguf_type, finished_run, tmp_path):
    result = CliRunner().invoke(cli.app, ["merge", str(finished_run), "--out", str(tmp_path / "out"), "--gguf",
                                          "--gguf-type", gguf_type])
    assert result.exit_code == 2 and "--gguf-type: choose one of f16, q8_0" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_merge_with_gguf_walks_every_row_and_a_second_merge_replaces_the_first(finished_run, tmp_path):
    out = tmp_path / "exported"
    for _ in range(2):
        result = CliRunner().invoke(cli.app, ["merge", str(finished_run), "--out", str(out), "--dtype", "fp32",
                                              "--gguf", "--gguf-type", "q8_0"])
        assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0] == f"merged model: {out}"
    assert re.fullmatch(rf"GGUF: {out}/exported-q8_0\.gguf \(\d+\.\d MiB; tensors: \d+ Q8_0, \d+ F32.*\)", lines[1])
    assert lines[2] == f"Ollama: {out}/Modelfile" and len(lines) == 3
    mark = json.loads((out / ".snugtune-output.json").read_text())
    assert {"exported-q8_0.gguf", "Modelfile", "model.safetensors"} <= set(mark["files"])
    assert sorted(p.name for p in out.iterdir()) == sorted({*mark["files"], ".snugtune-output.json"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging or replaced folder left
