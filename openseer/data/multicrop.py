"""SwAV/SEER multi-crop (the SwAV paper, Caron et al. 2020, section 3.2): a few large crops and several
small ones per image.

Three implementations of the same distribution; which one runs is set by the data and two config
switches, and each is a pure function of its seed, so a given (seed, step) always gives the same crops:

* ``BatchMultiCrop``: in-memory uint8 tensors (Fashion-MNIST) with ``data.batched_aug`` (the
  default). The random draws are made for a whole batch at once (crop boxes sampled as torchvision
  does, resampled with ``roi_align``), which removes the per-image Python cost that dominates tiny
  images on a CPU. Seeded per (seed, step, rank) (data/batches.py).
* ``FastMultiCrop``: decoded files and tar-shard samples with ``data.fast_decode`` (the default).
  The image is decoded at a reduced size (``decode.reduced_decode_pixels``) and each crop box is
  resampled straight from the PIL image; the colour ops run on the small crop. Seeded per image.
* ``MultiCrop``: torchvision transforms v2 per image, the reference path: files and shards with
  ``data.fast_decode=false``, and in-memory tensors with ``data.batched_aug=false``. Seeded through
  the global RNG per image.

Each does random resized crop, flip, colour jitter (0.8s, 0.8s, 0.8s, 0.2s) with probability p,
random grayscale, Gaussian blur and ImageNet-style normalisation.

Grayscale input is handled deliberately: with ``channels`` 3 (``model.in_chans``, the default) it
is replicated to three channels so every backbone, export and SEER checkpoint sees RGB; saturation,
hue and random grayscale are then no-ops on it. With ``channels`` 1 (a backbone with a one-channel
stem: scans, DICOM) the crops are (1, S, S): a full-depth grey image (PIL ``F`` in [0, 1], see
data/decode.py) is cropped in float32, never through 8 bits, and a uint8 one is scaled by 1/255;
brightness, contrast and blur apply, saturation, hue and grayscale are no-ops (their random draws
are still made, so the streams of the other ops do not shift), and the mean/std are one value
(``crops.mean``/``crops.std`` of length 1, or the average of the three RGB values: ``channel_stats``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from ..config import CropsConfig, channel_stats


def blur_kernel_size(crop_size: int, sigma_max: float) -> int:
    """Odd kernel wide enough for +-3 sigma, never wider than the crop."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    k = min(k, crop_size if crop_size % 2 == 1 else crop_size - 1)
    return max(k, 3)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luminance of (..., 3, H, W); a one-channel image is its own."""
    return x if x.shape[-3] == 1 else (0.299 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :])


def crop_plan(cfg: CropsConfig) -> list[tuple[int, float, float]]:
    """One (size, min_scale, max_scale) per crop, in crop order (large groups first)."""
    plan = []
    for size, count, lo, hi in zip(cfg.sizes, cfg.counts, cfg.min_scale, cfg.max_scale):
        plan += [(size, lo, hi)] * count
    return plan


class MultiCrop:
    """Per-image multi-crop with torchvision transforms v2; input: PIL image or uint8 CHW tensor."""

    def __init__(self, cfg: CropsConfig, channels: int = 3):
        self.cfg, self.channels = cfg, channels
        s = cfg.jitter_strength
        self.transforms = []
        for size, lo, hi in crop_plan(cfg):
            self.transforms.append(
                v2.Compose(
                    [
                        v2.RandomResizedCrop(size, scale=(lo, hi), antialias=True),
                        v2.RandomHorizontalFlip(cfg.flip_p),
                        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.jitter_p),
                        v2.RandomGrayscale(cfg.grayscale_p),
                        v2.RandomApply(
                            [v2.GaussianBlur(blur_kernel_size(size, cfg.blur_sigma[1]), sigma=tuple(cfg.blur_sigma))],
                            p=cfg.blur_p,
                        ),
                        v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(channel_stats(cfg.mean, channels), channel_stats(cfg.std, channels)),
                    ]
                )
            )
        self.to_tensor = v2.PILToTensor()

    def __call__(self, image) -> list[torch.Tensor]:
        if not isinstance(image, torch.Tensor):
            image = self.to_tensor(image)  # PIL F (full-depth grey) -> float32 (1, H, W) in [0, 1]
        if self.channels == 1:
            image = image.float().div(255) if not image.is_floating_point() else image
            image = _grey(image) if image.shape[0] == 3 else image
        elif image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return [t(image) for t in self.transforms]


# ---------------------------------------------------------------- batched version


def sample_crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], gen: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10,
) -> torch.Tensor:
    """Boxes (n, 4) as x1, y1, x2, y2 drawn exactly as ``RandomResizedCrop.get_params`` draws them."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=gen)
    aspect = torch.exp(torch.empty(n, tries).uniform_(log_r[0], log_r[1], generator=gen))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    idx = first.clamp(min=0)
    w = w.gather(1, idx[:, None]).squeeze(1)
    h = h.gather(1, idx[:, None]).squeeze(1)
    u = torch.rand(n, 2, generator=gen)
    y = torch.floor(u[:, 0] * (height - h + 1))
    x = torch.floor(u[:, 1] * (width - w + 1))
    # torchvision's fallback: a centre crop with the ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    bad = first < 0
    w = torch.where(bad, torch.full_like(w, fw), w)
    h = torch.where(bad, torch.full_like(h, fh), h)
    x = torch.where(bad, torch.full_like(x, (width - fw) // 2), x)
    y = torch.where(bad, torch.full_like(y, (height - fh) // 2), y)
    return torch.stack([x, y, x + w, y + h], dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """f * a + (1 - f) * b, per sample, clamped to [0, 1] as torchvision does."""
    return (f[:, None, None, None] * a + (1 - f[:, None, None, None]) * b).clamp_(0, 1)


class BatchMultiCrop:
    """Batched multi-crop for uint8 (B, C, H, W) tensors; same distributions as ``MultiCrop``.

    Each image gets its own crop box, flip, jitter factors, jitter order (one order per crop and
    batch, uniformly drawn, so each image's order is still uniform), grayscale and blur draws.
    """

    def __init__(self, cfg: CropsConfig, channels: int = 3):
        self.cfg, self.channels = cfg, channels
        self.plan = crop_plan(cfg)
        self.mean = torch.tensor(channel_stats(cfg.mean, channels)).view(1, channels, 1, 1)
        self.std = torch.tensor(channel_stats(cfg.std, channels)).view(1, channels, 1, 1)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        x = images.float() if images.is_floating_point() else images.float().div_(255)
        if self.channels == 1:
            x = _grey(x)
        elif x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.contiguous()
        gray_input = bool(images.shape[1] == 1 or self.channels == 1)
        n, _, height, width = x.shape
        batch_index = torch.arange(n, dtype=torch.float32)[:, None]
        crops = []
        for size, lo, hi in self.plan:
            boxes = sample_crop_boxes(n, height, width, (lo, hi), gen)
            # sampling_ratio=0: ceil(box / size) bilinear samples per output pixel, i.e. plain bilinear
            # when upsampling (as torchvision's resize) and a box filter when downsampling (antialias)
            crop = roi_align(x, torch.cat([batch_index, boxes], 1), output_size=size, spatial_scale=1.0,
                             sampling_ratio=0, aligned=True)
            crops.append(self._colour(crop, gen, gray_input))
        return crops

    def _colour(self, x: torch.Tensor, gen: torch.Generator, gray_input: bool) -> torch.Tensor:
        cfg, n = self.cfg, x.shape[0]
        flip = torch.rand(n, generator=gen) < cfg.flip_p
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        s = cfg.jitter_strength
        b, c, sat, hue = 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s
        jitter = torch.rand(n, generator=gen) < cfg.jitter_p
        fb = torch.empty(n).uniform_(max(0.0, 1 - b), 1 + b, generator=gen)
        fc = torch.empty(n).uniform_(max(0.0, 1 - c), 1 + c, generator=gen)
        fs = torch.empty(n).uniform_(max(0.0, 1 - sat), 1 + sat, generator=gen)
        fh = torch.empty(n).uniform_(-hue, hue, generator=gen)
        one = torch.ones(n)
        fb, fc, fs = (torch.where(jitter, f, one) for f in (fb, fc, fs))
        fh = torch.where(jitter, fh, torch.zeros(n))
        for op in torch.randperm(4, generator=gen).tolist():
            if op == 0 and b > 0:
                x = (x * fb[:, None, None, None]).clamp_(0, 1)
            elif op == 1 and c > 0:
                m = _grey(x).mean(dim=(1, 2, 3))
                x = _blend(x, m[:, None, None, None].expand_as(x), fc)
            elif op == 2 and sat > 0 and not gray_input:
                x = _blend(x, _gray(x).expand_as(x), fs)
            elif op == 3 and hue > 0 and not gray_input:
                hsv = _rgb_to_hsv(x)
                h = (hsv[:, 0] + fh[:, None, None]) % 1.0
                x = _hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1))
        if cfg.grayscale_p > 0 and not gray_input:
            g = torch.rand(n, generator=gen) < cfg.grayscale_p
            x = torch.where(g[:, None, None, None], _gray(x).expand_as(x), x)
        if cfg.blur_p > 0:
            x = self._blur(x, gen)
        return ((x - self.mean) / self.std).contiguous()

    def _blur(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, ch, height, width = x.shape
        apply = torch.rand(n, generator=gen) < self.cfg.blur_p
        sigma = torch.empty(n).uniform_(self.cfg.blur_sigma[0], self.cfg.blur_sigma[1], generator=gen)
        k = blur_kernel_size(height, self.cfg.blur_sigma[1])
        r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
        kern = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
        kern = kern / kern.sum(1, keepdim=True)  # (n, k)
        kern = kern.repeat_interleave(ch, 0)  # (n*ch, k)
        flat = F.pad(x.reshape(1, n * ch, height, width), (k // 2,) * 4, mode="reflect")
        out = F.conv2d(flat, kern[:, None, None, :], groups=n * ch)
        out = F.conv2d(out, kern[:, None, :, None], groups=n * ch).view(n, ch, height, width)
        return torch.where(apply[:, None, None, None], out, x)


# ---------------------------------------------------------------- decoded images, fast path


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the HSV hue of float RGB in [0, 1] (..., 3, H, W) by ``shift`` turns.

    Same result as torchvision's ``adjust_hue`` (HSV round trip) in a few fused tensor ops: the
    max and min channel stay, the hue moves (the standard closed-form HSV -> RGB).
    """
    maxc, argmax = x.max(dim=-3)
    minc = x.min(dim=-3).values
    c = maxc - minc
    r, g, b = x.unbind(-3)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(argmax == 0, ((g - b) / safe) % 6,
                    torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    h = (h + 6 * shift) % 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h + n) % 6
        out.append(maxc - c * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=-3)


class FastMultiCrop:
    """Multi-crop of one decoded PIL RGB image: the distribution of ``MultiCrop``, less work.

    Each crop box is drawn as ``RandomResizedCrop`` draws it (scales relative to the whole image)
    and resampled straight from the decoded image with PIL's antialiased bilinear ``resize(box=)``
    (no full-image tensor copy); flip, colour jitter (factors and a random order per crop), random
    grayscale, Gaussian blur (sigma drawn per crop) and normalisation then run on the small crop.
    All randomness comes from the generator passed in, so a crop set is a function of its seed.
    """

    def __init__(self, cfg: CropsConfig, channels: int = 3):
        self.cfg, self.channels = cfg, channels
        self.groups = [(size, count, (lo, hi)) for size, count, lo, hi in
                       zip(cfg.sizes, cfg.counts, cfg.min_scale, cfg.max_scale)]
        self.mean = torch.tensor(channel_stats(cfg.mean, channels)).view(channels, 1, 1)
        self.std = torch.tensor(channel_stats(cfg.std, channels)).view(channels, 1, 1)
        s = cfg.jitter_strength
        self.jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self._kernels: dict[int, int] = {size: blur_kernel_size(size, cfg.blur_sigma[1]) for size in cfg.sizes}

    def __call__(self, image, gen: torch.Generator) -> list[torch.Tensor]:
        from PIL import Image

        if isinstance(image, torch.Tensor):  # uint8 CHW (in-memory sources), or float (1, H, W) in [0, 1]
            if image.is_floating_point():
                image = Image.fromarray(_grey(image.float())[0].contiguous().numpy(), mode="F")
            else:
                arr = image.expand(3, -1, -1) if image.shape[0] == 1 else image
                image = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())
        if self.channels == 1 and image.mode not in ("F", "L"):
            image = image.convert("L")
        elif self.channels == 3 and image.mode == "F":  # full-depth grey to an RGB backbone: 8-bit RGB
            image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
        deep = image.mode == "F"
        width, height = image.size
        out = []
        for size, count, scale in self.groups:
            boxes = sample_crop_boxes(count, height, width, scale, gen).tolist()
            for x1, y1, x2, y2 in boxes:
                crop = image.resize((size, size), Image.BILINEAR, box=(x1, y1, x2, y2), reducing_gap=3.0)
                a = np.asarray(crop, dtype=np.float32)
                x = torch.from_numpy(a[None].copy() if a.ndim == 2 else a.copy())
                x = x if a.ndim == 2 else x.permute(2, 0, 1)
                x = x if deep else x.div_(255)
                out.append(self._colour(x, gen))
        return out

    def _colour(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        draws = torch.rand(4, generator=gen).tolist()  # flip, jitter, grayscale, blur
        if draws[0] < cfg.flip_p:
            x = x.flip(-1)
        if draws[1] < cfg.jitter_p:
            b, c, s, h = self.jitter
            f = torch.rand(4, generator=gen).tolist()
            fb = max(0.0, 1 - b) + f[0] * (1 + b - max(0.0, 1 - b))
            fc = max(0.0, 1 - c) + f[1] * (1 + c - max(0.0, 1 - c))
            fs = max(0.0, 1 - s) + f[2] * (1 + s - max(0.0, 1 - s))
            fh = -h + f[3] * 2 * h
            for op in torch.randperm(4, generator=gen).tolist():
                if op == 0 and b > 0:
                    x = (x * fb).clamp_(0, 1)
                elif op == 1 and c > 0:
                    m = _grey(x).mean()
                    x = (fc * x + (1 - fc) * m).clamp_(0, 1)
                elif op == 2 and s > 0 and x.shape[0] == 3:
                    x = (fs * x + (1 - fs) * _gray(x[None])[0]).clamp_(0, 1)
                elif op == 3 and h > 0 and x.shape[0] == 3:
                    x = adjust_hue(x, fh)
        if draws[2] < cfg.grayscale_p and x.shape[0] == 3:
            x = _gray(x[None])[0].expand(3, -1, -1)
        if cfg.blur_p > 0 and draws[3] < cfg.blur_p:
            lo, hi = cfg.blur_sigma
            sigma = lo + float(torch.rand(1, generator=gen)) * (hi - lo)
            # +-3 sigma of this crop's sigma (at most the configured kernel): same blur, less work
            k = min(self._kernels[x.shape[-1]], 2 * math.ceil(3 * sigma) + 1)
            x = _blur_one(x, sigma, max(k, 3))
        return ((x - self.mean) / self.std).contiguous()


def _blur_one(x: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
    """Separable Gaussian blur of one (3, H, W) image with reflect padding, the same numbers as
    torchvision's ``gaussian_blur``, as k shifted multiply-adds per axis (fast on a CPU)."""
    r = k // 2
    offsets = torch.arange(-r, r + 1, dtype=torch.float32)
    w = torch.exp(-0.5 * (offsets / sigma) ** 2)
    w = (w / w.sum()).tolist()
    height, width = x.shape[-2:]
    p = F.pad(x[None], (r, r, r, r), mode="reflect")[0]
    y = p[:, :, 0:width] * w[0]
    for i in range(1, k):
        y.add_(p[:, :, i:i + width], alpha=w[i])
    z = y[:, 0:height] * w[0]
    for i in range(1, k):
        z.add_(y[:, i:i + height], alpha=w[i])
    return z
