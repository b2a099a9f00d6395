"""Options and small steps several commands share (threads, device, read timeout, examples)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..device import DEVICES


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, example: str,
               description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with ``example`` (a block of example command lines)."""
    return sub.add_parser(name, help=help, description=description or f"{help[0].upper()}{help[1:]}.",
                          epilog=example, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=list(DEVICES),
                   help="auto (default): CUDA when a GPU is visible, else the CPU")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


def add_read_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--read-timeout", type=float, default=None, metavar="S",
                   help="give up a file that takes longer than S seconds to read, counted as 'timeout' "
                        "(default $OPENSEER_READ_TIMEOUT or 60)")


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def set_threads(n: int) -> None:
    """``--threads N``: N > 0 sets torch's intra-op threads; 0 leaves torch's choice."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


def device(name: str) -> str:
    """``--device`` as the library functions take it ('cpu', 'cuda')."""
    from ..device import resolve_device

    return str(resolve_device(name))


def missing(spec: str | None) -> bool:
    """Whether ``spec`` names a local file or folder that does not exist (not 'fashion-mnist', not
    tar shards or ``pipe:``): the commands say so before importing torch, in the words the library
    would use, so a mistyped path is answered at once."""
    if not spec or spec == "fashion-mnist":
        return False
    from ..data.stream import looks_like_shards

    return not looks_like_shards(spec) and not Path(spec).expanduser().exists()


def check_pile(spec: str | None) -> None:
    """A pile (--data, PILE) that does not exist: the message of ``open_collection``."""
    if missing(spec):
        from ..data.decode import DataError

        raise DataError(f"{spec} does not exist (give a folder of images, a .txt list of paths, tar shards "
                        f"or fashion-mnist)")
