"""jina-vlm overlap-and-resize preprocessing against the spec's worked examples (sections 6, 7, 10).

The pixel checks rebuild the expected crops independently with F.interpolate.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jvlm.errors import CheckpointError, ImageError, InvalidRequestError
from jvlm.images.tiling import (
    ImageInputs,
    ImageProcessorConfig,
    ImageTokenIds,
    count_image_tokens,
    preprocess_image,
    select_tiling,
    smart_resize,
)

IDS = ImageTokenIds(patch=151938, start=151936, end=151937, col=151939)
CFG = ImageProcessorConfig()


@functools.cache
def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise, so that every resize step changes values (cached: read-only)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    noisy = base + rng.normal(0, 25, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def check_index_invariants(out: ImageInputs) -> None:
    tokens = np.asarray(out.tokens)
    is_patch = tokens == IDS.patch
    idx = out.patch_index.numpy()
    valid = idx[idx >= 0]
    assert out.patch_index.dtype == torch.int64
    assert np.all(idx[idx < 0] == -1)
    assert np.all(is_patch[valid]), "a window points at a non-<im_patch> token"
    assert valid.size == is_patch.sum()
    hits = np.bincount(valid, minlength=len(tokens))
    assert np.all(hits[is_patch] == 1), "every <im_patch> is fed exactly once"


# (W, H) -> smart (H, W), tiling, N crops, block length, <im_patch> count
GOLDENS = [
    ((800, 600), (602, 798), (2, 3), 7, 1054, 1012),
    ((640, 480), (476, 644), (2, 2), 5, 814, 772),
    ((100, 100), (98, 98), (1, 1), 2, 424, 392),
    ((2728, 2046), (854, 1148), (3, 4), 13, 1744, 1692),
    ((2000, 300), (294, 2002), (1, 8), 9, 1404, 1372),
]


@pytest.mark.parametrize(("wh", "size", "tiling", "n_crops", "n_tokens", "n_patches"), GOLDENS)
def test_goldens(wh, size, tiling, n_crops, n_tokens, n_patches):
    out = preprocess_image(make_image(*wh), CFG, IDS)
    assert out.size == size
    assert out.tiling == tiling
    assert out.crops.shape == (n_crops, 729, 588) and out.crops.dtype == torch.float32
    assert out.masks.shape == (n_crops, 729) and out.masks.dtype == torch.float32
    assert out.patch_index.shape == (n_crops, 196)
    assert len(out.tokens) == n_tokens
    assert out.tokens.count(IDS.patch) == n_patches
    assert count_image_tokens(*wh, CFG) == n_tokens
    check_index_invariants(out)
    # masks: all 1 except the appended -1 row, which lines up with the last crop
    assert torch.all(out.masks[:-1] == 1.0) and torch.all(out.masks[-1] == -1.0)
    assert out.crops.min() >= -1.0 and out.crops.max() <= 1.0
    # the two sub-blocks: thumbnail 14 x (14 + col), then the crop grid
    assert out.tokens[0] == IDS.start and out.tokens[211] == IDS.end and out.tokens[212] == IDS.start
    assert out.tokens[-1] == IDS.end
    assert [out.tokens[15 + 15 * r] for r in range(14)] == [IDS.col] * 14


def test_worked_example_800x600_targets():
    out = preprocess_image(make_image(800, 600), CFG, IDS)
    idx = out.patch_index.view(7, 14, 14)  # [crop, window row, window col]
    # thumbnail row r feeds 1 + 15r ... 14 + 15r
    expected_thumb = [1 + 15 * r + c for r in range(14) for c in range(14)]
    assert out.patch_index[0].tolist() == expected_thumb
    assert idx[1, 0, 0] == 213  # crop(0,0) window (0,0) -> global (0,0)
    assert idx[2, 0, 2] == 225  # crop(0,1) window (0,2) -> global (0,12)
    assert idx[4, 2, 0] == 633  # crop(1,0) window (2,0) -> global (12,0) = 213 + 12*35
    assert torch.all(idx[1:4, 12:, :] == -1)  # bottom margin rows of the top crops
    assert torch.all(idx[[1, 4], :, 13] == -1)  # right margin column of the left crops
    valid = (idx[1:] >= 0).sum(dim=(1, 2)).tolist()
    assert valid == [144, 120, 144, 144, 120, 144]
    assert (out.patch_index < 0).sum() == 360
    # crop-grid row R occupies 213 + 35R ... 246 + 35R, <im_col> at 247 + 35R
    assert out.tokens[247] == IDS.col and out.tokens[246] == IDS.patch and out.tokens[1053] == IDS.end


def reference_crops(image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Independent rebuild of the 800x600 pipeline: (thumbnail [3,378,378], tiled [3,Ht,Wt])."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    x = F.interpolate(x, size=(602, 798), mode="bilinear", align_corners=False)
    i0 = torch.clamp(torch.round(x), 0, 255) / 255.0
    tiled = F.interpolate(i0, size=(644, 910), mode="bilinear", align_corners=False).clamp(0, 1)
    thumb = F.interpolate(i0, size=(378, 378), mode="bilinear", align_corners=False).clamp(0, 1)
    return -1.0 + 2.0 * thumb[0], -1.0 + 2.0 * tiled[0], (644, 910)


def patches_of(window: torch.Tensor) -> torch.Tensor:
    """[3, 378, 378] -> [729, 588] with explicit loops (row-major patches, (dy, dx, c) inside)."""
    rows = []
    for py in range(27):
        for px in range(27):
            patch = window[:, py * 14 : (py + 1) * 14, px * 14 : (px + 1) * 14]  # [3, 14, 14]
            rows.append(patch.permute(1, 2, 0).reshape(-1))
    return torch.stack(rows)


def test_crop_pixels_match_independent_rebuild():
    image = make_image(800, 600, seed=3)
    out = preprocess_image(image, CFG, IDS)
    thumb, tiled, _ = reference_crops(image)
    torch.testing.assert_close(out.crops[0], patches_of(thumb), rtol=0, atol=0)
    for k, (a, b) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], start=1):
        window = tiled[:, a * 266 : a * 266 + 378, b * 266 : b * 266 + 378]
        torch.testing.assert_close(out.crops[k], patches_of(window), rtol=0, atol=0)


def test_first_resize_rounds_to_uint8():
    # 380x380 -> smart 378x378 (a real resize); thumbnail and the 1x1 tiling are then identity
    # resizes, so the crops expose I0 directly.
    image = make_image(380, 380, seed=5)
    out = preprocess_image(image, CFG, IDS)
    assert out.size == (378, 378) and out.tiling == (1, 1)
    levels = (out.crops + 1.0) / 2.0 * 255.0
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    # without the uint8 round trip the same image has fractional levels: the check can fail
    floaty = preprocess_image(image, dataclasses.replace(CFG, resize_in_float32=True), IDS)
    levels = (floaty.crops + 1.0) / 2.0 * 255.0
    assert (levels - levels.round()).abs().max() > 0.1


def test_all_black_image_is_exactly_minus_one():
    out = preprocess_image(Image.new("RGB", (640, 480)), CFG, IDS)
    assert torch.all(out.crops == -1.0)


def test_max_crops_override_is_per_call():
    image = make_image(800, 600)
    small = preprocess_image(image, CFG, IDS, max_crops=2)
    assert small.tiling[0] * small.tiling[1] <= 2
    assert count_image_tokens(800, 600, CFG, max_crops=2) == len(small.tokens)
    again = preprocess_image(image, CFG, IDS)
    assert again.tiling == (2, 3) and CFG.max_crops == 12


def test_max_crops_one_gives_single_tile():
    out = preprocess_image(make_image(2000, 300), CFG, IDS, max_crops=1)
    assert out.tiling == (1, 1) and out.crops.shape[0] == 2 and len(out.tokens) == 424
    check_index_invariants(out)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_max_crops(bad):
    with pytest.raises(InvalidRequestError, match="max_crops"):
        preprocess_image(make_image(64, 64), CFG, IDS, max_crops=bad)
    with pytest.raises(InvalidRequestError, match="max_crops"):
        count_image_tokens(64, 64, CFG, max_crops=bad)


def test_max_pixels_downscale_keeps_aspect_and_reduces_crops():
    image = make_image(2728, 2046)
    full = preprocess_image(image, CFG, IDS)
    small = preprocess_image(image, CFG, IDS, max_pixels=200_000)
    h, w = small.size
    assert h * w <= 200_000 * 1.05  # smart resize may round up to the patch grid
    assert abs(w / h - 2728 / 2046) < 0.05
    assert small.crops.shape[0] < full.crops.shape[0]
    assert count_image_tokens(2728, 2046, CFG, max_pixels=200_000) == len(small.tokens)
    check_index_invariants(small)
    # a cap above the image size changes nothing
    same = preprocess_image(image, CFG, IDS, max_pixels=10_000_000)
    assert torch.equal(same.crops, full.crops)
    with pytest.raises(InvalidRequestError, match="max_pixels"):
        preprocess_image(image, CFG, IDS, max_pixels=0)


def test_aspect_ratio_limit():
    assert preprocess_image(make_image(200, 1), CFG, IDS).tiling[0] == 1
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess_image(make_image(201, 1), CFG, IDS)
    with pytest.raises(ImageError, match="aspect ratio"):
        count_image_tokens(1, 402, CFG)


def test_count_matches_preprocess_on_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (13, 7), (56, 56), (378, 378), (392, 1000), (1176, 910), (3000, 40)]
    sizes += [tuple(int(v) for v in rng.integers(20, 1600, size=2)) for _ in range(15)]
    for width, height in sizes:
        for max_crops in (None, 4):
            out = preprocess_image(
                Image.new("RGB", (width, height), (9, 99, 199)), CFG, IDS, max_crops=max_crops
            )
            assert len(out.tokens) == count_image_tokens(width, height, CFG, max_crops=max_crops)
            check_index_invariants(out)


def test_without_column_tokens():
    cfg = dataclasses.replace(CFG, use_column_tokens=False)
    out = preprocess_image(make_image(800, 600), cfg, IDS)
    assert IDS.col not in out.tokens
    assert len(out.tokens) == 196 + 2 + 24 * 34 + 2 == count_image_tokens(800, 600, cfg)
    check_index_invariants(out)


def test_non_rgb_input_is_converted():
    rgba = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # fully transparent -> white
    out = preprocess_image(rgba, CFG, IDS)
    assert torch.all(out.crops == 1.0)


def official_tiling(h: int, w: int, max_crops: int) -> tuple[int, int]:
    """Spec 6.3 written out with the full candidate list, for comparison."""
    cands = [(i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops]
    cands.sort(key=lambda t: (t[0] * t[1], t[0]))
    arr = np.array(cands, dtype=np.int32) * 266
    with np.errstate(divide="ignore"):
        scale = (arr.astype(np.float32) / np.array([h - 112, w - 112], dtype=np.float32)).min(1)
    if np.all(scale < 1):
        return cands[int(np.argmax(scale))]
    return cands[int(np.argmin(np.where(scale < 1, 1e10, scale)))]


def test_select_tiling_matches_full_enumeration():
    rng = np.random.default_rng(1)
    sizes = [(14, 14), (112, 112), (98, 1000), (112, 2002), (378, 378), (644, 910)]
    sizes += [tuple(int(v) * 14 for v in rng.integers(1, 120, size=2)) for _ in range(60)]
    for h, w in sizes:
        for max_crops in (1, 2, 5, 12, 30):
            assert select_tiling(h, w, CFG, max_crops) == official_tiling(h, w, max_crops), (h, w)


def test_smart_resize_branches():
    assert smart_resize(600, 800) == (602, 798)
    assert smart_resize(2046, 2728) == (854, 1148)
    assert smart_resize(1, 1) == (56, 56)  # upscaled to min_pixels
    assert smart_resize(7, 7) == (56, 56)  # round(0.5) == 0 (ties to even) -> min branch


def test_config_from_dict():
    released = {
        "cropping_method": "overlap-and-resize",
        "base_input_size": [378, 378],
        "patch_size": 14,
        "max_crops": 12,
        "overlap_margins": [4, 4],
        "pooling_h": 2,
        "pooling_w": 2,
        "token_length_h": 14,
        "token_length_w": 14,
        "use_column_tokens": True,
        "size": {"shortest_edge": 3136, "longest_edge": 1003520},
        "normalization_method": "minmax",
        "image_min": -1.0,
        "image_max": 1.0,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "interpolation": "bilinear",
        "antialias": False,
        "resize_in_float32": False,
        "do_resize": True,
        "image_processor_type": "JinaVLMImageProcessor",
        "auto_map": {"AutoImageProcessor": "image_processing_jvlm.JinaVLMImageProcessor"},
    }
    assert ImageProcessorConfig.from_dict(released) == CFG
    custom = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 5000}})
    assert (custom.min_pixels, custom.max_pixels) == (100, 5000)
    assert ImageProcessorConfig.from_dict({"max_pixels": 777}).max_pixels == 777


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cropping_method", "resize"),
        ("interpolation", "lanczos"),
        ("normalization_method", "gaussian"),
        ("token_length_h", 12),
        ("base_input_size", [378, 336]),
        ("overlap_margins", [3, 4]),
        ("do_resize", False),
    ],
)
def test_config_rejects_what_it_cannot_honour(key, value):
    with pytest.raises(CheckpointError, match=key):
        ImageProcessorConfig.from_dict({key: value})
