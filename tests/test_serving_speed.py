"""The PNGs the served generator writes itself (one uint8 array per request, zlib, no PIL) are the pictures
PIL wrote before: the same pixels, readable by any decoder."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from aetrack.serving.generator import decode_png, encode_png, encode_pngs


def pil_png(image: torch.Tensor) -> str:
    """The encoder it replaced, word for word."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    pil = Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.parametrize("shape", [(64, 1, 8, 8), (3, 1, 28, 28), (4, 3, 32, 32), (2, 1, 9, 7), (1, 3, 1, 1)])
def test_encoded_pngs_hold_the_same_pixels_as_pils(shape):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(shape, generator=generator) * 1.2 - 0.1  # outside [0, 1] too: clamped
    images[0].view(-1)[:4] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5])[: images[0].numel()]  # halves: to even
    pngs = encode_pngs(images)
    assert len(pngs) == shape[0]
    for image, text in zip(images, pngs):
        picture = Image.open(io.BytesIO(base64.b64decode(text)))
        assert picture.format == "PNG" and picture.mode == ("L" if shape[1] == 1 else "RGB")
        assert picture.size == (shape[3], shape[2])
        assert np.array_equal(decode_png(text), decode_png(pil_png(image)))
        assert encode_png(image) == text
    picture = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    picture.verify()  # chunk lengths and CRCs


def test_the_same_images_give_the_same_bytes():
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert encode_pngs(images) == encode_pngs(images.clone())
