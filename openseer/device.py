"""The one device resolver: 'auto', 'cpu', 'cuda' (or 'cuda:N') -> a ``torch.device``.

Bottom layer, so training, evaluation and the commands share it; torch is imported only when a
device is resolved, so the command line's parser stays free of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICES = ("auto", "cpu", "cuda")  # what the commands' --device offers


def resolve_device(name: str, option: str = "--device ") -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU; asking for CUDA without a GPU is a
    ``ConfigError`` that names the setting as the user wrote it (``option``: '--device ' on the
    command line, 'device=' for a config key)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}{name} but no CUDA GPU is visible; use {option}cpu")
    return torch.device(name)
