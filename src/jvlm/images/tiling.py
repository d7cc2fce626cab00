"""jina-vlm image preprocessing: the official ``overlap-and-resize`` cropping (spec sections 6-7).

Pipeline: smart resize (uint8, patch-aligned) -> tiling selection on a 266-px stride grid ->
float resize to rows*266+112 x cols*266+112 -> 378x378 crops with 112-px overlap, plus a global
thumbnail placed first -> patchify -> token block and the crop-window -> token map.

Quirks reproduced on purpose because the model was trained with them:
* the first resize rounds back to uint8 (``resize_in_float32`` is false in the checkpoint);
* tiling scales are computed in float32 and ties go to the smaller tiling, then fewer rows;
* the ``-1`` mask row is *appended*, so it lines up with the last crop, not the thumbnail.
Memory layouts mirror the official code (HWC arrays seen as CHW through a permute) so torch picks
the same interpolation kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jvlm.errors import CheckpointError, ImageError, check_positive_int
from jvlm.images.fetch import to_rgb

__all__ = [
    "ImageInputs",
    "ImageProcessorConfig",
    "ImageTokenIds",
    "axis_tiles",
    "count_image_tokens",
    "fit_max_pixels",
    "patch_ranks",
    "patchify",
    "preprocess_image",
    "select_tiling",
    "smart_resize",
    "token_layout",
]

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of ``preprocessor_config.json`` that the overlap-and-resize path uses.

    Defaults are the released jina-vlm values (not the official class defaults).
    """

    base_input_size: int = 378
    patch_size: int = 14
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)  # in patches: (left/top, right/bottom)
    pooling_h: int = 2
    pooling_w: int = 2
    min_pixels: int = 3136
    max_pixels: int = 1_003_520
    image_min: float = -1.0
    image_max: float = 1.0
    interpolation: str = "bilinear"
    antialias: bool = False
    resize_in_float32: bool = False
    normalization_method: str = "minmax"
    use_column_tokens: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, why: str) -> CheckpointError:
            return CheckpointError(f"preprocessor config: {field}={value!r} {why}")

        for field in (
            "base_input_size",
            "patch_size",
            "max_crops",
            "pooling_h",
            "pooling_w",
            "min_pixels",
            "max_pixels",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(field, value, "must be a positive integer")
        if self.base_input_size % self.patch_size:
            raise bad(
                "base_input_size", self.base_input_size, f"is not a multiple of patch_size {self.patch_size}"
            )
        if self.interpolation not in ("bilinear", "bicubic"):
            raise bad("interpolation", self.interpolation, "is not supported (bilinear, bicubic)")
        if self.normalization_method != "minmax":
            raise bad("normalization_method", self.normalization_method, "is not supported (minmax)")
        left, right = self.overlap_margins
        for pool in (self.pooling_h, self.pooling_w):
            if left < 0 or right < 0 or left % pool or right % pool:
                raise bad(
                    "overlap_margins",
                    self.overlap_margins,
                    f"must be non-negative multiples of the pooling size {pool}",
                )
        if self.window_patches < 1:
            raise bad("overlap_margins", self.overlap_margins, "leave no crop window")

    # Derived geometry (378 / 14 / (4, 4) / 2 -> 27, 19, 266, 112, 14).
    @property
    def crop_patches(self) -> int:
        return self.base_input_size // self.patch_size

    @property
    def window_patches(self) -> int:
        return self.crop_patches - sum(self.overlap_margins)

    @property
    def window_size(self) -> int:
        return self.window_patches * self.patch_size

    @property
    def margin_pixels(self) -> int:
        return sum(self.overlap_margins) * self.patch_size

    @property
    def tokens_h(self) -> int:
        return -(-self.crop_patches // self.pooling_h)

    @property
    def tokens_w(self) -> int:
        return -(-self.crop_patches // self.pooling_w)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """Read a ``preprocessor_config.json`` dict; unknown (HF bookkeeping) keys are ignored.

        Missing keys take the released checkpoint's values. ``min_pixels`` / ``max_pixels``
        win over ``size.shortest_edge`` / ``size.longest_edge``.
        """

        def need(field: str, ok: bool, why: str) -> None:
            if not ok:
                raise CheckpointError(f"preprocessor config: {field}={d.get(field)!r} {why}")

        method = d.get("cropping_method", "overlap-and-resize")
        need(
            "cropping_method",
            str(method).lower().replace("_", "-") == "overlap-and-resize",
            "is not supported (only overlap-and-resize)",
        )
        need("do_resize", d.get("do_resize", True) is True, "is not supported (must be true)")
        need(
            "preserve_aspect_ratio",
            not d.get("preserve_aspect_ratio", False),
            "is not supported (must be false)",
        )
        need(
            "random_interpolation",
            not d.get("random_interpolation", False),
            "is not supported at inference (must be false)",
        )

        kw: dict[str, Any] = {}
        size = d.get("size")
        if size is not None:
            need(
                "size",
                isinstance(size, dict) and {"shortest_edge", "longest_edge"} <= size.keys(),
                "must have shortest_edge and longest_edge",
            )
            kw["min_pixels"], kw["max_pixels"] = size["shortest_edge"], size["longest_edge"]
        for field in (
            "min_pixels",
            "max_pixels",
            "patch_size",
            "max_crops",
            "pooling_h",
            "pooling_w",
            "antialias",
            "resize_in_float32",
            "use_column_tokens",
        ):
            if d.get(field) is not None:
                kw[field] = d[field]
        if "base_input_size" in d:
            base = d["base_input_size"]
            if isinstance(base, list | tuple):
                need(
                    "base_input_size", len(base) == 2 and base[0] == base[1], "must be square (one crop size)"
                )
                base = base[0]
            kw["base_input_size"] = base
        if "overlap_margins" in d:
            margins = d["overlap_margins"]
            need(
                "overlap_margins",
                isinstance(margins, list | tuple) and len(margins) == 2,
                "must be two integers",
            )
            kw["overlap_margins"] = (int(margins[0]), int(margins[1]))
        if "interpolation" in d:
            kw["interpolation"] = str(d["interpolation"]).lower()
        if "normalization_method" in d:
            kw["normalization_method"] = str(d["normalization_method"]).lower()
        # The official processor reads these with `value or default`, so 0 means the default.
        if "image_min" in d:
            kw["image_min"] = float(d["image_min"] or -1.0)
        if "image_max" in d:
            kw["image_max"] = float(d["image_max"] or 1.0)
        config = cls(**kw)
        for field, derived in (("token_length_h", config.tokens_h), ("token_length_w", config.tokens_w)):
            need(
                field,
                d.get(field) in (None, derived),
                f"does not match the crop geometry (expected {derived})",
            )
        return config


@dataclass(frozen=True)
class ImageTokenIds:
    """Special token ids of the image block, resolved from the snapshot's tokenizer."""

    patch: int
    start: int
    end: int
    col: int


@dataclass
class ImageInputs:
    """One image, ready for the vision tower and for splicing into ``input_ids``."""

    crops: torch.Tensor  # float32 [N, 729, 588], thumbnail first, values in [-1, 1]
    masks: torch.Tensor  # float32 [N, 729]: 1.0, last row -1.0 (official off-by-one)
    tokens: list[int]  # the image token block (spec 7.2)
    patch_index: torch.Tensor  # int64 [N, 196]: position in `tokens` fed by each window, or -1
    tiling: tuple[int, int]  # (rows, cols) of crops
    size: tuple[int, int]  # (height, width) after smart resize

    @property
    def num_crops(self) -> int:
        return self.crops.shape[0]


# --------------------------------------------------------------------------------------------
# geometry (no pixels)


def smart_resize(
    height: int, width: int, *, factor: int = 14, min_pixels: int = 3136, max_pixels: int = 1_003_520
) -> tuple[int, int]:
    """Aspect-preserving (height, width), multiples of ``factor``, inside [min, max] pixels (6.2)."""
    _check_aspect(width, height)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def select_tiling(
    height: int, width: int, config: ImageProcessorConfig, max_crops: int | None = None
) -> tuple[int, int]:
    """(rows, cols) of crops for a smart-resized image of ``height`` x ``width`` (6.3)."""
    max_crops = config.max_crops if max_crops is None else max_crops
    window = config.window_size
    h, w = height - config.margin_pixels, width - config.margin_pixels  # may be <= 0
    # The answer never has more crops than the smallest covering grid (scale is monotone in
    # rows/cols and ties favour fewer crops), so a huge max_crops need not be enumerated.
    covering = max(1, -(-h // window)) * max(1, -(-w // window))
    limit = min(max_crops, covering)
    cands = sorted(
        ((i, j) for i in range(1, limit + 1) for j in range(1, limit // i + 1)),
        key=lambda t: (t[0] * t[1], t[0]),
    )
    tilings = np.array(cands, dtype=np.int32)  # [n, 2]
    with np.errstate(divide="ignore"):
        scales = (tilings * window).astype(np.float32) / np.array([h, w], dtype=np.float32)
    scale = scales.min(axis=1)  # [n] float32
    if np.all(scale < 1):
        ix = int(np.argmax(scale))  # must shrink: shrink least
    else:
        ix = int(np.argmin(np.where(scale < 1, np.float32(1e10), scale)))  # grow least
    return int(tilings[ix, 0]), int(tilings[ix, 1])


def axis_tiles(n: int, pooling: int, config: ImageProcessorConfig) -> list[tuple[int, int, int]]:
    """Per tile along one axis: (pixel offset, first valid pooled cell, valid pooled cells) (6.7).

    Inner tile edges drop their overlap margin; the outer edges of the image keep it.
    """
    left, right = config.overlap_margins
    tiles = []
    for a in range(n):
        patches = config.window_patches + (left if a == 0 else 0) + (right if a == n - 1 else 0)
        tiles.append((a * config.window_size, 0 if a == 0 else left // pooling, -(-patches // pooling)))
    return tiles


def token_layout(
    grid_h: int, grid_w: int, config: ImageProcessorConfig, token_ids: ImageTokenIds
) -> tuple[list[int], np.ndarray]:
    """The image token block (7.2) and the block positions of its ``<im_patch>`` tokens.

    Positions come from the layout, not from searching ids, so they stay right even if two
    special ids coincide.
    """
    tokens: list[int] = []
    positions: list[int] = []
    for rows, cols in ((config.tokens_h, config.tokens_w), (grid_h, grid_w)):
        tokens.append(token_ids.start)
        for _ in range(rows):
            positions.extend(range(len(tokens), len(tokens) + cols))
            tokens.extend([token_ids.patch] * cols)
            if config.use_column_tokens:
                tokens.append(token_ids.col)
        tokens.append(token_ids.end)
    return tokens, np.asarray(positions, dtype=np.int64)


def patch_ranks(rows: int, cols: int, config: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    """Which ``<im_patch>`` (0-based count) each crop window feeds, -1 if discarded.

    Returns (ranks int64 [1 + rows*cols, tokens_h*tokens_w], grid_h, grid_w). The thumbnail
    feeds patches 0..195; crop windows follow in global row-major order of the valid cells.
    """
    th, tw = config.tokens_h, config.tokens_w
    maps = []
    for n, pooling, t in ((rows, config.pooling_h, th), (cols, config.pooling_w, tw)):
        m = np.full((n, t), -1, dtype=np.int64)  # [tile, cell] -> global row/col or -1
        offset = 0
        for a, (_, first, count) in enumerate(axis_tiles(n, pooling, config)):
            m[a, first : first + count] = np.arange(offset, offset + count)
            offset += count
        maps.append((m, offset))
    (row_map, grid_h), (col_map, grid_w) = maps
    r = row_map[:, None, :, None]  # [rows, 1, th, 1]
    c = col_map[None, :, None, :]  # [1, cols, 1, tw]
    ranks = np.where((r >= 0) & (c >= 0), th * tw + r * grid_w + c, -1)  # [rows, cols, th, tw]
    thumb = np.arange(th * tw, dtype=np.int64)[None]
    return np.concatenate([thumb, ranks.reshape(rows * cols, th * tw)]), grid_h, grid_w


def fit_max_pixels(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect preserved, so that width*height <= max_pixels."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels:  # guard float rounding
        if w >= h:
            w -= 1
        else:
            h -= 1
    return max(1, w), max(1, h)


def count_image_tokens(
    width: int,
    height: int,
    config: ImageProcessorConfig,
    *,
    max_crops: int | None = None,
    max_pixels: int | None = None,
) -> int:
    """Length of the image token block for a ``width`` x ``height`` image, without any pixels.

    Equals ``len(preprocess_image(...).tokens)`` for the same options.
    """
    max_crops = _check_options(max_crops, max_pixels, config)
    _check_aspect(width, height)
    width, height = fit_max_pixels(width, height, max_pixels)
    h, w = smart_resize(
        height, width, factor=config.patch_size, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )
    rows, cols = select_tiling(h, w, config, max_crops)
    grid_h = sum(t[2] for t in axis_tiles(rows, config.pooling_h, config))
    grid_w = sum(t[2] for t in axis_tiles(cols, config.pooling_w, config))
    col = int(config.use_column_tokens)
    return config.tokens_h * (config.tokens_w + col) + 2 + grid_h * (grid_w + col) + 2


# --------------------------------------------------------------------------------------------
# pixels


def _resize(x: torch.Tensor, size: tuple[int, int], config: ImageProcessorConfig) -> torch.Tensor:
    """Resize an HWC image like torchvision's tensor ``Resize`` (align_corners False).

    uint8 input is resized in float32 and rounded half-to-even back to uint8; float input is
    clipped to [0, 1]. [H, W, 3] -> [h, w, 3].
    """
    chw = x.permute(2, 0, 1)[None]  # a channels-last view, as in the official code
    if x.dtype == torch.uint8:
        y = F.interpolate(
            chw.float(), size=size, mode=config.interpolation, align_corners=False, antialias=config.antialias
        )
        y = y.clamp(0, 255).round().to(torch.uint8)
    else:
        y = F.interpolate(
            chw, size=size, mode=config.interpolation, align_corners=False, antialias=config.antialias
        ).clamp(0.0, 1.0)
    return y[0].permute(1, 2, 0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, S, S, C] -> [N, (S/p)^2, p*p*C]; patches row-major, values (dy, dx, c) inside."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, patch_size * patch_size * c)


def preprocess_image(
    image: Image.Image,
    config: ImageProcessorConfig,
    token_ids: ImageTokenIds,
    *,
    max_crops: int | None = None,
    max_pixels: int | None = None,
) -> ImageInputs:
    """Crops, masks, token block and window -> token map for one image (spec 6-7).

    Args:
        image: any PIL image; converted to RGB (alpha on white) if needed.
        config: processor settings of the checkpoint.
        token_ids: ids of ``<im_patch>``, ``<im_start>``, ``<im_end>``, ``<im_col>``.
        max_crops: per-call override of ``config.max_crops`` (config is not modified).
        max_pixels: optional user cap applied *before* the official pipeline: a larger image is
            first downscaled, aspect preserved, with PIL's BICUBIC filter (which widens its
            support when shrinking, i.e. antialiased) and ``reducing_gap=3`` (a fast box
            pre-reduction for very large factors). Unrelated to ``config.max_pixels``, which
            bounds the smart resize.

    Raises:
        InvalidRequestError: ``max_crops`` < 1 or ``max_pixels`` < 1.
        ImageError: zero-sized image or aspect ratio over 200.
    """
    max_crops = _check_options(max_crops, max_pixels, config)
    if image.mode != "RGB":
        image = to_rgb(image)
    _check_aspect(*image.size)
    target = fit_max_pixels(*image.size, max_pixels)
    if target != image.size:
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)

    # 6.2 smart resize of the uint8 image -> I0 float32 [h, w, 3] in [0, 1], values k/255
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3]
    height, width = pixels.shape[:2]
    h, w = smart_resize(
        height, width, factor=config.patch_size, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )
    if config.resize_in_float32:
        base = pixels.float() / 255.0
        base = _resize(base, (h, w), config) if (h, w) != (height, width) else base
    else:
        base = _resize(pixels, (h, w), config) if (h, w) != (height, width) else pixels
        base = base.float() / 255.0

    # 6.3-6.4 tiling and overlapping crops of the re-resized image
    rows, cols = select_tiling(h, w, config, max_crops)
    size, stride, p, cp = config.base_input_size, config.window_size, config.patch_size, config.crop_patches
    target_hw = (rows * stride + config.margin_pixels, cols * stride + config.margin_pixels)
    tiled = _normalize(_resize(base, target_hw, config), config)  # [Ht, Wt, 3]
    crops = torch.empty(rows * cols + 1, cp * cp, p * p * 3)  # [N, 729, 588]
    win = tiled.unfold(0, size, stride).unfold(1, size, stride)  # view [rows, cols, 3, S, S]
    win = win.unflatten(3, (cp, p)).unflatten(5, (cp, p))  # [rows, cols, 3, py, dy, px, dx]
    # patchify straight into the output: one copy, crops in row-major (a, b) order after slot 0
    crops[1:].view(rows, cols, cp, cp, p, p, 3).copy_(win.permute(0, 1, 3, 5, 4, 6, 2))

    # 6.5 thumbnail of I0, placed first
    thumb = _normalize(_resize(base, (size, size), config), config)  # [S, S, 3]
    crops[0] = patchify(thumb[None], p)[0]

    # 6.6 masks: full coverage for every crop, then the appended -1 row (lines up with the last)
    n_patches = config.crop_patches**2
    masks = torch.ones(rows * cols + 1, n_patches, dtype=torch.float32)
    masks[-1] = -1.0

    # 6.7 / 7.2 token block and window -> token positions
    ranks, grid_h, grid_w = patch_ranks(rows, cols, config)
    tokens, positions = token_layout(grid_h, grid_w, config, token_ids)
    patch_index = np.where(ranks >= 0, positions[np.maximum(ranks, 0)], -1)
    return ImageInputs(
        crops=crops,
        masks=masks,
        tokens=tokens,
        patch_index=torch.from_numpy(patch_index.astype(np.int64)),
        tiling=(rows, cols),
        size=(h, w),
    )


def _normalize(x: torch.Tensor, config: ImageProcessorConfig) -> torch.Tensor:
    """minmax: [0, 1] -> [image_min, image_max], in float32 like the official numpy code."""
    scale = torch.tensor(config.image_max - config.image_min, dtype=torch.float32)
    return x.mul(scale).add_(torch.tensor(config.image_min, dtype=torch.float32))


def _check_options(max_crops: int | None, max_pixels: int | None, config: ImageProcessorConfig) -> int:
    if max_crops is None:
        max_crops = config.max_crops
    check_positive_int("max_crops", max_crops)
    if max_pixels is not None:
        check_positive_int("max_pixels", max_pixels)
    return max_crops


def _check_aspect(width: int, height: int) -> None:
    """The official processor refuses images more than 200 times wider than high (or v.v.)."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image aspect ratio {ratio:.1f} ({width}x{height}) is over the limit of {MAX_ASPECT_RATIO}"
        )
