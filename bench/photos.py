"""Photo features without labels: copy retrieval on held-out wallpapers, and pretraining step time.

    .venv/bin/python bench/photos.py                        # about 20 minutes on 2 cores (10 of them pretraining)
    .venv/bin/python bench/photos.py --quick                # a few minutes: a 0.5-minute run, fewer copies and steps
    .venv/bin/python bench/photos.py --model runs/photos --parts retrieval   # a run you have (no pretraining)
    .venv/bin/python bench/photos.py --parts steps          # step time only
    .venv/bin/python bench/photos.py --photos ~/Pictures --work runs/bench-mine   # your own photographs

The pile: the distinct wallpaper photographs of Debian's packages (``openseer.data.pile.load_photographs``:
``apt-get install gnome-backgrounds mate-backgrounds ukui-wallpapers plasma-workspace-wallpapers``),
split by picture (seeded) into train and held-out. Written once under ``--work`` and reused: ``train/``
(the train pictures' original files, 0.07-24 megapixels, as a user's folder holds them) and
``gallery/`` (every picture at most 1024 px, PNG).

1. Pretraining: the ``photos-cpu`` recipe on ``train/`` for ``--minutes`` (``openseer.train.loop.pretrain``,
   what ``openseer pretrain --data train/ --recipe photos-cpu`` runs); a run already there is resumed
   (one that finished says so and is used as it is).
2. Copy retrieval: every held-out picture gets ``--copies`` copies of each kind (seeded): ``jpeg``
   (re-encoded at quality 30-90), ``resize`` (0.25-0.5 of the side), ``crop`` (50-90% of the area,
   random aspect and position), ``colour`` (brightness, contrast, saturation and hue changed). Queries:
   the copies; gallery: every picture (train and held-out originals) and ``--tiles`` distractors
   (non-overlapping tiles, 1/2 and 1/3 of the side, of train pictures: distinct pictures that look
   like crops). Cosine similarity, searched exhaustively with faiss. Scored per feature set:
   recall@1 (the copy's own picture ranks first) and mAP (one relevant picture per query: the mean of
   1 / its rank), overall and per kind. Feature sets: ``openseer`` (the run's embeddings through
   ``openseer.load(run).embed``, at the recipe's input size), ``random_init`` (the same architecture and
   embed path with fresh weights) and ``pixels`` (32 x 32 RGB thumbnails, each minus its own mean,
   L2-normalised).
3. Step time: seconds per pretraining step of the same recipe (``model.compile=false``, the same
   batch), the median (and the mean) over ``--steps`` steps after the first pass over the pile, with
   the loader still at work through them (the run is stopped after them as a preempted job is), fed from (i) the
   plain folder (with ``data.decode_cache=off`` and ``=on`` when openseer has that key), (ii) tar
   shards written by ``openseer shard train/ --max-side 256``, (iii) the original SwAV loader's approach
   (its ``MultiCropDataset``: each file fully decoded with PIL every time, torchvision v2
   ``RandomResizedCrop`` + flip + colour distortion + blur per crop, in a shuffled ``DataLoader`` with
   the recipe's workers and ``drop_last``, as SwAV's ``main_swav.py``), feeding openseer's training step.

Prints one JSON line on stdout (progress and openseer's own lines go to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from openseer.data.pile import crop_area

RECIPE = "photos-cpu"
KINDS = ("jpeg", "resize", "crop", "colour")
SETS = ("openseer", "random_init", "pixels")
GALLERY_SIDE = 1024
MANIFEST = "photos.json"


class BenchError(Exception):
    """What stops the bench, said in one line (exit 2)."""


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the pile, written once under --work

def prepare(work: Path, seed: int, held_out: float, photos_dir: str | None = None) -> dict:
    """The split pile under ``work`` (reused when its manifest matches ``seed``, ``held_out`` and the
    photographs' folder): ``train/`` holds the train pictures' original files, ``gallery/`` every
    picture at most 1024 px. ``photos_dir``: a folder of photographs instead of the wallpapers."""
    from openseer.data.pile import PHOTO_ROOTS, WALLPAPER_PACKAGES, load_photographs

    roots = (Path(photos_dir),) if photos_dir else PHOTO_ROOTS
    path = work / MANIFEST
    if path.exists():
        doc = json.loads(path.read_text())
        if (doc.get("seed"), doc.get("held_out"), doc.get("roots")) == (seed, held_out, [str(r) for r in roots]):
            return doc
        raise BenchError(f"{work} holds a split of other photographs, another seed or held-out share: "
                         "pass another --work")
    t0 = time.perf_counter()
    photos = load_photographs(max_side=GALLERY_SIDE, roots=roots)
    if len(photos) < 8:
        where = photos_dir or f"the wallpapers (apt-get install {' '.join(WALLPAPER_PACKAGES)})"
        raise BenchError(f"fewer than 8 distinct photographs in {where}")
    order = list(range(len(photos)))
    random.Random(seed).shuffle(order)
    n_held = max(2, round(held_out * len(photos)))
    held = set(order[:n_held])
    for sub in ("train", "gallery"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    pictures = []
    for i, (src, img) in enumerate(photos):
        gallery = f"gallery/{i:03d}.png"
        img.save(work / gallery, format="PNG", compress_level=1)
        entry = {"id": i, "source": src, "split": "held_out" if i in held else "train", "gallery": gallery}
        if i not in held:
            entry["train"] = f"train/{i:03d}-{Path(src).name}"
            shutil.copyfile(src, work / entry["train"])
        pictures.append(entry)
    doc = {"seed": seed, "held_out": held_out, "roots": [str(r) for r in roots], "pictures": pictures,
           "train_bytes": sum((work / p["train"]).stat().st_size for p in pictures if "train" in p)}
    path.write_text(json.dumps(doc, indent=1))
    say(f"wrote {len(photos) - n_held} train and {n_held} held-out pictures under {work} "
        f"({time.perf_counter() - t0:.0f} s)")
    return doc


# ---------------------------------------------------------------- copies

def make_copy(img: Image.Image, kind: str, rng: random.Random) -> tuple[Image.Image, str]:
    """A copy of ``img`` of one kind, and what was done to it."""
    if kind == "jpeg":
        q = rng.randint(30, 90)
        return _jpeg(img, q), f"jpeg{q}"
    if kind == "resize":
        s = rng.uniform(0.25, 0.5)
        size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
        return img.resize(size, Image.Resampling.BILINEAR), f"resize{s:.2f}"
    if kind == "crop":
        a = rng.uniform(0.5, 0.9)
        return crop_area(img, a, rng), f"crop{a:.2f}"
    if kind == "colour":
        b, c, s, hue = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.4, 1.6), rng.uniform(-0.1, 0.1)
        out = ImageEnhance.Brightness(img.convert("RGB")).enhance(b)
        out = ImageEnhance.Contrast(out).enhance(c)
        out = ImageEnhance.Color(out).enhance(s)
        h, sat, v = out.convert("HSV").split()
        h = h.point(lambda p: (p + round(hue * 255)) % 256)
        out = Image.merge("HSV", (h, sat, v)).convert("RGB")
        return out, f"brightness{b:.2f}+contrast{c:.2f}+saturation{s:.2f}+hue{hue:+.2f}"
    raise ValueError(f"unknown copy kind {kind!r}")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return out


def tiles(img: Image.Image, fractions: tuple[int, ...] = (2, 3)) -> list[Image.Image]:
    """Non-overlapping tiles at 1/2 and 1/3 of the side: distinct pictures (distractors)."""
    W, H = img.size
    out = []
    for f in fractions:
        tw, th = W // f, H // f
        out += [img.crop((i * tw, j * th, (i + 1) * tw, (j + 1) * th)) for i in range(f) for j in range(f)]
    return out


# ---------------------------------------------------------------- features and scores

def pixels(images: list[Image.Image], side: int = 32) -> np.ndarray:
    """32 x 32 RGB thumbnails (the whole picture, box-filtered), each minus its own mean, L2-normalised."""
    x = np.stack([np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BOX), np.float32).ravel()
                  for im in images])
    x -= x.mean(axis=1, keepdims=True)
    return x


def unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranks(gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1-based rank of each query's true gallery row under cosine similarity (faiss, exhaustive)."""
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(unit(gallery))
    _, order = index.search(unit(queries), gallery.shape[0])
    hit = order == truth[:, None]
    return hit.argmax(axis=1) + 1


def scores(rank: np.ndarray, kinds: list[str]) -> dict:
    """recall@1 and mAP (one relevant picture per query: mean of 1 / rank), overall and per kind, in %."""

    def cell(r: np.ndarray) -> dict:
        return {"recall_at_1": round(100 * float(np.mean(r == 1)), 2), "map": round(100 * float(np.mean(1 / r)), 2)}

    k = np.array(kinds)
    return {**cell(rank), "by_kind": {kind: cell(rank[k == kind]) for kind in KINDS if (k == kind).any()}}


def retrieval(work: Path, doc: dict, run: Path, args: argparse.Namespace) -> dict:
    from openseer.use.api import load

    t0 = time.perf_counter()
    pics = doc["pictures"]
    gallery = []
    for p in pics:
        with Image.open(work / p["gallery"]) as im:
            gallery.append(im.convert("RGB"))
    n_pictures = len(gallery)
    if args.tiles:
        rng = random.Random(args.seed + 1)
        pool = [t for p, im in zip(pics, gallery) if p["split"] == "train" for t in tiles(im)]
        gallery += rng.sample(pool, min(args.tiles, len(pool)))
    rng = random.Random(args.seed)
    queries, truth, kinds = [], [], []
    for p in pics:
        if p["split"] != "held_out":
            continue
        for kind in KINDS:
            for _ in range(args.copies):
                img, _how = make_copy(gallery[p["id"]], kind, rng)
                queries.append(img)
                truth.append(p["id"])
                kinds.append(kind)
    truth_a = np.array(truth)
    copies_s = time.perf_counter() - t0
    results, seconds = {}, {}
    for name in args.sets.split(","):
        t1 = time.perf_counter()
        if name == "pixels":
            g, q = pixels(gallery), pixels(queries)
        else:
            model = load(str(run), random_init=name == "random_init")
            g = model.embed(gallery, batch_size=32)
            q = model.embed(queries, batch_size=32)
            results.setdefault("_embed", {"crop": model.transform.crop, "feature_dim": model.feature_dim,
                                          "arch": model.arch})
        results[name] = scores(ranks(g, q, truth_a), kinds)
        seconds[name] = round(time.perf_counter() - t1, 1)
        say(f"{name}: recall@1 {results[name]['recall_at_1']}%, mAP {results[name]['map']}%")
    embed = results.pop("_embed", {})
    lead = {f"openseer_minus_{other}": round(results["openseer"]["recall_at_1"] - results[other]["recall_at_1"], 2)
            for other in ("random_init", "pixels") if "openseer" in results and other in results}
    return {**lead, "pictures": n_pictures, "held_out": len(set(truth)), "gallery": len(gallery),
            "distractor_tiles": len(gallery) - n_pictures, "queries": len(queries),
            "copies_per_kind": args.copies, "embed": embed, "results": results,
            "copies_s": round(copies_s, 1), "features_s": seconds}


# ---------------------------------------------------------------- pretraining

def config(overrides: list[str], source: str):
    from openseer.config import build_config

    return build_config(RECIPE, ["log.progress=false", "log.tensorboard=false", *overrides],
                        base={"data": {"source": source}})


def pretrain_run(work: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    from openseer.train.loop import pretrain

    run = work / f"run-{args.minutes:g}m-seed{args.seed}{'-quick' if args.quick else ''}"
    resume = (run / "config.yaml").exists()
    quick = ["data.batch_size=16"] if args.quick else []  # a first step that decodes 16 photographs, not 60
    cfg = config([f"optim.minutes={args.minutes:g}", f"seed={args.seed}", *quick, *args.overrides], str(work / "train"))
    say(f"{'resuming' if resume else 'pretraining'} {RECIPE} for {args.minutes:g} min -> {run}")
    t0 = time.perf_counter()
    summary = pretrain(cfg, run, resume="auto")  # as `openseer pretrain --auto-resume`: a run already there continues
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.startswith("{")]
    losses = [r["loss"] for r in rows if "loss" in r]
    return run, {"run": str(run), "steps": summary["step"], "train_s": summary["counters"].get("train_seconds"),
                 "compile_s": summary.get("compile_seconds", 0.0), "images_seen": summary["counters"]["images_seen"],
                 "first_loss": round(losses[0], 4) if losses else None,
                 "final_loss": round(losses[-1], 4) if losses else None,
                 "resumed": resume, "wall_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- step time

def knows_decode_cache() -> bool:
    """Whether this openseer's config has ``data.decode_cache`` (passed only where it exists)."""
    from openseer.config import DataConfig

    return "decode_cache" in {f.name for f in dataclasses.fields(DataConfig)}


def step_overrides(args: argparse.Namespace, batch: int) -> list[str]:
    return ["model.compile=false", "optim.minutes=0", "log.every=1", f"checkpoint.every={10 ** 9}",
            f"data.batch_size={batch}", f"seed={args.seed}", *args.overrides]


LOOKAHEAD = 4  # batches a loader worker prepares ahead (openseer's DataLoader prefetch_factor, at most)


def time_loop(source: str, extra: list[str], args: argparse.Namespace, batch: int, warm: int, scratch: Path) -> dict:
    """Seconds per step of ``pretrain`` from ``source`` over steps ``warm + 1 .. warm + --steps``
    (metrics.jsonl's step_s at log.every=1: the wall time from one step's end to the next, data wait
    included). The run may go on for what the loader prepares ahead, so the loader still works,
    sharing the cores, through every timed step as in a long run; once the timed steps are logged it
    is stopped the way a preempted job is (SIGINT: it finishes the step at hand and returns)."""
    from openseer.train.loop import pretrain

    cfg = config([*step_overrides(args, batch), *extra], source)
    lookahead = max(cfg.data.num_workers, 1) * LOOKAHEAD
    run = Path(tempfile.mkdtemp(prefix="steps-", dir=scratch))
    done = threading.Event()

    def stop_when_timed() -> None:
        metrics = run / "run" / "metrics.jsonl"
        while not done.wait(0.2):
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            if rows and json.loads(rows[-1]).get("step", 0) >= warm + args.steps:
                os.kill(os.getpid(), signal.SIGINT)
                return

    previous = signal.signal(signal.SIGINT, lambda *_: None)  # a signal that lands after the run is ignored
    watcher = threading.Thread(target=stop_when_timed, daemon=True)
    try:
        watcher.start()
        pretrain(cfg, run / "run", max_steps=warm + args.steps + lookahead)
        done.set()
        watcher.join()
        rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()
                if line.startswith("{")]
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)
        shutil.rmtree(run, ignore_errors=True)
    timed = [r for r in rows if "step_s" in r and warm < r["step"] <= warm + args.steps]
    return per_step([r["step_s"] for r in timed]) | {
        "data_wait_s": round(statistics.median(r["data_s"] for r in timed), 3)}


def per_step(seconds: list[float]) -> dict:
    """The median (the headline) and the mean (the throughput) of per-step seconds."""
    return {"s_per_step": round(statistics.median(seconds), 3), "mean_s": round(statistics.fmean(seconds), 3),
            "steps": len(seconds)}


class SwAVMultiCrop:
    """SwAV's ``MultiCropDataset`` (main_swav.py / src/multicropdataset.py) on a flat folder: every item
    decodes the whole file with PIL, then each crop is RandomResizedCrop + flip + colour distortion
    (jitter 0.8 s, p 0.8; grayscale p 0.2) + PIL Gaussian blur (p 0.5, radius 0.1-2) + ToTensor +
    Normalize, here with torchvision's v2 transforms at the recipe's crop sizes, scales and statistics."""

    def __init__(self, folder: Path, crops):
        import torch
        from torchvision.transforms import v2

        from openseer.data.pile import PHOTO_EXTENSIONS

        self.paths = sorted(p for p in folder.iterdir()  # the pictures, not a cache or index folder beside them
                            if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS and not p.name.startswith("."))
        s = crops.jitter_strength
        self.trans = []
        for size, n, lo, hi in zip(crops.sizes, crops.counts, crops.min_scale, crops.max_scale):
            t = v2.Compose([
                v2.RandomResizedCrop(size, scale=(lo, hi), antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                _PILBlur(crops.blur_p),
                v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(crops.mean), std=list(crops.std)),
            ])
            self.trans += [t] * n

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return [t(img) for t in self.trans]


class _PILBlur:
    """SwAV's PILRandomGaussianBlur (radius 0.1-2, applied with probability p)."""

    def __init__(self, p: float, lo: float = 0.1, hi: float = 2.0):
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


def time_swav_loader(folder: Path, args: argparse.Namespace, batch: int, warm: int) -> dict:
    """Median seconds per step of openseer's training step fed by SwAV's loader, after ``warm`` steps
    (the model, optimiser and step built as ``pretrain`` builds them for one process)."""
    from contextlib import nullcontext

    import torch
    from torch.utils.data import DataLoader

    from openseer.data.batches import Batch
    from openseer.device import resolve_device
    from openseer.train.distributed import env_from_os
    from openseer.train.hardware import resolve_auto
    from openseer.train.loop import schedule
    from openseer.train.methods.swav import SwAVTraining
    from openseer.train.optim import build_optimizer
    from openseer.train.step import Run, train_step

    cfg = config(step_overrides(args, batch), str(folder))
    device = resolve_device(cfg.device, option="device=")
    cfg, _ = resolve_auto(cfg, device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    env = env_from_os()
    dataset = SwAVMultiCrop(folder, cfg.crops)
    torch.manual_seed(cfg.seed)
    build = SwAVTraining(cfg, env, device)
    model = build.build_model()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    method = build.build_method(model, autocast)
    run = Run(cfg=cfg, device=device, env=env, sched=schedule(cfg, len(dataset), 1), method=method,
              optimizer=build_optimizer(model, cfg), counters={"bad_images": {}, "skipped_steps": 0, "images_seen": 0},
              t_loop=time.perf_counter())
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True)  # workers start again each epoch, as there
    times: list[float] = []
    t = time.perf_counter()
    while len(times) < warm + args.steps:
        for crops in loader:
            train_step(run, Batch(run.step, [c.to(device, non_blocking=True) for c in crops], []))
            now = time.perf_counter()
            times.append(now - t)
            t = now
            if len(times) >= warm + args.steps:
                break
    return per_step(times[warm:])


def step_times(work: Path, doc: dict, args: argparse.Namespace) -> dict:
    from openseer.commands import main as openseer_main
    from openseer.data.batches import steps_per_epoch

    folder = work / "train"
    n = sum(1 for p in doc["pictures"] if p["split"] == "train")
    recipe = config(args.overrides, str(folder))
    batch = min(args.batch or recipe.data.batch_size, n)
    warm = steps_per_epoch(n, batch) + 1  # the first pass over the pile (and a decode cache's filling) untimed
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    out: dict = {"batch": batch, "warmup_steps": warm, "workers": recipe.data.num_workers}
    if knows_decode_cache():
        for mode in ("off", "on"):
            say(f"step time: folder, data.decode_cache={mode}")
            out[f"folder_decode_cache_{mode}"] = time_loop(str(folder), [f"data.decode_cache={mode}"], args, batch,
                                                           warm, scratch)
    else:
        say("step time: folder")
        out["folder"] = time_loop(str(folder), [], args, batch, warm, scratch)
    shards = work / "shards256"
    if not any(shards.glob("*.tar")):
        say("writing shards: openseer shard train/ --max-side 256")
        t0 = time.perf_counter()
        rc = openseer_main(["shard", str(folder), "--out", str(shards), "--max-side", "256"])
        if rc:
            raise BenchError(f"openseer shard {folder} failed (exit {rc})")
        out["shard_write_s"] = round(time.perf_counter() - t0, 1)
    say("step time: shards (--max-side 256)")
    out["shards_256"] = time_loop(str(shards), [], args, batch, warm, scratch)
    say("step time: SwAV's loader")
    out["swav_loader"] = time_swav_loader(folder, args, batch, warm)
    base = out["shards_256"]["s_per_step"]
    timed = {k: v for k, v in out.items() if isinstance(v, dict) and "s_per_step" in v}
    out["vs_shards"] = {k: round(v["s_per_step"] / base, 2) for k, v in timed.items()}
    out["vs_shards_mean"] = {k: round(v["mean_s"] / out["shards_256"]["mean_s"], 2) for k, v in timed.items()}
    return out


# ---------------------------------------------------------------- main

def measure(line: dict, work: Path, args: argparse.Namespace, parts: set[str]) -> None:
    """The split pile, then the parts asked for, each adding its entry to ``line``."""
    doc = prepare(work, args.seed, args.held_out, args.photos)
    line["pile"] = {"pictures": len(doc["pictures"]),
                    "train": sum(1 for x in doc["pictures"] if x["split"] == "train"),
                    "held_out": sum(1 for x in doc["pictures"] if x["split"] == "held_out"),
                    "train_mb": round(doc["train_bytes"] / 1e6, 1)}
    if "retrieval" in parts:
        if args.model:
            run = Path(args.model)
            line["pretrain"] = {"model": args.model}
        else:
            run, line["pretrain"] = pretrain_run(work, args)
        line["retrieval"] = retrieval(work, doc, run, args)
    if "steps" in parts:
        line["step_time"] = step_times(work, doc, args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench-photos", help="folder for the split pile, the run and the shards "
                   "(reused; default runs/bench-photos)")
    p.add_argument("--photos", help="a folder of photographs to split instead of the Debian wallpapers")
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining budget (default 10)")
    p.add_argument("--model", help="measure this run or exported model instead of pretraining one")
    p.add_argument("--parts", default="retrieval,steps", help="what to measure: retrieval, steps (default both)")
    p.add_argument("--sets", default=",".join(SETS), help="feature sets for copy retrieval (default all)")
    p.add_argument("--held-out", type=float, default=0.25, help="share of the pictures held out (default 0.25)")
    p.add_argument("--copies", type=int, default=5, help="copies per held-out picture and kind (default 5)")
    p.add_argument("--tiles", type=int, default=1000, help="distractor tiles of train pictures in the gallery "
                   "(default 1000: all of them, 13 a picture, where fewer exist; 0: none)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per data path (default 5)")
    p.add_argument("--batch", type=int, default=0, help="batch for the step times (default the recipe's, "
                   "at most the train pictures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default torch's)")
    p.add_argument("--quick", action="store_true", help="a check in a few minutes: 0.5-minute pretraining at batch 16, "
                   "2 copies per kind, 200 tiles, 2 timed steps at batch 32")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (pretraining and step time)")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes = min(args.minutes, 0.5)
        args.copies, args.steps = min(args.copies, 2), min(args.steps, 2)
        args.batch = args.batch or 32
        args.tiles = min(args.tiles, 200)
    parts = set(args.parts.split(","))
    if not parts <= {"retrieval", "steps"}:
        p.error(f"--parts takes retrieval and/or steps, not {args.parts}")
    import torch

    from openseer.config import OpenseerError

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        args.overrides = [f"threads={args.threads}", *args.overrides]
    t0 = time.perf_counter()
    work = Path(args.work)
    line: dict = {"bench": "photos", "recipe": RECIPE, "quick": args.quick, "seed": args.seed}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # openseer's own lines go to stderr; stdout: the JSON line
            measure(line, work, args, parts)
    except (OpenseerError, BenchError) as e:
        say(f"error: {e}")
        return 2
    line.update({"overrides": args.overrides, "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "total_s": round(time.perf_counter() - t0, 1)})
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
