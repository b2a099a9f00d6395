"""Multi-crop: shapes, value ranges, and the batched version drawing torchvision's distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from openseer.config import build_config
from openseer.data.multicrop import BatchMultiCrop, MultiCrop, crop_plan, sample_crop_boxes


def _crops_cfg(*overrides: str):
    return build_config("tiny-cpu", list(overrides)).crops


def _value_range(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def _check_crops(crops, cfg, batch: int | None):
    plan = crop_plan(cfg)
    assert len(crops) == sum(cfg.counts) == len(plan)
    lo, hi = _value_range(cfg)
    for crop, (size, _, _) in zip(crops, plan):
        expected = (3, size, size) if batch is None else (batch, 3, size, size)
        assert tuple(crop.shape) == expected
        assert crop.dtype == torch.float32
        assert torch.isfinite(crop).all()
        assert (crop >= lo - 1e-4).all() and (crop <= hi + 1e-4).all()
    # normalisation really happened: not the raw [0, 1] range
    assert min(float(c.min()) for c in crops) < -0.05


def test_crop_plan_orders_large_groups_first():
    cfg = _crops_cfg("crops.sizes=[32,16]", "crops.counts=[2,3]", "crops.min_scale=[0.3,0.1]",
                     "crops.max_scale=[1.0,0.3]")
    assert crop_plan(cfg) == [(32, 0.3, 1.0)] * 2 + [(16, 0.1, 0.3)] * 3


@pytest.mark.parametrize("overrides", [[], ["crops.sizes=[48,20]", "crops.counts=[2,3]", "crops.blur_p=0.5",
                                            "crops.mean=[0.485,0.456,0.406]", "crops.std=[0.229,0.224,0.225]"]])
def test_per_image_multicrop_shapes_and_ranges(overrides):
    cfg = _crops_cfg(*overrides)
    mc = MultiCrop(cfg)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    _check_crops(mc(rgb), cfg, None)
    gray = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)  # Fashion-MNIST style
    crops = mc(gray)
    _check_crops(crops, cfg, None)


@pytest.mark.parametrize("overrides", [[], ["crops.sizes=[20,8]", "crops.counts=[2,3]", "crops.blur_p=1.0",
                                            "crops.mean=[0.485,0.456,0.406]", "crops.std=[0.229,0.224,0.225]"]])
@pytest.mark.parametrize("channels", [1, 3])
def test_batched_multicrop_shapes_ranges_and_seeding(overrides, channels):
    cfg = _crops_cfg(*overrides)
    bmc = BatchMultiCrop(cfg)
    images = torch.randint(0, 256, (6, channels, 28, 30), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    a = bmc(images, torch.Generator().manual_seed(5))
    _check_crops(a, cfg, 6)
    b = bmc(images, torch.Generator().manual_seed(5))
    c = bmc(images, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a function of the generator only
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # the two global crops differ
    if channels == 1:
        for crop in a:  # grayscale input stays gray: three equal channels after un-normalising
            std = torch.tensor(cfg.std).view(1, 3, 1, 1)
            mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
            raw = crop * std + mean
            assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5)
            assert torch.allclose(raw[:, 0], raw[:, 2], atol=1e-5)


def _torchvision_boxes(n: int, height: int, width: int, scale, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    img = torch.zeros(1, height, width)
    out = []
    for _ in range(n):
        i, j, h, w = RandomResizedCrop.get_params(img, scale=list(scale), ratio=[3 / 4, 4 / 3])
        out.append([j, i, j + w, i + h])
    return torch.tensor(out, dtype=torch.float32)


def _stats(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    area = w * h / (height * width)
    return {
        "area": area,
        "log_aspect": torch.log(w / h),
        "cx": (boxes[:, 0] + boxes[:, 2]) / 2 / width,
        "cy": (boxes[:, 1] + boxes[:, 3]) / 2 / height,
    }


@pytest.mark.parametrize(("height", "width", "scale"), [(28, 28, (0.3, 1.0)), (28, 28, (0.1, 0.3)),
                                                          (96, 160, (0.14, 1.0)), (224, 224, (0.05, 0.14))])
def test_batched_crop_boxes_match_torchvision_statistics(height, width, scale):
    n = 3000
    ours = sample_crop_boxes(n, height, width, scale, torch.Generator().manual_seed(0))
    theirs = _torchvision_boxes(n, height, width, scale, seed=0)
    # boxes are inside the image and non-empty
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all()
    assert (ours[:, 2] > ours[:, 0]).all() and (ours[:, 3] > ours[:, 1]).all()
    a, b = _stats(ours, height, width), _stats(theirs, height, width)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for key in a:
        spread = float(b[key].std()) + 1e-6
        assert abs(float(a[key].mean() - b[key].mean())) < 0.1 * spread, key
        diff = (torch.quantile(a[key], q) - torch.quantile(b[key], q)).abs()
        assert (diff < 0.15 * spread + 0.02).all(), (key, diff)
    # the area really follows the scale range (within rounding to whole pixels)
    area = a["area"]
    assert float(area.min()) >= scale[0] * 0.8 and float(area.max()) <= min(scale[1] * 1.2, 1.0)


def test_batched_crop_fallback_is_a_centre_crop():
    """No draw fits (scale 1 on a very wide image): torchvision's fallback, a centred crop."""
    boxes = sample_crop_boxes(50, 10, 100, (1.0, 1.0), torch.Generator().manual_seed(0))
    expected = _torchvision_boxes(1, 10, 100, (1.0, 1.0), seed=0)[0]
    assert (boxes == expected).all()


def test_flip_rate_is_one_half_and_per_image():
    cfg = _crops_cfg("crops.sizes=[28]", "crops.counts=[2]", "crops.min_scale=[1.0]", "crops.max_scale=[1.0]",
                     "crops.jitter_p=0.0", "crops.grayscale_p=0.0", "crops.blur_p=0.0",
                     "swav.crops_for_assign=[0,1]")
    ramp = torch.linspace(0, 255, 28).round().to(torch.uint8).view(1, 1, 1, 28).expand(2000, 1, 28, 28)
    crops = BatchMultiCrop(cfg)(ramp.contiguous(), torch.Generator().manual_seed(0))
    for crop in crops:
        flipped = crop[:, 0, :, 0] > crop[:, 0, :, -1]  # the ramp now goes right to left
        rate = flipped.all(dim=1).float().mean()
        assert 0.46 < float(rate) < 0.54
        assert bool((flipped.all(1) | (~flipped).all(1)).all())  # whole images, never half
    # independent between the two crops of the same image
    f0 = crops[0][:, 0, 0, 0] > crops[0][:, 0, 0, -1]
    f1 = crops[1][:, 0, 0, 0] > crops[1][:, 0, 0, -1]
    assert 0.2 < float((f0 & f1).float().mean()) < 0.3


def test_jitter_and_grayscale_change_colour_images_and_are_skipped_when_off():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = _crops_cfg("crops.sizes=[16]", "crops.counts=[2]", "crops.min_scale=[1.0]", "crops.max_scale=[1.0]",
                       "crops.jitter_p=0.0", "crops.grayscale_p=0.0", "crops.blur_p=0.0", "crops.flip_p=0.0")
    out = BatchMultiCrop(plain)(images, torch.Generator().manual_seed(0))[0]
    raw = out * torch.tensor(plain.std).view(1, 3, 1, 1) + torch.tensor(plain.mean).view(1, 3, 1, 1)
    # full-image box, no colour ops: the image comes back (roi_align at the same size only interpolates
    # at pixel centres)
    assert torch.allclose(raw, images.float() / 255, atol=1e-4)
    gray = _crops_cfg("crops.sizes=[16]", "crops.counts=[2]", "crops.min_scale=[1.0]", "crops.max_scale=[1.0]",
                      "crops.jitter_p=0.0", "crops.grayscale_p=1.0", "crops.blur_p=0.0", "crops.flip_p=0.0")
    g = BatchMultiCrop(gray)(images, torch.Generator().manual_seed(0))[0]
    g = g * torch.tensor(gray.std).view(1, 3, 1, 1) + torch.tensor(gray.mean).view(1, 3, 1, 1)
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-5) and torch.allclose(g[:, 1], g[:, 2], atol=1e-5)


def test_batched_resampling_matches_torchvision_resized_crop():
    """Same box -> nearly the same pixels as torchvision's resized_crop (bilinear, antialias)."""
    from torchvision.ops import roi_align
    from torchvision.transforms.v2 import functional as TF

    images = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    n, size = 100, 32  # upsampling crops, as Fashion-MNIST's global crops
    # the exact call BatchMultiCrop makes, through the public class: colour ops off, flip off
    cfg = _crops_cfg("crops.sizes=[32]", "crops.counts=[2]", "crops.min_scale=[0.3]", "crops.max_scale=[1.0]",
                     "crops.jitter_p=0.0", "crops.grayscale_p=0.0", "crops.blur_p=0.0", "crops.flip_p=0.0",
                     "crops.mean=[0,0,0]", "crops.std=[1,1,1]")
    batch = (images.expand(n, -1, -1, -1) * 255).round().to(torch.uint8)
    gen = torch.Generator().manual_seed(1)
    ours = BatchMultiCrop(cfg)(batch, gen)[0]
    boxes = sample_crop_boxes(n, 28, 28, (0.3, 1.0), torch.Generator().manual_seed(1))  # the same draws
    src = batch[0].float() / 255
    ref = torch.stack([TF.resized_crop(src, int(b[1]), int(b[0]), int(b[3] - b[1]), int(b[2] - b[0]),
                                       [size, size], antialias=True) for b in boxes])
    assert float((ours - ref).abs().mean()) < 0.01
    direct = roi_align(src[None].expand(n, -1, -1, -1).contiguous(),
                       torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes], 1),
                       output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    assert torch.allclose(ours, direct, atol=1e-5)
