"""How close the SwAV training step gets to the hardware, against a typical implementation.

For each configuration prints one JSON line: source images/s of the whole training step (data
included), the split between data wait, forward, Sinkhorn, backward and optimiser step, and model
FLOP utilisation = FLOPs of one forward+backward (counted with torch.utils.flop_counter) divided by
the measured forward+backward time, over the matmul peak measured in the same run (large square
fp32 and bf16 matmuls). Convolution backward FLOPs use a grouped-aware formula (torch's counts the
grad-weight term of grouped convolutions as dense).

Configurations:
  tiny     the tiny-cpu recipe on Fashion-MNIST (openseer's real training loop)
  tiny-baseline   the same backbone, crops and batch trained the way a typical SwAV code does it:
           default memory layout, fp32, eager, each crop through the trunk separately, per-image PIL
           augmentation in a plain DataLoader with 2 workers
  rg32     regnety_320 at SEER's crops (2x160 + 4x96), small batch, synthetic images, bf16 +
           channels_last (model step only: data is not the question for a big model)
  rg128    the same with regnety_1280 (for a GPU: ``--device cuda``, bench/gpu_step.sh)
  pretrain openseer's real pretrain() on generated tar shards (``--device cuda``; under torchrun with
           its process group): images/s and host syncs per step that is not a log step
  swav     SwAV's own part of the step alone (Sinkhorn, targets with a queue, loss), CPU time
  levers   each speed lever of the tiny step switched off (or on) alone, one JSON line per lever:
           channels_last, bf16 autocast, torch.compile, batched uint8 augmentation vs per-image crops
           in 0/1/2 loader workers, one trunk pass per resolution vs per crop, foreach LARC vs a
           per-parameter loop, and the Sinkhorn cost at K = 16000

    python bench/train_step.py [--configs tiny,tiny-baseline,rg32,levers] [--steps N] [--smoke]
    python bench/train_step.py --device cuda --configs rg32,rg128 --big-batch 32,128 [--big-compile]
    python bench/train_step.py --configs tiny,rg32 --big-batch 4,8 --ceiling   # + each layer timed alone
    OPENSEER_PROCESS_GROUP=1 torchrun --nproc_per_node 1 bench/train_step.py --configs pretrain --device cuda \
        --steps 60 optim.precision=bf16 model.compile=true
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of a convolution's backward: one forward's worth for grad-input, one for grad-weight.

    torch's own formula (2.14) counts the grad-weight term as a dense convolution, ignoring
    ``groups``; for RegNetY's grouped 3x3 convs that inflates the count several-fold.
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: conv_backward_flops}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 8, device: str = "cpu") -> float:
    """FLOP/s of large square matmuls (best of a few runs)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = 0.0
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def count_flops(model, crops: list[torch.Tensor], amp_dtype=None, torch_formula: bool = False) -> int:
    """FLOPs of one forward + backward of the SwAV model on these crops (``torch_formula``: with
    torch's own convolution-backward formula, which over-counts grouped convolutions)."""
    with FlopCounterMode(display=False, custom_mapping=None if torch_formula else FLOP_FORMULAS) as counter:
        with torch.autocast(crops[0].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            z, scores = model(crops)
        scores.float().logsumexp(1).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _split(rows: list[dict]) -> dict:
    keys = ("data", "forward", "sinkhorn", "backward", "optimizer")
    return {k: round(sum(r[f"{k}_s"] for r in rows) / len(rows), 4) for k in keys}


def bench_tiny(steps: int, overrides: list[str], ceiling: bool = False) -> dict:
    """openseer's own loop (tiny-cpu recipe), timings from its metrics (``ceiling``: also time each
    convolution / linear layer alone, see ``kernel_ceiling``)."""
    from openseer.config import build_config
    from openseer.model.swav import build_swav
    from openseer.train.hardware import resolve_auto
    from openseer.train.loop import pretrain

    interval = max(steps // 4, 1)
    cfg = build_config("tiny-cpu", ["log.progress=false", "log.tensorboard=false", f"log.every={interval}",
                                    "checkpoint.every=1000000000", *overrides])
    cfg, _ = resolve_auto(cfg, torch.device("cpu"))  # what pretrain() will run: reported below
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(cfg, Path(tmp) / "run", max_steps=steps)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:] or rows
    step_s = sum(r["step_s"] for r in rows) / len(rows)
    split = _split(rows)
    model = build_swav(cfg)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    crops = [torch.randn(cfg.data.batch_size, 3, s, s) for s, n in zip(cfg.crops.sizes, cfg.crops.counts)
             for _ in range(n)]
    amp = torch.bfloat16 if cfg.optim.precision == "bf16" else None
    flops = count_flops(model, crops, amp)
    flops_torch = count_flops(model, crops, amp, torch_formula=True)
    layers = kernel_ceiling(model, crops, amp) if ceiling else None
    model_s = split["forward"] + split["backward"]
    return {"config": "tiny", "arch": cfg.model.arch, "batch": cfg.data.batch_size, "overrides": overrides,
            "imgs_per_s": round(cfg.data.batch_size / step_s, 1), "step_s": round(step_s, 4), "split_s": split,
            "flops_per_step": flops, "flops_per_step_torch_formula": flops_torch, "model_flops_per_s": flops / model_s,
            "precision": cfg.optim.precision, "compile": cfg.model.compile, "channels_last": cfg.model.channels_last,
            **({"layers": layers} if layers else {})}


def count_host_syncs(device: str):
    """A counter of the calls that make the host wait for the device, and a switch to pause it.

    On CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronising CUDA call
    (``.item()``, a device-to-host copy, ``nonzero``...); the warnings are counted. On the CPU
    nothing synchronises, so the calls that would (``item``, ``tolist``, ``bool``, ``float``...) are
    counted by patching ``torch.Tensor``. Returns ``(counter, restore)``; ``counter["on"]`` pauses it.
    """
    import warnings

    counter = {"n": 0, "on": True}
    if device == "cuda":
        show = warnings.showwarning

        def showwarning(message, category, *a, **k):
            if "synchronizing" in str(message):
                counter["n"] += int(counter["on"])
                return None
            return show(message, category, *a, **k)

        warnings.simplefilter("always")
        warnings.showwarning = showwarning
        torch.cuda.set_sync_debug_mode("warn")

        def restore():
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = show

        return counter, restore
    saved = {}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        real = saved[name] = getattr(torch.Tensor, name)

        def wrapped(t, *a, _real=real, **k):
            counter["n"] += int(counter["on"])
            return _real(t, *a, **k)

        setattr(torch.Tensor, name, wrapped)

    def restore():
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)

    return counter, restore


def _generated_shards(folder: Path, n: int) -> Path:
    """``n`` random 96x96 JPEGs written as tar shards (openseer's own shard writer)."""
    from PIL import Image

    from openseer.data.shards import write_shards

    src = folder / "images"
    src.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (96, 96, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(src / f"{i:05d}.jpg", quality=90)
    write_shards(src, folder / "shards", shard_size=max(n // 16, 8), workers=1)  # enough shards for the loaders
    return folder / "shards"


def bench_pretrain(steps: int, device: str, overrides: list[str], n_images: int = 1024) -> dict:
    """openseer's real ``pretrain()`` on generated tar shards, as ``openseer pretrain`` runs it (under
    torchrun: its process group; ``OPENSEER_PROCESS_GROUP=1`` opens one for a single rank too):
    images/s of the steps after the first (compile) and the host syncs of each step that is not a log step."""
    from openseer.config import build_config
    from openseer.train import loop
    from openseer.train.distributed import close_distributed, env_from_os

    env = env_from_os()
    every = max(steps // 2, 1)
    base = ["log.progress=false", "log.tensorboard=false", f"log.every={every}", "checkpoint.every=1000000000",
            f"device={device}", "optim.epochs=100"]
    entries: list[int] = []
    real_step = loop.train_step
    with tempfile.TemporaryDirectory() as tmp:
        shards = _generated_shards(Path(tmp) / "data", n_images)  # every rank its own identical copy
        cfg = build_config("tiny-cpu", [*base, *overrides], base={"data": {"source": str(shards)}})
        counter, restore = count_host_syncs(device)

        def counted(run, batch):
            entries.append(counter["n"])
            return real_step(run, batch)

        loop.train_step = counted
        try:
            summary = loop.pretrain(cfg, Path(tmp) / "run", max_steps=steps)
        finally:
            loop.train_step = real_step
            restore()
            close_distributed()  # gloo's threads joined before exit (as ``openseer pretrain`` does)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()] \
            if env.is_main else []
    # iteration i runs step i; leave out the first (compile, cuDNN autotuning) and the log steps
    per_step = [b - a for i, (a, b) in enumerate(zip(entries, entries[1:])) if i > 0 and (i + 1) % every]
    later = rows[1:] or rows
    return {"config": "pretrain", "device": device, "world_size": env.world_size, "steps": summary["step"],
            "batch": cfg.data.batch_size, "overrides": overrides,
            "imgs_per_s": round(sum(r["imgs_per_s"] for r in later) / max(len(later), 1), 1) if later else None,
            "host_syncs_per_step_max": max(per_step) if per_step else None,
            "host_syncs_per_step_mean": round(sum(per_step) / len(per_step), 2) if per_step else None,
            "skipped_steps": summary["counters"].get("skipped_steps")}


def bench_swav_part(smoke: bool = False) -> dict:
    """SwAV's own part of the step, alone, in CPU time (``process_time``: steadier than the wall clock
    on a shared machine), one thread: both target crops' Sinkhorn, ``SwAVLoss.targets`` with a full
    queue (queue scores + Sinkhorn + push), the swapped loss forward and forward + backward. Also runs
    against an older openseer on PYTHONPATH (only the classes every version has)."""
    import torch.nn.functional as F

    from openseer.model.swav import SwAVLoss, SwAVQueue, sinkhorn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    v, b, k, d, length = (6, 16, 300, 32, 64) if smoke else (6, 64, 3000, 128, 1024)
    queue = SwAVQueue(2, length, d)
    loss_fn = SwAVLoss(v, [0, 1], 0.1, 0.05, 3, queue=queue, queue_start_step=0)
    protos = F.normalize(torch.randn(k, d), dim=1)
    z = F.normalize(torch.randn(v * b, d), dim=1)
    s = z @ protos.t()
    for i in range(length // b + 1):  # fill the queue
        loss_fn.targets(z, s, protos, i)
    t = loss_fn.targets(z, s, protos, 99)
    big = torch.randn(2, length + b, k)

    def both_crops():
        try:
            sinkhorn(big, 0.05, 3)  # one batched call where supported
        except RuntimeError:
            sinkhorn(big[0], 0.05, 3), sinkhorn(big[1], 0.05, 3)

    def cpu_ms(fn, n: int = 3 if smoke else 10) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            for _ in range(n):
                fn()
            best = min(best, (time.process_time() - t0) / n)
        return round(best * 1000, 2)

    out = {"config": "swav", "crops": v, "batch": b, "prototypes": k, "queue": length,
           "sinkhorn_both_crops_cpu_ms": cpu_ms(both_crops),
           "targets_with_queue_cpu_ms": cpu_ms(lambda: loss_fn.targets(z, s, protos, 99)),
           "loss_cpu_ms": cpu_ms(lambda: loss_fn(s, t)),
           "loss_backward_cpu_ms": cpu_ms(lambda: loss_fn(s.detach().requires_grad_(), t).backward())}
    torch.set_num_threads(threads)
    return out


class _PILCrops(torch.utils.data.Dataset):
    """Per-image PIL augmentation, the way the original SwAV loader does it."""

    def __init__(self, images: torch.Tensor, cfg):
        from torchvision import transforms as T

        self.images = images
        s = cfg.crops.jitter_strength
        self.trans = []
        for size, count, lo, hi in zip(cfg.crops.sizes, cfg.crops.counts, cfg.crops.min_scale, cfg.crops.max_scale):
            t = T.Compose([
                T.RandomResizedCrop(size, scale=(lo, hi)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.crops.jitter_p),
                T.RandomGrayscale(p=cfg.crops.grayscale_p),
                T.ToTensor(),
                T.Normalize(cfg.crops.mean, cfg.crops.std),
            ])
            self.trans += [t] * count

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i, 0].numpy(), mode="L").convert("RGB")
        return [t(img) for t in self.trans]


def bench_tiny_baseline(steps: int) -> dict:
    """A typical SwAV loop: per-image PIL crops, 2 workers, each crop through the trunk separately."""
    from openseer.config import build_config
    from openseer.data.collection import load_fashion_mnist
    from openseer.model.swav import SwAVLoss, build_swav
    from openseer.train.optim import build_optimizer

    cfg = build_config("tiny-cpu", ["model.channels_last=false"])
    images, _ = load_fashion_mnist("train")
    loader = torch.utils.data.DataLoader(_PILCrops(images, cfg), batch_size=cfg.data.batch_size, shuffle=True,
                                         num_workers=2, drop_last=True)
    torch.manual_seed(0)
    model = build_swav(cfg)
    opt = build_optimizer(model, cfg)
    loss_fn = SwAVLoss(cfg.n_crops, cfg.swav.crops_for_assign, cfg.swav.temperature, cfg.swav.epsilon,
                       cfg.swav.sinkhorn_iters)
    for g in opt.param_groups:
        g["lr"] = 0.1
    t = {"data": 0.0, "forward": 0.0, "sinkhorn": 0.0, "backward": 0.0, "optimizer": 0.0}
    it = iter(loader)
    warm = 2
    for step in range(steps + warm):
        if step == warm:
            t = dict.fromkeys(t, 0.0)
            start = time.perf_counter()
        t0 = time.perf_counter()
        crops = next(it)
        t1 = time.perf_counter()
        model.prototypes.normalize_()
        feats = torch.cat([model.backbone(c) for c in crops])  # one trunk pass per crop
        z = torch.nn.functional.normalize(model.head(feats), dim=1)
        scores = model.prototypes(z)
        t2 = time.perf_counter()
        targets = loss_fn.targets(z, scores, model.prototypes.weight, step)
        t3 = time.perf_counter()
        loss = loss_fn(scores, targets)
        opt.zero_grad()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        for k, a, b in (("data", t0, t1), ("forward", t1, t2), ("sinkhorn", t2, t3), ("backward", t3, t4),
                        ("optimizer", t4, t5)):
            t[k] += b - a
    wall = time.perf_counter() - start
    crops = [torch.randn(cfg.data.batch_size, 3, s, s) for s, n in zip(cfg.crops.sizes, cfg.crops.counts)
             for _ in range(n)]
    flops = count_flops(model, crops)
    flops_torch = count_flops(model, crops, torch_formula=True)
    split = {k: round(v / steps, 4) for k, v in t.items()}
    return {"config": "tiny-baseline", "arch": cfg.model.arch, "batch": cfg.data.batch_size,
            "imgs_per_s": round(cfg.data.batch_size * steps / wall, 1), "step_s": round(wall / steps, 4),
            "split_s": split, "flops_per_step": flops, "flops_per_step_torch_formula": flops_torch,
            "model_flops_per_s": flops / (split["forward"] + split["backward"]),
            "precision": "fp32", "channels_last": False}


BIG_CONFIGS = {"rg32": "regnety_320", "rg128": "regnety_1280"}  # config name -> SEER architecture


def bench_big(arch: str, steps: int, batch: int, bf16: bool, channels_last: bool, device: str = "cpu",
              compile: bool | str = False, ceiling: bool = False) -> dict:
    """Model step of a SEER RegNetY at 2x160 + 4x96 with synthetic images (``device``: cpu or cuda;
    ``compile``: torch.compile the backbone, as model.compile=true does (a string: with that
    ``mode``, e.g. max-autotune-no-cudagraphs); its build is not timed;
    ``ceiling``: also time each convolution / linear layer alone, see ``kernel_ceiling``)."""
    from openseer.config import build_config
    from openseer.model.swav import SwAVLoss, build_swav
    from openseer.train.optim import build_optimizer

    cfg = build_config("seer-rg32", [f"model.arch={arch}", f"model.channels_last={str(channels_last).lower()}",
                                     "model.head_hidden=[2048]", "swav.n_prototypes=3000"])
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as the training loop does on CUDA (fixed crop sizes)
        torch.cuda.reset_peak_memory_stats()
    model = build_swav(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    for g in opt.param_groups:
        g["lr"] = 0.1
    loss_fn = SwAVLoss(cfg.n_crops, [0, 1], 0.1, 0.05, 3)
    crops = [torch.randn(batch, 3, s, s, device=device) for s, n in zip(cfg.crops.sizes, cfg.crops.counts)
             for _ in range(n)]
    if channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    amp = torch.bfloat16 if bf16 else None
    flops = count_flops(model, crops, amp)  # eager, before compiling
    flops_torch = count_flops(model, crops, amp, torch_formula=True)
    layers = kernel_ceiling(model, crops, amp) if ceiling else None
    if compile:
        model.backbone.compile(dynamic=False, **({"mode": compile} if isinstance(compile, str) else {}))
    warmup = 2 if compile else 1  # the first step builds the graphs (one per crop resolution)
    times, opt_times = [], []
    for step in range(steps + warmup):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            z, scores = model(crops)
        loss = loss_fn(scores, loss_fn.targets(z, scores, model.prototypes.weight, step))
        opt.zero_grad()
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        if step >= warmup:
            times.append(t1 - t0)
            opt_times.append(time.perf_counter() - t1)
    model_s = sum(times) / len(times)
    opt_s = sum(opt_times) / len(opt_times)
    name = next((k for k, a in BIG_CONFIGS.items() if a == arch), arch)
    return {"config": name, "arch": arch, "batch": batch, "device": device, "compile": compile,
            "imgs_per_s": round(batch / model_s, 2), "model_s": round(model_s, 4), "optimizer_s": round(opt_s, 4),
            "imgs_per_s_with_optimizer": round(batch / (model_s + opt_s), 2), "flops_per_step": flops,
            "flops_per_step_torch_formula": flops_torch,
            "model_flops_per_s": flops / model_s, "precision": "bf16" if bf16 else "fp32",
            "channels_last": channels_last,
            **({"layers": layers} if layers else {}),
            **({"gpu_peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)} if device == "cuda" else {})}


def kernel_ceiling(model: torch.nn.Module, crops: list[torch.Tensor], amp_dtype, reps: int = 3) -> dict:
    """The step's best case with these kernels: every convolution and linear layer of one forward +
    backward, timed alone (its own module, bf16 weights and inputs of the shapes the step gives it, hot
    caches), summed; everything else (norms, activations, casts, the loss) counted as free.

    Layers that compute in fp32 under autocast (``NarrowGroupConv2d``) are timed in fp32.
    ``util_ceiling`` = the layers' FLOPs over that summed time, over nothing else: a utilisation the
    whole step cannot exceed unless the kernels themselves get faster. Rows are grouped by kind
    (grouped 3x3, 1x1, other convolutions, linear) with each kind's time and FLOP rate.
    """
    import copy

    from openseer.model.backbone import NarrowGroupConv2d

    device = crops[0].device.type
    seen: dict[tuple, dict] = {}  # identical layers on identical inputs are timed once

    def hook(mod, args, out):
        x = args[0]
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        sig = ((type(mod).__name__, mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                mod.groups, mod.bias is not None) if isinstance(mod, torch.nn.Conv2d)
               else ("Linear", mod.in_features, mod.out_features, mod.bias is not None))
        e = seen.setdefault((sig, tuple(x.shape), x.requires_grad, cl),
                            {"mod": mod, "shape": tuple(x.shape), "grad_in": x.requires_grad, "cl": cl, "n": 0})
        e["n"] += 1

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(crops)
        scores = out[1] if isinstance(out, tuple) else out  # the SwAV model gives (z, scores)
        scores.float().logsumexp(1).mean().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    dtype = amp_dtype or torch.float32
    rows = {}
    for e in seen.values():
        # each layer in the precision it computes in: narrow-group convs in fp32 under autocast
        compute = torch.float32 if isinstance(e["mod"], NarrowGroupConv2d) else dtype
        m = copy.deepcopy(e["mod"]).to(compute)
        x = torch.randn(e["shape"], device=crops[0].device, dtype=compute)
        if e["cl"]:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(e["grad_in"])
        y = m(x)
        g = torch.randn_like(y)

        def fwd_bwd(m=m, x=x, g=g):
            m(x).backward(g)
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            fwd_bwd()
        flops = counter.get_total_flops()
        fwd_bwd()
        _sync(device)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fwd_bwd()
            _sync(device)
            best = min(best, time.perf_counter() - t)
        if isinstance(m, torch.nn.Linear):
            kind = "linear"
        elif m.kernel_size == (1, 1):
            kind = "conv 1x1"
        elif m.groups > 1:
            kind = "conv grouped"
        else:
            kind = "conv other"
        r = rows.setdefault(kind, {"calls": 0, "s": 0.0, "flops": 0})
        r["calls"] += e["n"]
        r["s"] += best * e["n"]
        r["flops"] += flops * e["n"]
    total_s = sum(r["s"] for r in rows.values())
    total_flops = sum(r["flops"] for r in rows.values())
    return {"layers_s": round(total_s, 4), "layers_flops": total_flops,
            "layers_flops_per_s": total_flops / total_s,
            "by_kind": {k: {"calls": r["calls"], "s": round(r["s"], 4), "flops_per_s": r["flops"] / r["s"]}
                        for k, r in sorted(rows.items())}}


def _timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _larc_loop_step(params: list[torch.Tensor], bufs: list, lr: float, wd: float, trust: float,
                    momentum: float) -> None:
    """LARC + SGD one tensor at a time, the way the original SwAV code does it (reference)."""
    with torch.no_grad():
        for i, p in enumerate(params):
            g = p.grad
            w_norm, g_norm = p.norm(), g.norm()
            scale = trust * w_norm / (g_norm + wd * w_norm + 1e-8) if w_norm > 0 and g_norm > 0 else 1.0
            d = (g + wd * p) * scale
            bufs[i] = d if bufs[i] is None else bufs[i].mul_(momentum).add_(d)
            p.add_(bufs[i], alpha=-lr)


def bench_model_levers(smoke: bool) -> list[dict]:
    """Micro-benchmarks of the levers that live inside one step (fixed batch, tiny-cpu model)."""
    from openseer.config import build_config
    from openseer.model.swav import build_swav, sinkhorn
    from openseer.train.optim import build_optimizer

    cfg = build_config("tiny-cpu")
    b = 64 if smoke else cfg.data.batch_size
    reps = 1 if smoke else 5
    torch.manual_seed(0)
    model = build_swav(cfg).to(memory_format=torch.channels_last)
    crops = [torch.randn(b, 3, s, s) for s, n in zip(cfg.crops.sizes, cfg.crops.counts) for _ in range(n)]

    def grouped():
        model(crops)[1].logsumexp(1).mean().backward()

    def per_crop():
        feats = torch.cat([model.backbone(c.contiguous(memory_format=torch.channels_last)) for c in crops])
        model.prototypes(torch.nn.functional.normalize(model.head(feats), dim=1)).logsumexp(1).mean().backward()

    rows = [{"lever": "one trunk pass per resolution group", "on_s": _timed(grouped, reps),
             "off_s": _timed(per_crop, reps), "off": "one trunk pass per crop"}]

    opt = build_optimizer(model, cfg)
    for g in opt.param_groups:
        g["lr"] = 0.1
    params = [p for p in model.parameters() if p.grad is not None]
    bufs: list = [None] * len(params)
    o = cfg.optim
    rows.append({"lever": "foreach SGD + LARC (one fused pass)", "on_s": _timed(opt.step, reps * 4),
                 "off_s": _timed(lambda: _larc_loop_step(params, bufs, 0.1, o.weight_decay, o.lars_trust,
                                                         o.momentum), reps * 4),
                 "off": "per-parameter loop", "n_tensors": len(params)})
    for k, batch in ((16000, 512), (16000, 4096)):
        scores = torch.randn(batch, k).clamp_(-1, 1)
        rows.append({"lever": f"Sinkhorn K={k}, {batch} rows, 3 iterations, fp32 (log domain)",
                     "on_s": _timed(lambda s=scores: sinkhorn(s, 0.05, 3), reps)})
    for r in rows:
        r["config"] = "lever"
        for key in ("on_s", "off_s"):
            if key in r:
                r[key] = round(r[key], 5)
        if "off_s" in r:
            r["speedup"] = round(r["off_s"] / r["on_s"], 2)
    return rows


# (lever, the overrides that switch it OFF, or ON for the ones off by default)
LOOP_LEVERS = [
    ("channels_last (off)", ["model.channels_last=false"]),
    ("1x1 convolutions with a matmul backward (off)", ["model.pointwise_matmul=false"]),
    ("grouped convolutions of < 16 channels per group in fp32 under bf16 (off)", ["model.narrow_group_fp32=false"]),
    ("bf16 autocast (off; the recipe's auto turns it on where the CPU has AVX512-BF16 or AMX)", ["optim.precision=fp32"]),
    ("torch.compile (off; auto turns it on where a C++ compiler is found)", ["model.compile=false"]),
    ("bf16 autocast and torch.compile (both off)", ["optim.precision=fp32", "model.compile=false"]),
    ("batched uint8 augmentation (off: per-image crops, 2 workers)", ["data.batched_aug=false", "data.num_workers=2"]),
    ("batched uint8 augmentation (off: per-image crops, 1 worker)", ["data.batched_aug=false", "data.num_workers=1"]),
    ("batched uint8 augmentation (off: per-image crops, in process)", ["data.batched_aug=false", "data.num_workers=0"]),
]


# smoke mode (the test suite): small and without torch.compile, whose first build of the tiny model
# takes one to two minutes on a fresh 2-core machine (cached on disk afterwards)
SMOKE = ["data.limit=2048", "data.batch_size=64", "model.compile=false"]
PRETRAIN_SMOKE = ["data.batch_size=16", "model.compile=false", "model.arch=test_resnet", "crops.sizes=[32,16]",
                  "data.num_workers=1", "model.head_hidden=[64]", "swav.n_prototypes=30"]


def bench_loop_levers(steps: int, smoke: bool) -> list[dict]:
    """The tiny step with every lever on, then with each switched alone."""
    extra = SMOKE if smoke else []
    levers = LOOP_LEVERS[:1] if smoke else LOOP_LEVERS
    base = bench_tiny(steps, extra)
    rows = [{"config": "lever", "lever": "all levers (the tiny-cpu recipe)", "imgs_per_s": base["imgs_per_s"],
             "split_s": base["split_s"]}]
    for name, overrides in levers:
        r = bench_tiny(steps, extra + overrides)
        rows.append({"config": "lever", "lever": name, "overrides": overrides, "imgs_per_s": r["imgs_per_s"],
                     "split_s": r["split_s"], "vs_recipe": round(r["imgs_per_s"] / base["imgs_per_s"], 3)})
    return rows


def main() -> None:
    from openseer.train.hardware import native_bf16

    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,tiny-baseline,rg32")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--big-steps", type=int, default=3)
    ap.add_argument("--big-batch", default=None,
                    help="batch size of the big configs (default 4; 1 with --smoke); a comma list runs each")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the big configs (rg32, rg128) and the matmul peaks run; tiny ones run on CPU")
    ap.add_argument("--big-compile", action="store_true", help="torch.compile the big configs' backbone")
    ap.add_argument("--big-compile-mode", default=None,
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="compile the big configs with this torch.compile mode (implies --big-compile)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also time every convolution / linear layer of the tiny and big configs alone: the "
                         "utilisation the step cannot exceed with these kernels (layers.util_*_ceiling)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything (for the test suite)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for the tiny config")
    args = ap.parse_args()
    big_compile = args.big_compile_mode or args.big_compile  # a mode (str) implies compiling
    if args.smoke:
        args.steps, args.big_steps = 4, 1
    args.big_batch = args.big_batch or ("1" if args.smoke else "4")
    n = 512 if args.smoke else (8192 if args.device == "cuda" else 2048)
    timed_alone = {"swav", "pretrain", "levers"}  # report their own numbers: no matmul peaks needed
    need_peaks = any(name not in timed_alone for name in args.configs.split(","))
    peaks = {"fp32": matmul_peak(torch.float32, n, device=args.device),
             "bf16": matmul_peak(torch.bfloat16, n, device=args.device)} if need_peaks else {}
    results = []
    runs = [(name, int(b)) for name in args.configs.split(",")
            for b in (args.big_batch.split(",") if name in BIG_CONFIGS else [0])]
    for name, batch in runs:
        if name == "levers":
            for r in bench_loop_levers(args.steps, args.smoke) + bench_model_levers(args.smoke):
                r["bench"] = "train_step"
                print(json.dumps(r), flush=True)
            continue
        if name == "swav":
            r = bench_swav_part(args.smoke)
            r["bench"] = "train_step"
            print(json.dumps(r), flush=True)
            continue
        if name == "pretrain":
            r = bench_pretrain(args.steps, args.device, args.overrides + (PRETRAIN_SMOKE if args.smoke else []),
                               n_images=64 if args.smoke else 1024)
            r["bench"] = "train_step"
            print(json.dumps(r), flush=True)
            continue
        if name == "tiny":
            r = bench_tiny(args.steps, args.overrides + (SMOKE if args.smoke else []), ceiling=args.ceiling)
        elif name == "tiny-baseline":
            r = bench_tiny_baseline(args.steps)
        elif name in BIG_CONFIGS:
            try:
                r = bench_big(BIG_CONFIGS[name] if not args.smoke else "regnety_002", args.big_steps, batch,
                              bf16=True, channels_last=True, device=args.device, compile=big_compile, ceiling=args.ceiling)
            except torch.OutOfMemoryError as e:  # one batch too large for the device: say so, go on
                print(json.dumps({"bench": "train_step", "config": name, "batch": batch,
                                  "error": f"out of memory: {str(e).splitlines()[0]}"}), flush=True)
                continue
            finally:
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        else:
            raise SystemExit(f"unknown config {name!r}")
        r["bench"] = "train_step"
        r["peak_fp32_flops"] = peaks["fp32"]
        r["peak_bf16_flops"] = peaks["bf16"]
        r["util_fp32"] = round(r["model_flops_per_s"] / peaks["fp32"], 3)
        r["util_bf16"] = round(r["model_flops_per_s"] / peaks["bf16"], 3)
        torch_rate = r["model_flops_per_s"] * r["flops_per_step_torch_formula"] / r["flops_per_step"]
        r["util_torch_formula"] = {"fp32": round(torch_rate / peaks["fp32"], 3),
                                   "bf16": round(torch_rate / peaks["bf16"], 3)}
        if "layers" in r:
            r["layers"]["share_of_step"] = round(r["layers"]["layers_s"] * r["model_flops_per_s"] / r["flops_per_step"], 3)
            r["layers"]["util_bf16_ceiling"] = round(r["layers"]["layers_flops_per_s"] / peaks["bf16"], 3)
            r["layers"]["util_fp32_ceiling"] = round(r["layers"]["layers_flops_per_s"] / peaks["fp32"], 3)
            for k in r["layers"]["by_kind"].values():
                k["util_bf16"] = round(k["flops_per_s"] / peaks["bf16"], 3)
        r["threads"] = torch.get_num_threads()
        r["machine"] = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
        r["cpu_bf16"] = native_bf16(torch.device("cpu"))[1]  # AMX multiplies the bf16 peak several-fold
        if args.device == "cuda":
            r["gpu"] = torch.cuda.get_device_name()
        results.append(r)
        print(json.dumps(r), flush=True)
    by = {r["config"]: r for r in results}
    if "tiny" in by and "tiny-baseline" in by:
        print(json.dumps({"bench": "train_step", "speedup_tiny_vs_baseline":
                          round(by["tiny"]["imgs_per_s"] / by["tiny-baseline"]["imgs_per_s"], 2)}))


if __name__ == "__main__":
    main()
