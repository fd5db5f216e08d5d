"""Chameleon's VQ-GAN image tokenizer (taming-transformers layout), shared by the anole and liquid backends.

Weights load from a local directory holding the released files:
- `vqgan.yaml`: the taming config, `model.params.{embed_dim, n_embed, ddconfig}` (`lossconfig` is ignored);
- `vqgan.safetensors` (what `save` and `dynboot convert-vqgan` write), keys `encoder.*`, `decoder.*`,
  `quantize.embedding.weight`, `quant_conv.*`, `post_quant_conv.*`;
- or `vqgan.ckpt`, the released Lightning checkpoint with the same keys under `state_dict` (the `loss.*`
  discriminator keys are dropped). It is only ever read with `torch.load(weights_only=True)`; a checkpoint that
  pickles Python objects (Lightning's callback classes) is refused with the command that converts it once,
  after which only the safetensors file is read (vqgan_convert.py).

The encoder and its resnet/attention blocks are transformers' Chameleon classes (same parameter names, same
maths); transformers has no decoder, so the taming decoder is built here from those same blocks.

    tok = VQGANTokenizer.load("ckpt_dir")    # 512x512 -> 32x32 = 1024 codes of 8192
    codes = tok.encode(images)                # [B, 1024]: tok.policy to 512, [-1, 1], encoder -> quant_conv -> nearest code
    images = tok.decode(codes)                # [B, 512, 512, 3] uint8: codebook -> post_quant_conv -> decoder
    z = tok.features(images)                  # [B, 1024, 256] = quant_conv(encoder(x)), for recognition weights
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAEEncoder,
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
)

from dynboot.io.images import ImagePolicy

YAML_NAME, CKPT_NAME, SAFETENSORS_NAME = "vqgan.yaml", "vqgan.ckpt", "vqgan.safetensors"


@dataclass
class VQGANConfig:
    """The taming `ddconfig` plus codebook size; defaults are Chameleon's released VQ-GAN."""

    embed_dim: int = 256
    n_embed: int = 8192
    z_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    double_z: bool = False

    def __post_init__(self) -> None:
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)
        if self.ch % 32:
            raise ValueError(f"VQ-GAN ch={self.ch}: GroupNorm(32) needs a multiple of 32")

    @property
    def grid(self) -> int:
        """Codes per side: the encoder halves the resolution at every level but the last."""
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def tiny(cls) -> "VQGANConfig":
        """32x32 images -> 4x4 = 16 codes of 64; for tests."""
        return cls(embed_dim=8, n_embed=64, z_channels=8, resolution=32, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

    @classmethod
    def shapes(cls) -> "VQGANConfig":
        """Chameleon's input and code grid (512 px -> 32x32 = 1024 codes of 8192) with narrow layers."""
        return cls(embed_dim=8, n_embed=8192, z_channels=32, resolution=512, ch=32, ch_mult=(1, 1, 2, 2, 2),
                   num_res_blocks=1)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "VQGANConfig":
        params = yaml.safe_load(Path(path).read_text())["model"]["params"]
        dd = params["ddconfig"]
        known = set(cls.__dataclass_fields__) - {"embed_dim", "n_embed"}
        return cls(embed_dim=params["embed_dim"], n_embed=params["n_embed"], **{k: v for k, v in dd.items() if k in known})

    def to_yaml(self, path: str | Path) -> Path:
        dd = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in ("embed_dim", "n_embed")}
        doc = {"model": {"target": "taming.models.vqgan.VQModel",
                         "params": {"embed_dim": self.embed_dim, "n_embed": self.n_embed, "ddconfig": dd}}}
        Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
        return Path(path)

    def chameleon(self) -> ChameleonVQVAEConfig:
        """The same architecture as transformers' `ChameleonVQVAEConfig` (its encoder is reused here)."""
        return ChameleonVQVAEConfig(
            embed_dim=self.embed_dim, num_embeddings=self.n_embed, double_latent=self.double_z,
            latent_channels=self.z_channels, resolution=self.resolution, in_channels=self.in_channels,
            base_channels=self.ch, channel_multiplier=list(self.ch_mult), num_res_blocks=self.num_res_blocks,
            attn_resolutions=list(self.attn_resolutions), dropout=self.dropout)

    @classmethod
    def from_chameleon(cls, c: ChameleonVQVAEConfig) -> "VQGANConfig":
        return cls(embed_dim=c.embed_dim, n_embed=c.num_embeddings, z_channels=c.latent_channels, resolution=c.resolution,
                   in_channels=c.in_channels, ch=c.base_channels, ch_mult=tuple(c.channel_multiplier),
                   num_res_blocks=c.num_res_blocks, attn_resolutions=tuple(c.attn_resolutions or ()),
                   dropout=c.dropout, double_z=c.double_latent)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """taming `Decoder`: z -> conv_in -> mid (resnet, attn, resnet) -> up levels (lowest resolution first,
    num_res_blocks + 1 resnets each, nearest x2 + conv between levels) -> GroupNorm, swish, conv_out.
    `up[i]` is level i, as in taming (built from the lowest level and prepended), so checkpoint keys match."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        hf = cfg.chameleon()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ChameleonVQVAEEncoderResnetBlock(hf, block_in, block_in)
        self.mid.attn_1 = ChameleonVQVAEEncoderAttnBlock(block_in)
        self.mid.block_2 = ChameleonVQVAEEncoderResnetBlock(hf, block_in, block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ChameleonVQVAEEncoderResnetBlock(hf, block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    up.attn.append(ChameleonVQVAEEncoderAttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, up)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


class VectorQuantizer(nn.Module):
    """Nearest-codebook lookup (taming `VectorQuantizer2`, inference only)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] -> [B, h*w] codes."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        e = self.embedding.weight.float()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).view(z.shape[0], -1)


class VQGAN(nn.Module):
    """Encoder, quantizer and decoder with the parameter names of the released `vqgan.ckpt`."""

    def __init__(self, cfg: VQGANConfig, with_decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = ChameleonVQVAEEncoder(cfg.chameleon())
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg) if with_decoder else None

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, R, R] in [-1, 1] -> [B, embed_dim, g, g] pre-quantisation latents."""
        return self.quant_conv(self.encoder(pixels))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quantize.nearest(self.features(pixels))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, g*g] codes -> [B, 3, R, R] in about [-1, 1]."""
        if self.decoder is None:
            raise RuntimeError("this VQ-GAN was loaded without decoder weights (no vqgan.ckpt / vqgan.safetensors): "
                               "it can encode but not decode; put the released vqgan.ckpt + vqgan.yaml beside the model")
        g = self.cfg.grid
        z = self.quantize.embedding(codes.view(-1, g, g)).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))


def chameleon_policy(size: int = 512) -> ImagePolicy:
    """Chameleon's image tokenizer: shortest side to `size` (LANCZOS), centre crop."""
    return ImagePolicy(kind="center_crop", size=size, resample="lanczos")


def to_pixels(images, policy: ImagePolicy) -> torch.Tensor:
    """Images (any sizes / modes) -> [B, 3, S, S] float in [-1, 1] through `policy`."""
    batch = policy.apply_batch(images)
    return torch.tensor(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # a copy: policy outputs may be read-only


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class VQGANTokenizer:
    """`ImageTokenizer` over a frozen `VQGAN`; codes are raw codebook indices (no vocabulary offset). `policy`
    (Chameleon's crop by default; the liquid backend sets its padding recipe) turns any image into the input."""

    def __init__(self, vqgan: VQGAN, batch_size: int = 8, policy: ImagePolicy | None = None):
        self.vqgan = vqgan.eval().requires_grad_(False)  # frozen explicitly: .eval() alone keeps requires_grad
        self.batch_size = batch_size
        self.codebook_size = vqgan.cfg.n_embed
        self.tokens_per_image = vqgan.cfg.grid ** 2
        self.image_size = vqgan.cfg.resolution
        self.policy = policy or chameleon_policy(self.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.vqgan.parameters()).device

    def to(self, device: str | torch.device) -> "VQGANTokenizer":
        self.vqgan.to(device)
        return self

    def _chunks(self, images):
        for i in range(0, len(images), self.batch_size):
            yield to_pixels(images[i: i + self.batch_size], self.policy).to(self.device, self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vqgan.parameters()).dtype

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        out = [self.vqgan.encode(x).cpu() for x in self._chunks(images)]
        return torch.cat(out) if out else torch.zeros((0, self.tokens_per_image), dtype=torch.long)

    @torch.inference_mode()
    def features(self, images) -> torch.Tensor:
        out = [self.vqgan.features(x).flatten(2).transpose(1, 2).float().cpu() for x in self._chunks(images)]
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        codes = torch.as_tensor(codes).reshape(-1, self.tokens_per_image)
        if len(codes) and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes out of range [0, {self.codebook_size})")
        out = [to_uint8(self.vqgan.decode(c.to(self.device))) for c in codes.split(self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)

    # ---- persistence -------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: VQGANConfig | None = None, seed: int = 0) -> "VQGANTokenizer":
        """Random weights (tests, GPU smoke)."""
        torch.manual_seed(seed)
        return cls(VQGAN(cfg or VQGANConfig.tiny()))

    @classmethod
    def load(cls, path: str | Path, policy: ImagePolicy | None = None) -> "VQGANTokenizer":
        """From a directory with vqgan.yaml + vqgan.safetensors (or a vqgan.ckpt that loads with
        `weights_only=True`; a Lightning checkpoint needs `dynboot convert-vqgan` once), or the yaml's path."""
        path = Path(path)
        folder = path.parent if path.suffix == ".yaml" else path
        cfg_file = path if path.suffix == ".yaml" else folder / YAML_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{folder}: no {YAML_NAME} (the taming config released with Chameleon's vqgan.ckpt)")
        state = read_state_dict(folder)
        vq = VQGAN(VQGANConfig.from_yaml(cfg_file), with_decoder=any(k.startswith("decoder.") for k in state))
        missing, _ = vq.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{folder}: VQ-GAN weights lack {len(missing)} parameters, e.g. {missing[:3]}")
        return cls(vq, policy=policy)

    @classmethod
    def from_chameleon(cls, vqmodel: nn.Module) -> "VQGANTokenizer":
        """Encode-only tokenizer from a transformers `ChameleonVQVAE` (an HF Chameleon checkpoint carries the
        encoder, quantizer and convs but no decoder)."""
        vq = VQGAN(VQGANConfig.from_chameleon(vqmodel.config), with_decoder=False)
        vq.load_state_dict({k: v.float() for k, v in vqmodel.state_dict().items()}, strict=True)
        return cls(vq.to(next(vqmodel.parameters()).device))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vqgan.cfg.to_yaml(path / YAML_NAME)
        state = {k: v.detach().cpu().contiguous() for k, v in self.vqgan.state_dict().items()}
        save_file(state, str(path / SAFETENSORS_NAME))
        return path


def locate_vqgan(candidates: list) -> Path | None:
    """The first candidate (a directory with vqgan.yaml, or the yaml itself) that exists. The first
    candidate is an explicit user choice: if it is given and wrong, that is an error, not a fall-through."""
    for i, c in enumerate(candidates):
        if c is None:
            continue
        c = Path(c)
        if (c.suffix == ".yaml" and c.is_file()) or (c / YAML_NAME).is_file():
            return c
        if i == 0:
            raise FileNotFoundError(f"vqgan_path {str(c)!r}: no {YAML_NAME} there")
    return None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """VQ-GAN weights from vqgan.safetensors, else from vqgan.ckpt loaded with `weights_only=True` (tensors and
    plain containers only: nothing in the file can run code). A checkpoint that needs more than that is never
    unpickled here; `dynboot convert-vqgan` converts a trusted one once, with an explicit allow-list."""
    if (folder / SAFETENSORS_NAME).is_file():
        return load_file(str(folder / SAFETENSORS_NAME))
    ckpt = folder / CKPT_NAME
    if not ckpt.is_file():
        raise FileNotFoundError(f"{folder}: no {SAFETENSORS_NAME} or {CKPT_NAME}")
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{ckpt} is not a plain tensor checkpoint (it pickles Python objects: {_first_line(err)}); "
                         f"it is never unpickled on load. If it is the trusted Chameleon/Anole release, convert it "
                         f"once: `dynboot convert-vqgan ckpt={ckpt}` (writes {SAFETENSORS_NAME} beside it)") from None
    return _weights(raw)


def _weights(raw) -> dict[str, torch.Tensor]:
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a VQ-GAN checkpoint: expected a state dict of tensors (under 'state_dict')")
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def _first_line(err: Exception) -> str:
    text = str(err)
    for line in text.splitlines():
        if "Unsupported" in line or "GLOBAL" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(err).__name__
