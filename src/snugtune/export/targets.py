"""What `snugtune merge` writes, as one table: each export target, the option that asks for it, the extra it
may need, the check run before any target writes, its writer and what it leaves.

cli.py's merge only turns its options into an ExportRequest and walks this table (`check_all`, then
`write` for each target in order); a writer gets what the targets before it wrote (the GGUF reads the merged
folder, the Modelfile names the GGUF). A new format is one module under export/ and one row here
(tests/export/test_targets.py keeps the table, the extras and docs/export.md in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from snugtune.export.gguf_file import check_gguf_type, export_gguf
from snugtune.export.merge import check_merge, merge_run
from snugtune.export.modelfile import write_modelfile
from snugtune.export.quantize import tensor_types
from snugtune.output_folder import record_files


@dataclass(frozen=True)
class ExportRequest:
    """merge's options."""
    run_dir: Path
    out_dir: Path
    dtype: str = "bf16"
    gguf: bool = False
    gguf_type: str = "f16"


@dataclass(frozen=True)
class ExportTarget:
    asked_by: str | None    # the ExportRequest flag (merge option --NAME) that asks for it; None: always written
    extra: str | None       # the extra (snugtune.extras) some of its choices need; its check says which
    leaves: str             # what it writes, for docs/export.md
    check: Callable[[ExportRequest], None]  # UserError before any target writes anything
    write: Callable[[ExportRequest, dict[str, Path]], Path]  # given what earlier targets wrote, by name
    describe: Callable[[Path], str]  # the line merge prints for what it wrote


def _gguf_line(path: Path) -> str:
    kinds = ", ".join(f"{count} {kind}" for kind, count in tensor_types(path).most_common())
    return f"GGUF: {path} ({path.stat().st_size / 2**20:.1f} MiB; tensors: {kinds})"


TARGETS: dict[str, ExportTarget] = {
    "merged": ExportTarget(
        asked_by=None, extra=None,
        leaves="OUT/: a Hugging Face model folder (safetensors shards, config, tokenizer, chat template)",
        check=lambda request: check_merge(request.run_dir, request.out_dir, request.dtype),
        write=lambda request, written: merge_run(request.run_dir, request.out_dir, request.dtype),
        describe=lambda path: f"merged model: {path}"),
    "gguf": ExportTarget(
        asked_by="gguf", extra="gguf-quant",
        leaves="OUT/OUT-TYPE.gguf: llama.cpp, Ollama, LM Studio (f16, q8_0 written here; k-quants by llama.cpp)",
        check=lambda request: check_gguf_type(request.gguf_type),
        write=lambda request, written: export_gguf(
            written["merged"], written["merged"] / f"{written['merged'].name}-{request.gguf_type}.gguf",
            request.gguf_type),
        describe=_gguf_line),
    "ollama": ExportTarget(
        asked_by="gguf", extra=None,
        leaves="OUT/Modelfile: `ollama create NAME -f Modelfile` (the chat template, system prompt, stops)",
        check=lambda request: None,
        write=lambda request, written: write_modelfile(written["gguf"], written["merged"]),
        describe=lambda path: f"Ollama: {path}"),
}


def wanted(request: ExportRequest) -> dict[str, ExportTarget]:
    """The targets the request asks for, in table order."""
    return {name: target for name, target in TARGETS.items()
            if target.asked_by is None or getattr(request, target.asked_by)}


def check_all(request: ExportRequest) -> dict[str, ExportTarget]:
    """Run every wanted target's check (a missing extra fails here, before anything is merged); returns them."""
    targets = wanted(request)
    for target in targets.values():
        target.check(request)
    return targets


def write(name: str, request: ExportRequest, written: dict[str, Path]) -> Path:
    """Write one target and record it in the merged folder's mark, so a later merge may replace it too."""
    path = TARGETS[name].write(request, written)
    if path.parent == request.out_dir:  # a file added to the published folder
        record_files(request.out_dir, "merge", [path])
    return path
