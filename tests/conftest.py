import numpy as np
import pytest
from PIL import Image

import jvlm
from jvlm.testing import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "jina-vlm-tiny", seed=0)


@pytest.fixture(scope="session")
def vlm(tiny_dir):
    model = jvlm.load(tiny_dir, dtype="float32")
    yield model
    model.close()


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random image (gradients + noise): resizing it is not trivially constant."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                     ((x + y) * 127 // max(width + height - 2, 1))], axis=-1)
    noise = rng.integers(0, 60, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def image_conversation(image, text="Describe this image", *more_images):
    parts = [{"type": "image", "image": image}] + [{"type": "image", "image": m} for m in more_images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
