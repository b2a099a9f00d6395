"""What a run is told before it trains, so a recipe that does not fit the data or the run's length is
said at once instead of discovered in the metrics an hour later:

* ``fit_batch``: a pile smaller than one global batch trains with the largest batch it fills (a
  multiple of the world size), said in one line and written into the run's config.
* ``advice``: warm-up or prototype freezing that outlasts the run (the LR never reaches its peak,
  the prototypes never train), the LR the run will actually reach, and crops far smaller than the
  images (the model would learn from, and later embed, thumbnails of the photos); with ``--init``
  and a scratch recipe that has an ``-adapt`` variant, one line naming it.
"""

from __future__ import annotations

import copy
import io

from ..config import Config, recipe_names
from ..data.collection import Collection
from ..rundir import RunError
from .optim import lr_at

CROP_RATIO_WARN = 6  # the images' typical short side over the large crop size beyond which we warn
SMALL_CROP = 64  # large crops below this are a recipe for small images (tiny-cpu: 24 px)
SIZE_SAMPLE = 16  # image headers read to estimate the pile's sizes (folders and file lists)


def fit_batch(cfg: Config, n_images: int, world: int) -> tuple[Config, str]:
    """``cfg`` with ``data.batch_size`` lowered to fit a pile of ``n_images`` (the largest multiple of
    ``world`` not above it), and the line that says so; ``cfg`` itself when the pile fills a batch."""
    gb = cfg.data.batch_size
    if n_images >= gb:
        return cfg, ""
    fitted = n_images - n_images % world
    if fitted < max(world, 2):
        raise RunError(f"the data has {n_images} usable image(s): too few for a batch on {world} process(es) "
                       "(SwAV needs at least 2 images per step); add images")
    cfg = copy.deepcopy(cfg)
    cfg.data.batch_size = fitted
    return cfg, (f"the pile has {n_images} images, fewer than data.batch_size={gb}: training with a global batch "
                 f"of {fitted} (recorded in config.yaml)")


def reached_lr(cfg: Config, sched: dict, stop: int) -> float:
    """The highest LR of steps ``0 .. stop - 1`` of this schedule (the peak, unless warm-up outlasts them)."""
    o = cfg.optim
    last = max(min(stop, sched["total_steps"]) - 1, 0)
    if last >= o.warmup_steps:
        return sched["peak_lr"]
    return lr_at(last, sched["total_steps"], sched["peak_lr"], o.warmup_steps, o.warmup_start_ratio,
                 o.final_lr_ratio)


def image_short_side(source: Collection) -> int | None:
    """The median short side (pixels) of a few of the pile's images, from their headers; None when
    the pile cannot be sampled cheaply (tar shards) or no sampled file opens."""
    if getattr(source, "in_memory", False):
        images = getattr(source, "images", None)
        return int(min(images.shape[-2:])) if images is not None and images.ndim >= 3 else None
    if getattr(source, "kind", "") != "files" or not len(source):
        return None
    from PIL import Image

    from ..data.decode import BadImage

    n = len(source)
    sides = []
    for i in sorted({round(j * (n - 1) / max(SIZE_SAMPLE - 1, 1)) for j in range(min(SIZE_SAMPLE, n))}):
        try:
            data = source.read(i)  # type: ignore[attr-defined]  # bounded time, deny-list applied
            with Image.open(io.BytesIO(data)) as im:  # the header only: no pixels are decoded
                sides.append(min(im.size))
        except (BadImage, OSError, ValueError, Image.DecompressionBombError):
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


def advice(cfg: Config, sched: dict, step: int, stop: int, short_side: int | None) -> list[str]:
    """Warnings (each one line, starting ``WARNING:``) about a run of steps ``step .. stop - 1``, and
    the LR it will reach; a ``note:`` line suggesting the ``-adapt`` recipe for a run with ``--init``.
    Under a time budget ``stop`` is the step schedule's end: the clock may end the run sooner (the
    loop repeats the warm-up check once the step time is known)."""
    out = []
    adapt = f"{cfg.recipe}-adapt"
    if cfg.model.init and adapt in recipe_names():
        out.append(f"note: --init continues from trained weights, which need no long warm-up or prototype "
                   f"freezing: --recipe {adapt} has the settings measured for that (docs/benchmarks.md, "
                   f"\"Adapting released weights\")")
    if stop > step:
        out += steps_advice(cfg, sched, stop, "")
    crop = cfg.crops.sizes[0]
    if short_side and short_side > CROP_RATIO_WARN * crop:
        photos = "photos-cpu-adapt, seer-gpu-adapt" if cfg.model.init else "photos-cpu, seer-gpu"
        recipe = (" the model learns from, and embeds, small thumbnails of them: use a recipe for photographs "
                  f"({photos}: openseer recipes) or larger crops.sizes;" if crop < SMALL_CROP else "")
        side = cfg.data.decode_cache_side if cfg.data.decode_cache == "on" else max(256, 2 * crop)
        shard = f"`openseer shard {cfg.data.source} --out SHARDS --max-side {side}`"
        decoding = (f" decoding them at full size every epoch is slow: downscale once with {shard} and train on the "
                    "shards" if cfg.data.decode_cache != "on" else
                    f" the decode cache reads them as copies of at most {cfg.data.decode_cache_side} px "
                    f"(data.decode_cache), so only its first pass decodes them at full size (or downscale them once: "
                    f"{shard})")
        # with the decode cache on and crops made for photographs, nothing is wrong: a note, not a warning
        level = "note" if cfg.data.decode_cache == "on" and not recipe else "WARNING"
        out.append(f"{level}: the images are about {short_side} px on their short side, {short_side // crop}x the "
                   f"{crop}-px large crops (recipe {cfg.recipe}):{recipe}{decoding}")
    return out


def steps_advice(cfg: Config, sched: dict, stop: int, how: str) -> list[str]:
    """Warm-up or prototype freezing that lasts past step ``stop`` (``how``: how that end was
    estimated, e.g. ' (the 2-minute budget at 3.1 s/step)'), and the LR reached."""
    o, s, out = cfg.optim, cfg.swav, []
    if o.warmup_steps >= stop:
        out.append(f"WARNING: optim.warmup_steps={o.warmup_steps} outlasts the run's {stop} steps{how}: the LR "
                   f"reaches only {reached_lr(cfg, sched, stop):.4g}, not the peak {sched['peak_lr']:.4g}; "
                   f"set optim.warmup_steps to about a tenth of the run (e.g. optim.warmup_steps={max(stop // 10, 1)})")
    if s.freeze_prototypes_steps >= stop and not cfg.distill.teacher:  # distill trains no prototypes
        out.append(f"WARNING: swav.freeze_prototypes_steps={s.freeze_prototypes_steps} outlasts the run's {stop} "
                   f"steps{how}: the prototypes never train; set swav.freeze_prototypes_steps to a small share "
                   f"of the run (e.g. swav.freeze_prototypes_steps={max(stop // 20, 1)})")
    return out
