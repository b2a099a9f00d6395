"""What this machine runs fast: the recipes' ``auto`` settings, resolved once when a run starts.

* ``optim.precision=auto``: bf16 autocast where the hardware computes bf16 natively (a CUDA GPU that
  supports it; a CPU with AVX512-BF16 or AMX), else fp32. Emulated bf16 is slower than fp32, so a
  laptop without those instructions keeps fp32.
* ``model.compile=auto``: ``torch.compile`` on CUDA, and on CPU when a C++ compiler is found (the
  inductor backend builds C++ kernels for CPU); else eager.

The run's saved config holds the resolved values, so it says what ran, and a resume on the same
machine resolves to the same values.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys

import torch

from ..config import Config


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, why)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    if device.type == "cpu":
        caps = [name for name, has in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                       ("AMX", torch.cpu._is_amx_tile_supported())) if has]
        return bool(caps), f"this CPU has {' and '.join(caps)}" if caps else "this CPU has no AVX512-BF16 or AMX"
    return False, f"device {device.type}"


def cpp_compiler() -> str | None:
    """Path of the C++ compiler torch.compile would use on CPU ($CXX, else g++ / clang++), or None."""
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return shutil.which(name)


def resolve_auto(cfg: Config, device: torch.device) -> tuple[Config, list[str]]:
    """A copy of ``cfg`` with ``auto`` precision/compile replaced by what this device does fast, and
    one line per replaced setting saying what was chosen and why (``cfg`` itself is unchanged)."""
    if cfg.optim.precision != "auto" and cfg.model.compile != "auto":
        return cfg, []
    cfg = copy.deepcopy(cfg)
    notes = []
    if cfg.optim.precision == "auto":
        ok, why = native_bf16(device)
        cfg.optim.precision = "bf16" if ok else "fp32"
        notes.append(f"optim.precision=auto -> {cfg.optim.precision} ({why})")
    if cfg.model.compile == "auto":
        if device.type == "cuda":
            cfg.model.compile, why = True, "CUDA"
        else:
            cxx = cpp_compiler()
            cfg.model.compile = cxx is not None
            why = f"C++ compiler {cxx}" if cxx else "no C++ compiler found (set CXX or install g++)"
        notes.append(f"model.compile=auto -> {str(cfg.model.compile).lower()} ({why})")
    return cfg, notes
