"""SwAV from openseer's parts on one page: the map to read before the production loop.

A tiny RegNet backbone + projection head + prototypes (``build_swav``), multi-crop on an in-memory
uint8 batch (``BatchMultiCrop``), Sinkhorn targets and the swapped-prediction loss (``SwAVLoss``),
and SGD wrapped in LARC (``build_optimizer``) with SEER's warmup + cosine LR (``lr_at``). The data
are random shapes on a dark background (no download). ``openseer pretrain`` runs the same pieces with
checkpoints, resume, time budgets, several processes and metrics: docs/architecture.md.

    python examples/swav_minimal.py [--steps 20]
"""

import argparse

import torch

from openseer.config import build_config
from openseer.data.multicrop import BatchMultiCrop
from openseer.model.swav import SwAVLoss, build_swav
from openseer.train.optim import build_optimizer, lr_at, peak_lr


def toy_images(n: int, gen: torch.Generator) -> torch.Tensor:
    """n uint8 grayscale 28 x 28 images, each one bright rectangle at a random place and size."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    for img, (y, x, h, w) in zip(images, torch.randint(2, 14, (n, 4), generator=gen).tolist()):
        img[:, y:y + h, x:x + w] = 255
    return images


def main(steps: int) -> list[float]:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    # tiny-cpu's settings (2x24 + 4x12 crops, 30 prototypes), smaller batch and plain fp32 eager
    cfg = build_config("tiny-cpu", ["data.batch_size=32", "optim.precision=fp32", "model.compile=false",
                                    "swav.freeze_prototypes_steps=5", "optim.warmup_steps=5"])
    model = build_swav(cfg)  # backbone -> head -> L2-normalise -> prototypes
    crop = BatchMultiCrop(cfg.crops)  # 2 global + 4 local crops per image
    loss_fn = SwAVLoss(cfg.n_crops, cfg.swav.crops_for_assign, cfg.swav.temperature, cfg.swav.epsilon,
                       cfg.swav.sinkhorn_iters)
    optimizer = build_optimizer(model, cfg)  # SGD + LARC (weight decay inside LARC)
    peak = peak_lr(cfg.optim.base_lr, cfg.data.batch_size)

    gen = torch.Generator().manual_seed(0)
    data = toy_images(256, gen)
    losses = []
    for step in range(steps):
        batch = data[torch.randint(len(data), (cfg.data.batch_size,), generator=gen)]
        crops = crop(batch, gen)  # list of n_crops tensors, large crops first
        z, scores = model(crops)  # (n_crops * B) x D embeddings, (n_crops * B) x K prototype scores
        targets = loss_fn.targets(z, scores, None, step)  # Sinkhorn codes of the global crops, no grad
        loss = loss_fn(scores, targets)  # each target predicted from every other crop
        optimizer.zero_grad()
        loss.backward()
        if step < cfg.swav.freeze_prototypes_steps:  # SwAV keeps the prototypes fixed at first
            model.prototypes.layer.weight.grad = None
        lr = lr_at(step, steps, peak, cfg.optim.warmup_steps, cfg.optim.warmup_start_ratio,
                   cfg.optim.final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if step >= cfg.swav.freeze_prototypes_steps:
            model.prototypes.normalize_()  # prototypes stay on the unit sphere
        losses.append(float(loss.detach()))
        print(f"step {step:3d}  lr {lr:.3f}  loss {losses[-1]:.4f}")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (ln K = {torch.tensor(float(cfg.swav.n_prototypes)).log():.4f})")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    main(parser.parse_args().steps)
