"""Training commands: ``recipes``, ``plan``, ``pretrain``, ``distill`` and ``doctor`` (a run's health).

Thin: parse, call the package, print. torch and the model code are imported inside the functions,
after the arguments and the config have been checked, so mistakes are answered at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError, build_config, load_config, recipe_names, recipe_values
from .options import add_overrides, add_parser, missing


def add_recipes(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "recipes", "list recipes and their key settings",
                   "examples:\n  openseer recipes\n  openseer recipes -v        # also each recipe's YAML values\n")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each recipe's YAML values")
    p.set_defaults(func=cmd_recipes)


def recipe_header(name: str) -> dict[str, str]:
    """The ``# for:`` (intended data) and ``# input:`` (image size) lines of a built-in recipe's header."""
    from importlib import resources

    text = (resources.files("openseer") / "recipes" / f"{name}.yaml").read_text()
    out = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        if key in ("for", "input") and value.strip():
            out[key] = value.strip()
    return out


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the built-in recipes with their input size, key settings and the data each is for."""
    rows, intended = [], []
    for name in recipe_names():
        cfg = build_config(name)
        about = recipe_header(name)
        crops = " + ".join(f"{n}x{s}" for n, s in zip(cfg.crops.counts, cfg.crops.sizes))
        head = "->".join(str(d) for d in [*cfg.model.head_hidden, cfg.model.head_out])
        budget = f"{cfg.optim.minutes:g} min" if cfg.optim.minutes else f"{cfg.optim.epochs:g} ep"
        rows.append([name, f"{cfg.crops.sizes[0]} px", cfg.model.arch, crops, str(cfg.data.batch_size),
                     str(cfg.swav.n_prototypes), f"{head}{'' if cfg.model.head_bn else ' (no BN)'}",
                     f"{cfg.optim.base_lr:g}", f"{cfg.optim.warmup_steps}/{cfg.swav.freeze_prototypes_steps}",
                     f"{cfg.swav.epsilon:g}", str(cfg.swav.queue_length), cfg.optim.precision, budget])
        intended.append((name, about.get("for", "")))
        if args.verbose:
            print(f"# {name}: {recipe_values(name)}")
    header = ["recipe", "input", "backbone", "crops", "batch", "K", "head", "lr/256", "warmup/freeze", "eps", "queue",
              "precision", "length"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\nfor (input: the size embed, eval, export and curate read images at):")
    width = max(len(n) for n, _ in intended)
    for name, what in intended:
        print(f"  {name.ljust(width)}  {what or '(not stated)'}")
    return 0


PRETRAIN_EXAMPLES = """examples:
  openseer pretrain --data ~/Pictures --recipe photos-cpu --out runs/photos      # photos, 10 minutes on a CPU
  openseer pretrain --resume runs/photos optim.minutes=30                        # 20 minutes more
  openseer pretrain --data fashion-mnist --recipe tiny-cpu --out runs/a optim.minutes=15
  openseer pretrain --data /pile --recipe seer-rg32 --out runs/rg32 data.batch_size=128 checkpoint.every=100
  openseer pretrain --data 'shards/{000000..000099}.tar' --recipe seer-rg64 --out runs/rg64
  torchrun --nproc-per-node 8 -m openseer pretrain --data /pile --recipe seer-rg128 --out runs/b --auto-resume
  openseer pretrain --resume runs/a                 # continue from the latest checkpoint
  openseer pretrain --data /scans --init runs/a --recipe tiny-cpu-adapt --out runs/adapted   # adapt a run to a new pile
  openseer pretrain --data /pile --recipe seer-rg32 --init seer_regnet32gf.torch --out runs/rg32-adapted
  openseer pretrain --data /dicom --out runs/ct data.dicom_window=40,400 data.dicom_frames=all   # DICOM scans
  openseer pretrain --resume runs/a optim.epochs=4  # make a finished run longer (the schedule continues)

every setting and recipe: docs/guide.md; the method: docs/method.md
"""


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "pretrain", "pretrain a backbone with SwAV", PRETRAIN_EXAMPLES,
                   description="Pretrain with SwAV. Trailing key=value pairs override the recipe, "
                               "e.g. optim.base_lr=0.6 data.batch_size=128 checkpoint.every=100.")
    p.add_argument("--data", help="a folder of images (recursive), 'fashion-mnist', or tar shards "
                                   "('shards/{000000..000099}.tar', a glob, 'pipe:CMD', or a folder from `openseer shard`)")
    p.add_argument("--recipe", help="a recipe name (see `openseer recipes`) or a YAML file; default tiny-cpu")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint; "
                                                        "with a larger optim.minutes or optim.epochs, train it longer")
    p.add_argument("--auto-resume", action="store_true",
                   help="if --out already holds this run, continue it (for torchrun --max-restarts and requeued jobs)")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start a new run from these weights (model.init): a run directory, a checkpoint, an "
                        "exported/imported file or a SEER/VISSL checkpoint; the backbone always loads, the SwAV "
                        "head and prototypes when the file has them (else prototypes from k-means of the pile); "
                        "a new schedule, unlike --resume")
    p.add_argument("--max-steps", type=int, help="stop after this step (the LR schedule is unchanged)")
    add_overrides(p)
    p.set_defaults(func=cmd_pretrain)


def _check_data_path(spec: str | None) -> None:
    """A --data path that does not exist, said before torch is imported (as ``open_source`` says it)."""
    if missing(spec):
        from ..data.decode import DataError

        raise DataError(f"data path {spec!r} does not exist")


def _check_saved_config(run_dir: Path) -> None:
    """--resume on a folder without a run: said before torch is imported (as ``load_config`` says it)."""
    if not (run_dir / "config.yaml").is_file():
        load_config(run_dir / "config.yaml")


def _stopped(summary: dict, command: str = "pretrain") -> str:
    why = f" ({summary['preempted']}: checkpoint written, resume with --resume)" if summary.get("preempted") else ""
    if summary.get("complete") and not why:
        key = "optim.minutes" if summary.get("time_budget_reached") else "optim.epochs"
        why = (f" (complete; to train longer: openseer {command} --resume {summary['run_dir']} with a larger "
               f"{key})")
    compiled = summary.get("compile_seconds") or 0
    took = f"; compiling took {compiled:.0f} s, not counted in the budget" if compiled >= 1 else ""
    return (f"openseer: stopped at step {summary['step']}/{summary['total_steps']}{why}{took}; "
            f"run in {summary['run_dir']}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Start or resume SwAV pretraining."""
    if args.resume:
        if args.data or args.recipe or args.out or args.init:
            raise ConfigError("--resume RUN_DIR continues a run with its saved config and weights: drop "
                              "--data/--recipe/--out/--init (--init WEIGHTS starts a new run with --out)")
        run_dir = Path(args.resume)
        _check_saved_config(run_dir)
        from ..train.loop import pretrain, resume_config

        cfg = resume_config(run_dir, args.overrides)
        summary = pretrain(cfg, run_dir, resume=True, max_steps=args.max_steps)
    else:
        if not args.out:
            raise ConfigError("--out RUN_DIR is required (where the run's config, metrics and checkpoints go)")
        base: dict = {"data": {"source": args.data}} if args.data else {}
        if args.init:
            base["model"] = {"init": args.init}
        cfg = build_config(args.recipe or "tiny-cpu", args.overrides, base=base or None)
        if cfg.model.init and missing(cfg.model.init):
            raise ConfigError(f"model.init {cfg.model.init!r} does not exist (a run directory, checkpoint, exported "
                              f"or imported file, or SEER/VISSL checkpoint)")
        _check_data_path(cfg.data.source)
        from ..train.loop import pretrain

        summary = pretrain(cfg, Path(args.out), resume="auto" if args.auto_resume else False,
                           max_steps=args.max_steps)
    from ..train.distributed import close_distributed, env_from_os

    close_distributed()  # the process ends here: gloo's threads must be joined before the interpreter exits
    if env_from_os().is_main:  # once per run, not once per process
        print(_stopped(summary))
    return 0


DISTILL_EXAMPLES = """examples:
  openseer distill runs/big --student mobilenetv2_035 --data /pile --out runs/small
  openseer distill runs/big --student lcnet_035 --data fashion-mnist --out runs/s2 optim.minutes=10 model.stem_stride=1
  openseer distill --resume runs/small
"""


def add_distill(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "distill", "train a small student backbone to match a teacher's features", DISTILL_EXAMPLES,
                   description="Distil a teacher (a run, checkpoint, exported/imported file or timm name) into "
                               "a student (any timm backbone) on unlabelled images. The result is a run "
                               "directory that eval, export, embed and report take. Settings default to the "
                               "teacher run's config (else the tiny-cpu recipe); trailing key=value pairs "
                               "override, e.g. distill.loss=swav optim.minutes=10.")
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
    add_overrides(p)
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    """Train a small student backbone to reproduce a teacher's features on unlabelled images."""
    if args.resume and args.teacher and "=" in args.teacher:  # `--resume RUN key=value`: an override, not a teacher
        args.overrides, args.teacher = [args.teacher, *args.overrides], None
    if args.resume:
        if args.teacher or args.student or args.data or args.recipe or args.out:
            raise ConfigError("--resume RUN_DIR continues a distill run with its saved config: drop the teacher, "
                              "--student, --data, --recipe and --out")
        run_dir = Path(args.resume)
        _check_saved_config(run_dir)
        from ..train.distill import distill
        from ..train.loop import resume_config

        summary = distill(resume_config(run_dir, args.overrides), run_dir, resume=True, max_steps=args.max_steps)
    else:
        missing = [name for name, v in (("TEACHER", args.teacher), ("--student ARCH", args.student),
                                        ("--out RUN_DIR", args.out)) if not v]
        if missing:
            raise ConfigError(f"openseer distill needs {', '.join(missing)} (see openseer distill --help)")
        from ..train.distill import distill, distill_config

        overrides = [*args.overrides, *([f"distill.teacher_arch={args.teacher_arch}"] if args.teacher_arch else [])]
        cfg = distill_config(args.teacher, args.student, args.data, args.recipe, overrides)
        summary = distill(cfg, Path(args.out), resume="auto" if args.auto_resume else False, max_steps=args.max_steps)
    print(_stopped(summary, "distill"))
    return 0


PLAN_EXAMPLES = """examples:
  openseer plan --recipe seer-rg128 --gpus 8 --gpu-mem-gb 80
  openseer plan --recipe seer-rg10b --gpus 64 --gpu-mem-gb 80 --json
  openseer plan --recipe seer-rg32 --gpus 1 --gpu-mem-gb 24 data.batch_size=64

exit status 2 when no strategy fits (the message says how many GPUs would)
"""


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "plan", "parameters and per-GPU memory of a recipe on N GPUs; does it fit?", PLAN_EXAMPLES,
                   description="Plan a run: exact parameter counts and per-GPU memory (weights, gradients, "
                               "momentum, activations) under DDP and FSDP, with and without activation "
                               "checkpointing, from a meta-device model (no memory, no GPU needed).")
    p.add_argument("--recipe", default="tiny-cpu", help="a recipe name or YAML file")
    p.add_argument("--gpus", type=int, required=True, help="total number of GPUs (processes)")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory of one GPU in GiB, e.g. 40 or 80")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_overrides(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """Parameters and per-GPU memory of a recipe on N GPUs (meta device: no memory, no GPU needed)."""
    cfg = build_config(args.recipe, args.overrides)
    from ..use.plan import PlanError, format_plan, make_plan, plan_json

    result = make_plan(cfg, args.gpus, args.gpu_mem_gb)
    print(plan_json(result) if args.json else format_plan(result))
    if not any(result["fits"].values()):
        need = result.get("min_gpus")
        hint = (f"{need} GPUs of {args.gpu_mem_gb:g} GiB would fit with FSDP + activation checkpointing"
                if need else f"no GPU count that divides the global batch fits in {args.gpu_mem_gb:g} GiB; "
                             f"use larger GPUs or a smaller data.batch_size")
        raise PlanError(f"{cfg.recipe} does not fit on {args.gpus} GPUs of {args.gpu_mem_gb:g} GiB with any "
                        f"strategy: {hint}")
    return 0


DOCTOR_EXAMPLES = """examples:
  openseer doctor runs/a      # config, checkpoints, metrics: what is wrong and the command that recovers
"""


def add_doctor(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "doctor", "check a run directory (config, checkpoints, metrics) and how to recover",
                   DOCTOR_EXAMPLES)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check a run directory and say how to recover."""
    from ..use.doctor import run_doctor

    return run_doctor(args.run_dir)
