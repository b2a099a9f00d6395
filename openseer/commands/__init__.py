"""``openseer COMMAND``: the one parser table and ``main`` (topics: train, data, evaluate, weights).

Building the parser imports no torch, timm, torchvision or faiss (tests/test_commands.py checks),
so ``--help``, argument errors and bad config keys are answered at once; each command imports the
heavy modules inside its function. An ``OpenseerError`` (config.py) is a mistake a person can fix:
``main`` prints its message on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import OpenseerError
from . import data, evaluate, labels, train, weights

# Every command, in the order ``openseer --help`` lists them: the user's path through a job.
COMMANDS = (
    train.add_recipes,  # recipes: the presets
    train.add_plan,  # plan: does a recipe fit on N GPUs?
    data.add_shard,  # shard: a pile -> tar shards
    data.add_data,  # data report: what the shards hold
    data.add_index,  # index: near-copy descriptors of a pile, stored beside it
    data.add_curate,  # curate: deduplicate and rebalance a pile
    data.add_takedown,  # takedown add|check: deny-list images, audit which runs saw one
    train.add_pretrain,  # pretrain: SwAV
    labels.add_select,  # select: which images to label first
    labels.add_finetune,  # finetune: a classifier from those labels
    labels.add_predict,  # predict: its classes for a folder
    train.add_distill,  # distill: a small student of a teacher
    train.add_doctor,  # doctor: a run directory's health and how to recover
    evaluate.add_eval,  # eval: kNN, linear probes, low-shot, baselines
    evaluate.add_report,  # report: a run's HTML page
    weights.add_embed,  # embed: features of a pile
    weights.add_export,  # export: safetensors, TorchScript, ONNX (+int8), VISSL
    weights.add_import_seer,  # import-seer: SEER (VISSL) or timm weights in
)

# Messages from libraries that say nothing to an openseer user: torch's C++-extension loader warns
# "No CUDA runtime is found" on every CPU-only machine where an nvcc is on PATH (it is looked up
# when torch.compile builds its kernels), although nothing here uses CUDA.
NOISE = {"torch.utils.cpp_extension": ("No CUDA runtime is found",)}


class _DropNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_noise() -> None:
    """Drop the messages in ``NOISE`` (each logger gets its filter once)."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(prefixes))


EXAMPLES = """examples:
  openseer recipes
  openseer pretrain --data fashion-mnist --recipe tiny-cpu --out runs/a optim.minutes=15
  openseer eval runs/a --data fashion-mnist
  openseer export runs/a --out backbone.safetensors
  openseer COMMAND --help          # each command's options and examples

the guide to every command: docs/guide.md
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``openseer`` parser: one subcommand per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="openseer",
        description="SEER-style SwAV pretraining of RegNetY/timm backbones on unlabelled images.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``openseer`` command; its exit status (2: a mistake the message explains)."""
    quiet_library_noise()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may stand anywhere (``--data X a=1 --out Y b=2``); argparse only
        # collects the first run of positionals into ``overrides``
        if isinstance(getattr(args, "overrides", None), list) and not any(x.startswith("-") for x in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except OpenseerError as e:
        print(f"openseer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("openseer: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]
