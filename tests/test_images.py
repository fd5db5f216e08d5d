"""dynboot.io.images: any mode and orientation decodes to the right RGB pixels; every policy gives S x S, keeps what it
should and is idempotent on an S x S image (so applying it in two stages changes nothing)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dynboot.io.images import ImagePolicy, decode_image


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_modes_decode_to_rgb_with_the_right_values():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 255  # left half opaque red-ish, right half fully transparent
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[0, 5]) == (255, 255, 255)  # alpha onto white
    grey16 = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2800)  # up to 64400
    out16 = decode_image(_encode(Image.fromarray(grey16)))
    assert out16[..., 0].max() == round(64400 / 65535 * 255) and len(np.unique(out16[..., 0])) > 20  # not clipped
    pal = Image.fromarray(rgba[..., :3]).convert("P")
    assert decode_image(_encode(pal)).shape == (4, 6, 3)
    grey = decode_image(_encode(Image.fromarray(np.full((3, 3), 77, np.uint8), "L")))
    assert (grey == 77).all()
    la = Image.fromarray(np.stack([np.full((2, 2), 10, np.uint8), np.zeros((2, 2), np.uint8)], -1), "LA")
    assert (decode_image(_encode(la)) == 255).all()
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(b"GIF89a not really")


def test_exif_orientation_is_applied():
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # left half red: landscape 20 wide x 10 high
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone photo taken in portrait
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (20, 10, 3)  # displayed as portrait
    assert out[2, 5, 0] > 200 and out[17, 5, 0] < 60  # red on top after the rotation


@pytest.mark.parametrize("kind", ["center_crop", "pad_square", "letterbox", "squash"])
def test_policies_give_squares_and_are_idempotent(kind):
    p = ImagePolicy(kind=kind, size=32, fill=(122, 116, 104), resample="lanczos")
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)
    out = p.apply(wide)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(p.apply(out), out)  # an S x S image passes through unchanged
    if kind in ("pad_square", "letterbox"):
        assert tuple(out[0, 0]) == (122, 116, 104) and tuple(out[-1, -1]) == (122, 116, 104)  # padded rows
        assert not np.array_equal(out[16, :], np.broadcast_to((122, 116, 104), (32, 3)))  # image in the middle
    batch = p.apply_batch([wide, wide[:, :40], rng.integers(0, 256, (50, 50, 4), dtype=np.uint8)])
    assert batch.shape == (3, 32, 32, 3)


def test_center_crop_keeps_the_centre_and_squash_keeps_everything():
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20] = 255  # white left third, black elsewhere
    crop = ImagePolicy(kind="center_crop", size=20, resample="nearest").apply(a)
    assert (crop == 0).all()  # the white left third is cropped away
    squash = ImagePolicy(kind="squash", size=30, resample="nearest").apply(a)
    assert (squash[:, :10] == 255).all() and (squash[:, 10:] == 0).all()
    assert ImagePolicy.model_validate_json(ImagePolicy(kind="letterbox", size=8).model_dump_json()).kind == "letterbox"
    with pytest.raises(ValueError, match="uint8"):
        ImagePolicy(kind="squash", size=8).apply(np.zeros((4, 4, 3), np.float32))
