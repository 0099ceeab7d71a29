"""The optional extras (pyproject's [project.optional-dependencies]) as one table: the modules each brings and
what asks for it. A command that needs a missing one stops at once (exit 2) with the install command, before
any long work: `make demo` installs none of them, `make test` all of them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from snugtune.errors import ConfigError


@dataclass(frozen=True)
class Extra:
    modules: tuple[str, ...]  # what must import for the features that need it to work
    install_note: str = ""    # said after the install command


EXTRAS: dict[str, Extra] = {
    # log.wandb
    "wandb": Extra(("wandb",)),
    # log.mlflow: the client, and SQLAlchemy/Alembic for its local sqlite store
    "mlflow": Extra(("mlflow", "sqlalchemy", "alembic")),
    # merge --gguf-type q4_k_m, q5_k_m, q6_k, q4_0: llama.cpp's quantizer through its Python bindings
    "gguf-quant": Extra(("llama_cpp",), " (builds llama.cpp from source: several minutes)"),
}


def install_command(extra: str) -> str:
    """The command that adds `extra`; pip keeps an installed snugtune (a clone's editable one too) as it is."""
    return f"pip install 'snugtune[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that do not import here."""
    missing = []
    for module in EXTRAS[extra].modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def require(extra: str, feature: str) -> None:
    """ConfigError (exit 2) naming `feature` and the install command unless every module of `extra` imports."""
    missing = missing_modules(extra)
    if missing:
        raise ConfigError(f"{feature} needs the {extra} extra ({', '.join(missing)} not installed): "
                          f"{install_command(extra)}{EXTRAS[extra].install_note}")
