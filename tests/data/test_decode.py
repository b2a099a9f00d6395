"""Decoding: a corpus of malformed and unusual files (each skipped with its reason or loaded right),
reduced-size decoding that keeps the field of view, and the fast multi-crop's colour operations."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from openseer.data.batches import iterate_batches
from openseer.data.collection import open_collection
from openseer.data.decode import BadImage, decode_bytes, draft_scale, load_image, reduced_decode_pixels
from openseer.data.multicrop import FastMultiCrop, _blur_one, adjust_hue
from tests.conftest import tiny_config
from tests.data.corpus import _enc, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    bad, good = write_corpus(folder)
    return folder, bad, good


def test_corpus_has_at_least_twenty_kinds(corpus):
    _, bad, good = corpus
    assert len(bad) + len(good) >= 30
    assert len(set(bad.values())) >= 8  # every reason is exercised


@pytest.mark.parametrize("min_pixels", [None, 64])
def test_each_bad_file_is_skipped_with_its_reason(corpus, min_pixels):
    folder, bad, _ = corpus
    for name, reason in bad.items():
        with pytest.raises(BadImage) as e:
            load_image(folder / name, min_pixels=min_pixels)
        assert e.value.reason == reason, (name, e.value)


@pytest.mark.parametrize("min_pixels", [None, 64])
def test_each_unusual_file_loads_as_it_should(corpus, min_pixels):
    folder, _, good = corpus
    for name, check in good.items():
        img = load_image(folder / name, min_pixels=min_pixels)
        if min_pixels is None:
            check(img)  # exact sizes and colours at full size
        else:
            assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


def test_folder_batches_skip_every_bad_file_with_its_reason_and_never_crash(corpus):
    folder, bad, good = corpus
    src = open_collection(str(folder))
    listed = {src.batch_key(i) for i in range(len(src))}
    assert set(bad) | set(good) == listed  # odd names and special files are all listed
    n = len(src)
    cfg = tiny_config(f"data.batch_size={n}", "data.num_workers=0")
    batch = next(iter(iterate_batches(src, cfg, 0, 1, 0, 1)))
    assert set(batch.bad) == {(name, reason) for name, reason in bad.items()}
    assert set(batch.keys) <= set(good)
    assert all(torch.isfinite(c).all() for c in batch.crops)


def test_reduced_decode_keeps_the_field_of_view():
    w, h = 2048, 1024
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 4] = (250, 10, 10)  # a red band on the left quarter
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    assert reduced_decode_pixels([160, 96], [0.14, 0.05], tolerance=1.0) == 245760
    need = reduced_decode_pixels([160, 96], [0.14, 0.05])
    assert need == 222912
    small = decode_bytes(buf.getvalue(), min_pixels=need)
    assert draft_scale(w, h, need) == 2
    assert small.size == (1024, 512) and small.width * small.height >= need
    px = np.asarray(small)
    assert px[:, : 1024 // 4 - 4, 0].min() > 200 and px[:, 1024 // 4 + 4:, 0].max() < 40  # same band, same place
    full = decode_bytes(buf.getvalue())
    assert full.size == (w, h)
    # the crop statistics match: red fraction of random crops from the reduced and the full decode
    cfg = tiny_config("crops.sizes=[32,16]", "crops.counts=[2,2]", "crops.jitter_p=0", "crops.grayscale_p=0",
                      "crops.blur_p=0", "crops.mean=[0,0,0]", "crops.std=[1,1,1]").crops
    mc = FastMultiCrop(cfg)

    def red_fraction(img: Image.Image) -> float:
        g = torch.Generator().manual_seed(0)
        crops = [c for _ in range(60) for c in mc(img, g)]
        return float(torch.stack([(c[0] > 0.5).float().mean() for c in crops]).mean())

    assert abs(red_fraction(small) - red_fraction(full)) < 0.02


def test_no_reduction_when_the_image_is_not_much_larger():
    assert draft_scale(640, 480, 222912) == 1
    assert draft_scale(4000, 3000, 222912) == 4
    assert draft_scale(5120, 2880, 222912) == 8
    assert draft_scale(5120, 2880, 245760) == 4


def test_fast_multicrop_shapes_seeding_and_hue():
    cfg = tiny_config("crops.sizes=[40,20]", "crops.counts=[2,4]").crops
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    mc = FastMultiCrop(cfg)
    a = mc(img, torch.Generator().manual_seed(5))
    b = mc(img, torch.Generator().manual_seed(5))
    c = mc(img, torch.Generator().manual_seed(6))
    assert [tuple(x.shape) for x in a] == [(3, 40, 40)] * 2 + [(3, 20, 20)] * 4
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    x = torch.rand(2, 3, 17, 13)
    for shift in (-0.5, -0.2, 0.0, 0.13, 0.5):
        assert torch.allclose(adjust_hue(x, shift), TF.adjust_hue(x, shift), atol=1e-5)
    for shape, sigma, k in [((3, 40, 40), 0.3, 3), ((3, 20, 20), 1.0, 7), ((3, 12, 9), 2.0, 5)]:
        y = torch.rand(*shape)
        assert torch.allclose(_blur_one(y, sigma, k), TF.gaussian_blur(y, [k, k], [sigma, sigma]), atol=1e-5)


def test_folder_fast_and_classic_paths_are_both_deterministic(tmp_path):
    from tests.conftest import write_pngs

    write_pngs(tmp_path / "p", 8, size=(40, 30))
    src = open_collection(str(tmp_path / "p"))
    for fast in ("true", "false"):
        cfg = tiny_config("data.batch_size=4", f"data.fast_decode={fast}")
        one = list(iterate_batches(src, cfg, 0, 1, 0, 2))
        two = list(iterate_batches(src, cfg, 0, 1, 1, 2))
        assert one[1].keys == two[0].keys
        assert all(torch.equal(x, y) for x, y in zip(one[1].crops, two[0].crops))
    assert Counter(len(b.keys) for b in one) == {4: 2}


def _png(img: Image.Image, **kw) -> bytes:
    return _enc(img, "PNG", **kw)


def test_fast_png_decoder_gives_pils_pixels_and_leaves_the_rest_to_pil():
    from openseer.data.decode import _png_decode, decode_png_fast, open_bytes

    assert _png_decode is not None, "imagecodecs (a dependency) is not importable"
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 53, 4), np.uint8)
    fast_cases = {
        "rgb": _png(Image.fromarray(rgba[..., :3])),
        "rgba": _png(Image.fromarray(rgba)),
        "rgba_opaque": _png(Image.fromarray(np.dstack([rgba[..., :3], np.full((37, 53), 255, np.uint8)]))),
        "grey": _png(Image.fromarray(rgba[..., 0])),
        "grey_alpha": _png(Image.merge("LA", [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 1])])),
        "best_compression": _png(Image.fromarray(rgba[..., :3]), compress_level=9),
    }
    for name, data in fast_cases.items():
        got = decode_png_fast(open_bytes(data), data)
        assert got is not None, name
        want = Image.open(io.BytesIO(data))
        want.load()
        if name == "rgba_opaque":  # no alpha to composite: RGBX, the same colour channels
            assert got.mode == "RGBX" and np.array_equal(np.asarray(got)[..., :3], np.asarray(want)[..., :3])
            assert np.array_equal(np.asarray(decode_bytes(data)), np.asarray(want.convert("RGB")))
            continue
        assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want)), name
    exif = Image.Exif()
    exif[0x0112] = 6
    pal = Image.fromarray(rgba[..., :3]).convert("P")
    pil_cases = {
        "palette": _png(pal),
        "grey16": _png(Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)),
        "colour_key": _png(Image.fromarray(rgba[..., :3]), transparency=(1, 2, 3)),
        "exif": _png(Image.fromarray(rgba[..., :3]), exif=exif.tobytes()),
        "no_end": _png(Image.fromarray(rgba[..., :3]))[:-12],
        "jpeg": _enc(Image.fromarray(rgba[..., :3]), "JPEG"),
    }
    for name, data in pil_cases.items():
        assert decode_png_fast(open_bytes(data), data) is None, name
    # EXIF orientation in a PNG is still applied (through PIL)
    assert decode_bytes(pil_cases["exif"]).size == (37, 53)


def test_transparent_images_are_reduced_before_compositing_with_the_same_result():
    from openseer.data.decode import to_rgb

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (256, 320, 4), np.uint8)
    data = _png(Image.fromarray(arr))
    got = decode_bytes(data, min_pixels=(320 // 4) * (256 // 4))  # box-reduced 4x per side
    want = to_rgb(Image.fromarray(arr)).reduce(4)  # composite on white first, then reduce
    assert got.size == want.size == (80, 64)
    assert np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16)).max() <= 2
    arr[..., 3] = 255  # opaque: libpng's RGBX path, reduced before the alpha is dropped, exactly PIL's result
    data = _png(Image.fromarray(arr))
    got = decode_bytes(data, min_pixels=(320 // 4) * (256 // 4))
    assert np.array_equal(np.asarray(got), np.asarray(Image.fromarray(arr).convert("RGB").reduce(4)))
