"""The ``openseer`` command: one thin function per subcommand; the work lives in the package."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, build_config, recipe_names, recipe_values

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


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data.decode import DataError
    from .model.backbone import BackboneError
    from .train.checkpoint import CheckpointError
    from .train.distributed import DistError
    from .train.loop import RunError
    from .use.plan import PlanError

    errors = [ConfigError, DataError, CheckpointError, RunError, BackboneError, DistError, PlanError]
    try:
        from .eval.common import EvalError

        errors.append(EvalError)
    except ImportError:
        pass
    try:
        from .data.takedown import TakedownError

        errors.append(TakedownError)
    except ImportError:
        pass
    return tuple(errors)


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the built-in recipes with their key settings."""
    rows = []
    for name in recipe_names():
        cfg = build_config(name)
        crops = " + ".join(f"{n}x{s}" for n, s in zip(cfg.crops.counts, cfg.crops.sizes))
        head = "->".join(str(d) for d in [*cfg.model.head_hidden, cfg.model.head_out])
        rows.append([name, cfg.model.arch, crops, str(cfg.data.batch_size), str(cfg.swav.n_prototypes),
                     f"{head}{'' if cfg.model.head_bn else ' (no BN)'}", f"{cfg.optim.base_lr:g}",
                     f"{cfg.swav.epsilon:g}", str(cfg.swav.queue_length), cfg.optim.precision,
                     f"{cfg.optim.epochs:g}"])
        if args.verbose:
            print(f"# {name}: {recipe_values(name)}")
    header = ["recipe", "backbone", "crops", "batch", "K", "head", "lr/256", "eps", "queue", "precision", "epochs"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Start or resume SwAV pretraining."""
    from .train.loop import pretrain, resume_config

    if args.resume:
        if args.data or args.recipe or args.out:
            raise ConfigError("--resume RUN_DIR continues a run with its saved config: drop --data/--recipe/--out")
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, args.overrides)
        summary = pretrain(cfg, run_dir, resume=True, max_steps=args.max_steps)
    else:
        if not args.out:
            raise ConfigError("--out RUN_DIR is required (where the run's config, metrics and checkpoints go)")
        base = {"data": {"source": args.data}} if args.data else None
        cfg = build_config(args.recipe or "tiny-cpu", args.overrides, base=base)
        summary = pretrain(cfg, Path(args.out), resume="auto" if args.auto_resume else False,
                           max_steps=args.max_steps)
    from .train.distributed import close_distributed, env_from_os

    close_distributed()  # the process ends here: gloo's threads must be joined before the interpreter exits
    why = f" ({summary['preempted']}: checkpoint written, resume with --resume)" if summary.get("preempted") else ""
    if env_from_os().is_main:  # once per run, not once per process
        print(f"openseer: stopped at step {summary['step']}/{summary['total_steps']}{why}; run in {summary['run_dir']}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Train a small student backbone to reproduce a teacher's features on unlabelled images."""
    from .train.distill import distill, distill_config
    from .train.loop import resume_config

    if args.resume:
        if args.teacher or args.student or args.data or args.recipe or args.out:
            raise ConfigError("--resume RUN_DIR continues a distill run with its saved config: drop the teacher, "
                              "--student, --data, --recipe and --out")
        run_dir = Path(args.resume)
        summary = distill(resume_config(run_dir, args.overrides), run_dir, resume=True, max_steps=args.max_steps)
    else:
        missing = [name for name, v in (("TEACHER", args.teacher), ("--student ARCH", args.student),
                                        ("--out RUN_DIR", args.out)) if not v]
        if missing:
            raise ConfigError(f"openseer distill needs {', '.join(missing)} (see openseer distill --help)")
        overrides = [*args.overrides, *([f"distill.teacher_arch={args.teacher_arch}"] if args.teacher_arch else [])]
        cfg = distill_config(args.teacher, args.student, args.data, args.recipe, overrides)
        summary = distill(cfg, Path(args.out), resume="auto" if args.auto_resume else False, max_steps=args.max_steps)
    why = f" ({summary['preempted']}: checkpoint written, resume with --resume)" if summary.get("preempted") else ""
    print(f"openseer: stopped at step {summary['step']}/{summary['total_steps']}{why}; run in {summary['run_dir']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Parameters and per-GPU memory of a recipe on N GPUs (meta device: no memory, no GPU needed)."""
    from .use.plan import PlanError, format_plan, make_plan, plan_json

    cfg = build_config(args.recipe, args.overrides)
    plan = make_plan(cfg, args.gpus, args.gpu_mem_gb)
    print(plan_json(plan) if args.json else format_plan(plan))
    if not any(plan["fits"].values()):
        need = plan.get("min_gpus")
        hint = (f"{need} GPUs of {args.gpu_mem_gb:g} GiB would fit with FSDP + activation checkpointing"
                if need else f"no GPU count that divides the global batch fits in {args.gpu_mem_gb:g} GiB; "
                             f"use larger GPUs or a smaller data.batch_size")
        raise PlanError(f"{cfg.recipe} does not fit on {args.gpus} GPUs of {args.gpu_mem_gb:g} GiB with any "
                        f"strategy: {hint}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check a run directory and say how to recover."""
    from .use.doctor import run_doctor

    return run_doctor(args.run_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openseer",
        description="SEER-style SwAV pretraining of RegNetY/timm backbones on unlabelled images.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipes", help="list recipes and their key settings")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each recipe's YAML values")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("pretrain", help="pretrain a backbone with SwAV",
                       description="Pretrain with SwAV. Trailing key=value pairs override the recipe, "
                                   "e.g. optim.base_lr=0.6 data.batch_size=128 checkpoint.every=100.")
    p.add_argument("--data", help="a folder of images (recursive), 'fashion-mnist', or tar shards "
                                   "('shards/{000000..000099}.tar', a glob, 'pipe:CMD', or a folder from `openseer shard`)")
    p.add_argument("--recipe", help="a recipe name (see `openseer recipes`) or a YAML file; default tiny-cpu")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="if --out already holds this run, continue it (for torchrun --max-restarts and requeued jobs)")
    p.add_argument("--max-steps", type=int, help="stop after this step (the LR schedule is unchanged)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("distill", help="train a small student backbone to match a teacher's features",
                       description="Distil a teacher (a run, checkpoint, exported/imported file or timm name) into "
                                   "a student (any timm backbone) on unlabelled images. The result is a run "
                                   "directory that eval, export, embed and report take. Settings default to the "
                                   "teacher run's config (else the tiny-cpu recipe); trailing key=value pairs "
                                   "override, e.g. distill.loss=swav optim.minutes=10.",
                       epilog="examples:\n  openseer distill runs/big --student mobilenetv2_035 --data /pile "
                              "--out runs/small\n  openseer distill runs/big --student lcnet_035 --data fashion-mnist "
                              "--out runs/s2 optim.minutes=10 model.stem_stride=1\n  openseer distill --resume runs/small",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", nargs="?", metavar="TEACHER", help="what openseer.load accepts: run dir, checkpoint, "
                                                                  "exported/imported file, timm name")
    p.add_argument("--student", metavar="ARCH", help="the student: any timm backbone name")
    p.add_argument("--data", help="unlabelled images, as for pretrain (default: the teacher run's data)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--recipe", help="start from this recipe instead of the teacher run's config")
    p.add_argument("--teacher-arch", metavar="NAME", help="architecture of a teacher file that does not record it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the distill run in RUN_DIR")
    p.add_argument("--auto-resume", action="store_true", help="if --out already holds this run, continue it")
    p.add_argument("--max-steps", type=int, help="stop after this step (the LR schedule is unchanged)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("doctor", help="check a run directory (config, checkpoints, metrics) and how to recover")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("plan", help="parameters and per-GPU memory of a recipe on N GPUs; does it fit?",
                       description="Plan a run: exact parameter counts and per-GPU memory (weights, gradients, "
                                   "momentum, activations) under DDP and FSDP, with and without activation "
                                   "checkpointing, from a meta-device model (no memory, no GPU needed).")
    p.add_argument("--recipe", default="tiny-cpu", help="a recipe name or YAML file")
    p.add_argument("--gpus", type=int, required=True, help="total number of GPUs (processes)")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one GPU in GiB, e.g. 40 or 80")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_plan)

    from .use import cli as use_cli  # export, embed, import-seer, report

    use_cli.add_parsers(sub)

    try:
        from .eval import cli as eval_cli

        eval_cli.add_parsers(sub)
    except ImportError:
        pass
    try:
        from .data import cli as data_cli

        data_cli.add_parsers(sub)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
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
    except _user_errors() as e:
        print(f"openseer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("openseer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
