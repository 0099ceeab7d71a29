"""snugtune: fine-tune LLMs on the GPU you have."""

from __future__ import annotations

from snugtune.api import train

__version__ = "0.1.0"
__all__ = ["train"]
