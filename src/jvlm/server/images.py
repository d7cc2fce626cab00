"""How the server loads the images of a request: data URIs and http(s) URLs under the SSRF policy of
``jvlm.images.safe_http`` (public addresses only unless allowed), ``file:`` URLs only inside
``allow_file_dir``, never plain local paths.

Kept in a few small functions so that a different loader can replace them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from PIL import Image

from ..errors import ImageTooLargeError
from ..images.fetch import ImageLimits, UrlPolicy, load_image
from .settings import Settings

ImageLoader = Callable[[Any], Image.Image]


def make_image_loader(settings: Settings) -> ImageLoader:
    """One image source → an RGB image, under the server's per-image limits and URL policy."""
    limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                         fetch_timeout=settings.image_fetch_timeout)
    policy = UrlPolicy(allow_private=settings.allow_private_urls, allowed_hosts=tuple(settings.allowed_hosts),
                       allow_file_dir=settings.allow_file_dir, allow_local_paths=False)
    return functools.partial(load_image, limits=limits, policy=policy)


def with_pixel_budget(loader: ImageLoader, max_total_pixels: int) -> ImageLoader:
    """A loader for one request: ``loader``, but the decoded pixels of all its images together may not exceed
    ``max_total_pixels``. Counted after each decode (each image is already capped by the per-image limit,
    checked from its header), before any preprocessing."""
    total, count = 0, 0

    def load(source: Any) -> Image.Image:
        nonlocal total, count
        image = loader(source)
        count += 1
        total += image.width * image.height
        if total > max_total_pixels:
            raise ImageTooLargeError(
                f"the request's images have too many pixels: the first {count} have {total:,} (image {count} is "
                f"{image.width}x{image.height}); the limit is {max_total_pixels:,} for all the images of a request")
        return image

    return load
