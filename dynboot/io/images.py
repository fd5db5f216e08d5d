"""Images in: bytes of any format, mode and orientation -> RGB uint8; and the one policy by which an image of any
size becomes a model's square input.

    rgb = decode_image(png_or_jpeg_bytes)          # [H, W, 3] uint8: EXIF orientation applied, any mode
    policy = model.tokenizer.policy                # each backend's image tokenizer owns its policy
    square = policy.apply(rgb)                     # [S, S, 3] uint8
    batch = policy.apply_batch([a, b, c])          # mixed sizes -> [B, S, S, 3]

Modes: RGBA / LA / PA and palette images with transparency are composited onto white (what Chameleon's image
processor does with alpha); 16-bit greyscale (I;16*) and 32-bit integer images are scaled to 8 bits rather than
clipped (PIL's own `convert("RGB")` clips them to 255); float images in [0, 1] are scaled by 255; L, 1, P, CMYK,
YCbCr, LAB go through PIL's conversion. EXIF orientation (phone photos) is applied before anything else.

Policies (`ImagePolicy.kind`), each idempotent on an image already S x S, so applying a policy at relabel time
and again inside the tokenizer gives the same pixels:
- `center_crop`: shortest side to S, centre crop (Chameleon / Anole);
- `pad_square`: pad to a square with `fill`, then resize to S (Liquid: fill (122, 116, 104), LANCZOS);
- `letterbox`: longest side to S, then pad to a square with `fill` (Janus' image processor: BICUBIC, its
  `background_color`);
- `squash`: resize to S x S ignoring the aspect ratio (the tiny world model's grid: NEAREST, so world frames and
  their cells stay exact).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ImagePolicy", "PolicyKind", "decode_image", "encode_png", "load_image", "to_rgb"]

PolicyKind = Literal["center_crop", "pad_square", "letterbox", "squash"]
Resample = Literal["lanczos", "bicubic", "bilinear", "nearest"]
_RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
WHITE = (255, 255, 255)


def _high_bit_depth(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale -> 8-bit L, scaled by the type's range (not clipped)."""
    a = np.asarray(img)
    if img.mode == "F":
        top = 1.0 if float(np.nanmax(a, initial=0)) <= 1.0 else 255.0
        a8 = np.clip(np.nan_to_num(a) / top * 255.0, 0, 255)
    else:  # I;16, I;16B, I;16L, I (32-bit signed; PNG 16-bit greyscale opens as I or I;16)
        top = 65535.0 if int(a.max(initial=0)) > 255 or img.mode.startswith("I;16") else 255.0
        a8 = np.clip(a.astype(np.float64) / top * 255.0, 0, 255)
    return Image.fromarray(np.round(a8).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> RGB: EXIF orientation applied, alpha composited onto white, high bit depths scaled."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_depth(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3]; ValueError on anything undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(to_rgb(im))
    except Exception as err:
        raise ValueError(f"not a decodable image: {type(err).__name__}: {err}") from None


def load_image(path: str | Path) -> np.ndarray:
    """An image file (local path or URI) as RGB uint8."""
    from dynboot.io import storage

    return decode_image(storage.read_bytes(path))


def encode_png(image: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG bytes (lossless: training targets must stay bit-exact)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"an image must be [H, W, 3] (or a PIL image), got shape {list(a.shape)}")
    if a.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8, got {a.dtype} (decode files with dynboot.io.images.decode_image)")
    return np.asarray(to_rgb(Image.fromarray(a))) if a.shape[-1] == 4 else a


class ImagePolicy(BaseModel):
    """How an image of any size becomes the model's S x S input (see module doc). Serialisable (dynboot.json,
    job configs), so CPU tasks apply a model's policy without loading the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: PolicyKind = Field(..., description="center_crop | pad_square | letterbox | squash (module doc).")
    size: int = Field(..., ge=1, description="Side S of the square the tokenizer reads.")
    resample: Resample = Field("lanczos", description="Resampling filter.")
    fill: tuple[int, int, int] = Field((0, 0, 0), description="Padding colour of pad_square / letterbox.")

    def apply(self, image) -> np.ndarray:
        """One image (uint8 array [H, W, 3|4] or PIL image) -> [S, S, 3] uint8."""
        a = _as_rgb_array(image)
        S = self.size
        if a.shape[:2] == (S, S):
            return a
        img, f = Image.fromarray(a), _RESAMPLE[self.resample]
        w, h = img.size
        if self.kind == "squash":
            out = img.resize((S, S), f)
        elif self.kind == "center_crop":
            scale = S / min(w, h)
            img = img.resize((max(S, round(w * scale)), max(S, round(h * scale))), f)
            x0, y0 = (img.width - S) // 2, (img.height - S) // 2
            out = img.crop((x0, y0, x0 + S, y0 + S))
        elif self.kind == "pad_square":
            out = _pad(img, self.fill).resize((S, S), f)
        else:  # letterbox
            scale = S / max(w, h)
            out = _pad(img.resize((max(1, round(w * scale)), max(1, round(h * scale))), f), self.fill, side=S)
        return np.asarray(out)

    def apply_batch(self, images: Sequence | np.ndarray) -> np.ndarray:
        """Images of any sizes (a list, or an already-stacked [B, H, W, 3] array) -> [B, S, S, 3] uint8."""
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:3] == (self.size, self.size) \
                and images.shape[-1] == 3 and images.dtype == np.uint8:
            return images
        out = [self.apply(im) for im in images]
        return np.stack(out) if out else np.zeros((0, self.size, self.size, 3), np.uint8)


def _pad(img: Image.Image, fill: tuple[int, int, int], side: int | None = None) -> Image.Image:
    """Centre `img` on a square canvas of `side` (default: its longest side) filled with `fill`."""
    side = side or max(img.size)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas
