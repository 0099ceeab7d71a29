"""What a `model:` string names, and that model as a local Hugging Face folder of safetensors (converted,
built or downloaded once into the cache where needed). The one place that reads a model name: training,
`data`, `bench` and the planner all go through it.

A name is, in this order: the built-in default, `shape:NAME` (a registry shape), a `.gguf` file, a local
HF folder, or a hub id (`org/name`; a hub id the registry knows plans offline from its shape).
"""

from __future__ import annotations

import difflib
import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

from snugtune.errors import ConfigError
from snugtune.models.cache import default_cache_dir
from snugtune.models.embedded import EMBEDDED_DEFAULT, EMBEDDED_SHAPE, embedded_model_dir
from snugtune.models.gguf_convert import convert_gguf, is_converted
from snugtune.models.shapes import build_shape_model, shape_transformers_config
from snugtune.registry import HUB_IDS, SHAPE_TOKENIZER_VOCAB, shape_config, shape_names


@dataclass(frozen=True)
class ModelName:
    """What a `model:` string names, read from the string and the file system (nothing loaded)."""
    source: str          # what the user wrote in `model:`
    kind: str            # builtin | shape | gguf | local | hub
    path: Path | None    # the file or folder, for gguf and local
    shape: str | None    # the registry shape of its architecture, where one is known (builtin, shape, hub)


@dataclass(frozen=True)
class ResolvedModel:
    """A base model as a local HF folder, plus where it came from."""
    path: Path
    source: str          # what the user wrote in `model:`
    kind: str            # builtin | shape | local | gguf | hub


def read_model_name(name: str) -> ModelName:
    """What `name` names; ConfigError (naming what to write instead) when it names nothing."""
    if name == EMBEDDED_DEFAULT:
        return ModelName(name, "builtin", None, EMBEDDED_SHAPE)
    if name.startswith("shape:"):
        shape = name.removeprefix("shape:")
        try:
            shape_config(shape)
        except KeyError:
            close = difflib.get_close_matches(shape, shape_names(), n=1)
            hint = f"; did you mean 'shape:{close[0]}'?" if close else ""
            raise ConfigError(f"model: unknown shape '{shape}'{hint}") from None
        return ModelName(name, "shape", None, shape)
    if "\0" in name:  # no file or hub id holds one; the file system would refuse it with a traceback
        raise ConfigError("model: the name holds a NUL character")
    try:
        local = Path(name).expanduser()
    except RuntimeError:  # ~USER of a user this machine does not have
        raise ConfigError(f"model: '{name}' starts with ~USER, but this machine has no such user") from None
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ConfigError(f"model: GGUF file not found: {local}")
        return ModelName(name, "gguf", local, None)
    if name and local.is_dir():  # (Path("") is the working folder, which an empty name does not name)
        if not (local / "config.json").is_file():
            raise ConfigError(f"model: {local} is a folder without config.json (not a Hugging Face model folder)")
        return ModelName(name, "local", local, None)
    if "/" in name and not name.startswith((".", "/")):
        return ModelName(name, "hub", None, HUB_IDS.get(name))
    raise ConfigError(f"model: '{name}' is not a built-in name ({EMBEDDED_DEFAULT}), a shape:NAME, "
                      f"a local folder, a .gguf file or a hub id")


def resolve_model(name: str, cache_dir: Path | None = None, allow_pickle: bool = False) -> ResolvedModel:
    """Turn a `model:` value into a local HF folder, converting or building it once into the cache."""
    cache_dir = cache_dir or default_cache_dir()
    named = read_model_name(name)
    if named.kind == "builtin":
        path = embedded_model_dir(cache_dir)
    elif named.kind == "shape":
        path = build_shape_model(named.shape, cache_dir)
    elif named.kind == "gguf":
        path = convert_gguf(named.path, _converted_gguf_dir(named.path, cache_dir))
    elif named.kind == "local":
        if not allow_pickle:
            _refuse_pickle_only(named.path)
        path = named.path.resolve()
    else:
        path = _download_hub(name, cache_dir, allow_pickle)
    return ResolvedModel(path, name, named.kind)


def offline_model_config(name: str, cache_dir: Path | None = None):
    """The transformers config of what `name` names, without weights or network: a registry shape's (for the
    built-in name and the hub ids the registry knows, too), a local folder's config.json, or the cached folder
    of a .gguf file or hub model converted or downloaded before (training resolves the model, then plans)."""
    named = read_model_name(name)
    if named.shape is not None:  # shape models hold the shared tokenizer's ids; real models their own
        return shape_transformers_config(named.shape, SHAPE_TOKENIZER_VOCAB if named.kind == "shape" else 0)
    folder = named.path if named.kind == "local" else _cached_folder(named, cache_dir or default_cache_dir())
    if folder is None:
        raise ConfigError(f"model: cannot plan for '{name}' offline (not in the registry, not a local folder, and "
                          f"not converted or downloaded yet: `snugtune data CONFIG` does that once)")
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(folder)


def _cached_folder(named: ModelName, cache_dir: Path) -> Path | None:
    """The HF folder a .gguf file was converted to, or a hub model downloaded to, where that happened before."""
    if named.kind == "gguf":
        converted = _converted_gguf_dir(named.path, cache_dir)
        return converted if is_converted(converted) else None
    from huggingface_hub import try_to_load_from_cache
    config = try_to_load_from_cache(named.source, "config.json", cache_dir=str(cache_dir / "hub"))
    return Path(config).parent if isinstance(config, str) else None


def _converted_gguf_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where a GGUF file converts to: named by the file's path, size and time, so a changed file converts again."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / "models" / f"gguf-{key}"


def _refuse_pickle_only(folder: Path) -> None:
    if not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin")):
        raise ConfigError(f"model: {folder} holds only pickle (.bin) weights, which can run code when loaded; "
                          f"snugtune loads safetensors or GGUF (set allow_pickle_weights: true if you trust them)")


def _download_hub(repo_id: str, cache_dir: Path, allow_pickle: bool) -> Path:
    try:  # fail fast and clearly offline instead of waiting on retries
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise ConfigError(f"model: '{repo_id}' is a hub id but the hub cannot be reached (offline?); "
                          f"use a local folder, a .gguf file or shape:{HUB_IDS.get(repo_id, 'NAME')}") from None
    from huggingface_hub import snapshot_download
    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
                                 + (["*.bin"] if allow_pickle else []),
                                 cache_dir=str(cache_dir / "hub"))
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise ConfigError(f"model: could not download '{repo_id}': {str(exc).splitlines()[0]}") from None
    if not allow_pickle:
        _refuse_pickle_only(Path(path))
    return Path(path)
