"""What this machine runs fast: the recipes' ``auto`` settings, resolved once when a run starts.

* ``optim.precision=auto``: bf16 autocast where the hardware computes bf16 natively (a CUDA GPU that
  supports it; a CPU with AVX512-BF16 or AMX), else fp32. Emulated bf16 is slower than fp32, so a
  laptop without those instructions keeps fp32.
* ``model.compile=auto``: ``torch.compile`` on CUDA, and on CPU when a C++ compiler is found (the
  inductor backend builds C++ kernels for CPU); else eager. Under a time budget (``optim.minutes``)
  the compile must pay back: the budget counts training only (the loop keeps the compile off the
  clock), so compiling costs its own time once and buys a faster step; ``auto`` stays eager when
  ``minutes * 60 * (speed-up - 1)`` is less than a first compile (measured, docs/benchmarks.md: on 2
  CPU cores a fresh compile of tiny-cpu took 107-127 s and the compiled run did 1.17x the steps of
  eager in 15 minutes; on a GPU 1.19-1.24x and two minutes or more). Below about 12 minutes on a
  CPU (10 on a GPU) eager finishes the same work sooner.

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


# a first compile's seconds and the step's speed-up under it, measured (docs/benchmarks.md)
COMPILE_COST = {"cpu": (120.0, 1.17), "cuda": (120.0, 1.2)}


def compile_pays_back(minutes: float, device: torch.device) -> tuple[bool, str]:
    """(whether compiling pays back within a budget of ``minutes`` of training, why). No budget: yes."""
    if not minutes:
        return True, ""
    seconds, speedup = COMPILE_COST.get(device.type, COMPILE_COST["cpu"])
    gained = minutes * 60 * (speedup - 1)
    if gained >= seconds:
        return True, ""
    least = seconds / (speedup - 1) / 60
    return False, (f"a {minutes:g}-minute budget cannot pay back a first compile of about {seconds / 60:.0f} min "
                   f"for a {speedup:g}x faster step; compiling pays from about {least:.0f} minutes")


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
        pays, reason = compile_pays_back(cfg.optim.minutes, device)
        if cfg.model.compile and not pays:
            cfg.model.compile, why = False, reason
        notes.append(f"model.compile=auto -> {str(cfg.model.compile).lower()} ({why})")
    return cfg, notes
