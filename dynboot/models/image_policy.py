"""How an image of any size, aspect and mode becomes a backend's square model input: one policy per backend,
owned by its image tokenizer (`tokenizer.policy`) and so used by every stage that encodes an image.

- anole (Chameleon's image tokenizer): shortest side to 512 (LANCZOS), centre crop 512;
- liquid (its inference recipe): pad to a square with (122, 116, 104), then LANCZOS to 512;
- janus (transformers' JanusImageProcessor): longest side to 384 (BICUBIC, no side below 14), then pad to a
  square, centred, with the background colour of its normalisation mean (0.5 -> 127);
- tiny (the embedded world's grid): both sides to the frame size (BOX), the exact grid parser reads the cells.

Any input works: uint8 / uint16 arrays [H, W], [H, W, 1|3|4], PIL images of any mode (P, L, LA, RGBA, I;16,
CMYK, ...) with their EXIF orientation applied, or encoded bytes. Transparency is composited on white, as
Chameleon's tokenizer does. The policy is plain data (`to_dict` / `from_dict`), recorded in `dynboot.json`,
so a CPU decode task can apply it without loading weights (`registry.policy_of_checkpoint`).

    policy = ImagePolicy(size=512, fit="crop")
    batch = policy.apply_batch([img_500x333_rgba, img_1024x1024])   # [2, 512, 512, 3] uint8
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
from PIL import Image, ImageOps

Fit = Literal["crop", "pad_resize", "resize_pad", "squash"]
Resample = Literal["lanczos", "bicubic", "bilinear", "box", "nearest"]
_RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "box": Image.BOX,
             "nearest": Image.NEAREST}
JANUS_MIN_SIDE = 14  # JanusImageProcessor's min_size: no side of the resized image below it


@dataclass(frozen=True)
class ImagePolicy:
    """`fit`: crop = shortest side to `size` + centre crop; pad_resize = pad to a square with `fill`, then resize;
    resize_pad = longest side to `size`, then pad to a square with `fill`; squash = both sides to `size`."""

    size: int
    fit: Fit
    fill: tuple[int, int, int] = (0, 0, 0)
    resample: Resample = "lanczos"

    def apply(self, image) -> np.ndarray:
        """One image (array, PIL image or encoded bytes) -> [size, size, 3] uint8."""
        img = to_rgb_image(image)
        if img.size == (self.size, self.size):
            return np.asarray(img, dtype=np.uint8)
        return np.asarray(getattr(self, f"_{self.fit}")(img), dtype=np.uint8)

    def apply_batch(self, images) -> np.ndarray:
        """A batch ([B, H, W, C] array or a sequence of any-size images) -> [B, size, size, 3] uint8."""
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.uint8 and \
                images.shape[1:] == (self.size, self.size, 3):
            return images
        rows = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
        if not rows:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.stack([self.apply(im) for im in rows])

    def _crop(self, img: Image.Image) -> Image.Image:
        scale = self.size / min(img.size)
        img = img.resize((max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))),
                         _RESAMPLE[self.resample])
        x0, y0 = (img.width - self.size) // 2, (img.height - self.size) // 2
        return img.crop((x0, y0, x0 + self.size, y0 + self.size))

    def _pad_resize(self, img: Image.Image) -> Image.Image:
        side = max(img.size)
        square = Image.new("RGB", (side, side), self.fill)
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        return square.resize((self.size, self.size), _RESAMPLE[self.resample])

    def _resize_pad(self, img: Image.Image) -> Image.Image:
        scale = self.size / max(img.size)
        w = max(round(img.width * scale), JANUS_MIN_SIDE)
        h = max(round(img.height * scale), JANUS_MIN_SIDE)
        img = img.resize((w, h), _RESAMPLE[self.resample])
        side = max(w, h)
        square = Image.new("RGB", (side, side), self.fill)
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        return square if side == self.size else square.resize((self.size, self.size), _RESAMPLE[self.resample])

    def _squash(self, img: Image.Image) -> Image.Image:
        return img.resize((self.size, self.size), _RESAMPLE[self.resample])

    def to_dict(self) -> dict:
        return {**asdict(self), "fill": list(self.fill)}

    @classmethod
    def from_dict(cls, d: dict) -> "ImagePolicy":
        return cls(size=int(d["size"]), fit=d["fit"], fill=tuple(int(c) for c in d.get("fill", (0, 0, 0))),
                   resample=d.get("resample", "lanczos"))


def to_rgb_image(image) -> Image.Image:
    """Any supported image -> an RGB PIL image (EXIF orientation applied, transparency on white)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
        image.load()
    if isinstance(image, Image.Image):
        return _pil_rgb(ImageOps.exif_transpose(image))
    return _array_rgb(np.asarray(image))


def _pil_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grey (I: 32-bit int, as PNG loads it)
        return _array_rgb(np.asarray(img))
    if img.mode == "F":
        raise ValueError("floating-point (mode F) images are not supported: convert to 8 or 16 bit first")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        return _on_white(np.asarray(img.convert("RGBA")))
    return img.convert("RGB")


def _array_rgb(x: np.ndarray) -> Image.Image:
    if x.dtype == np.uint16 or (x.dtype.kind in "iu" and x.dtype != np.uint8 and x.size and int(x.max()) > 255):
        x = ((x.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # 16-bit -> 8-bit, rounded
    elif x.dtype == bool:
        x = x.astype(np.uint8) * 255
    elif x.dtype.kind in "iu":
        x = x.astype(np.uint8)
    else:
        raise ValueError(f"images must be integer arrays (uint8 or uint16), got {x.dtype}")
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        return Image.fromarray(np.repeat(x[..., None], 3, -1))
    if x.ndim != 3 or x.shape[-1] not in (3, 4):
        raise ValueError(f"an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {list(x.shape)}")
    if x.shape[-1] == 4:
        return _on_white(x)
    return Image.fromarray(np.ascontiguousarray(x))


def _on_white(rgba: np.ndarray) -> Image.Image:
    """Alpha-composite on white (Chameleon's `_whiten_transparency`); opaque images are unchanged."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    if bool((alpha == 1).all()):
        return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
    rgb = (1 - alpha) * 255 + alpha * rgba[..., :3]
    return Image.fromarray(rgb.astype(np.uint8))


def as_rows(images) -> Sequence:
    """A batch as rows: [B, H, W, C] arrays and lists pass through; one image becomes a batch of one."""
    if isinstance(images, np.ndarray) and images.ndim != 4:
        return [images]
    return images
