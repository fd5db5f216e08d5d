"""What the Hugging Face backends (liquid, anole, janus) share beyond the interface core (core.py): their
dynboot.json, saving, loading, LoRA targets and the token budget. A family file keeps only its own pieces
(network class, special tokens, image tokenizer, preset sizes) and `_assemble` (parts -> model).

Checkpoint directory (local files only):
- the base network in the Hugging Face layout (config.json, model*.safetensors), the text tokenizer files;
- `adapter/`: a PEFT LoRA adapter as PEFT saves it (adapter_config.json + adapter_model.safetensors, the
  `modules_to_save` copies included), when the network is LoRA-wrapped;
- `dynboot.json`: backend, prompt text, options (guidance_scale, special-token names, max_tokens, ...), the
  image policy, and `base_model_path` when the directory holds only an adapter.

Saving writes what changed: a LoRA-wrapped model whose base came from a directory (`base_path`) saves only its
adapter and points at that base (the frozen 7B base is never copied again); `merged=True` writes one plain
model with the adapter folded in (in `dtype`, e.g. bfloat16), merging in place and unmerging afterwards, so no
second copy of the weights is made. Loading builds the network on the meta device and fills it in its dtype on
its device (bfloat16 on accelerators): no fp32 copy on the CPU first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from dynboot.io import storage
from dynboot.io.images import ImagePolicy
from dynboot.models.heads import DEFAULT_LOGIT_CHUNK, ReadoutMixin, make_selective
from dynboot.models.hf_parts import PromptText, known_options, language_model_projections, load_dtype, unwrap
from dynboot.models.registry import checkpoint_description
from dynboot.io.rundir import write_json

ADAPTER_DIR = "adapter"
DEFAULT_MAX_TOKENS = 32768  # tokens per forward on a CPU or an unknown device (~16 GB of a 7B model's bf16 KV cache)
Budget = int | None | Literal["auto"]  # max_tokens setting: a number, unbounded, or sized to the free GPU memory


# ---- networks ----------------------------------------------------------------------------------------------
_CAUSAL: dict[type, type] = {}


def causal_lm_class(config) -> type:
    """The transformers causal-LM class of `config` (Gemma for Liquid) with readouts (heads.py) added."""
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if base not in _CAUSAL:
        class Net(ReadoutMixin, base):
            def __init__(self, config, *args, **kwargs):
                super().__init__(config, *args, **kwargs)
                make_selective(self.lm_head)

            def backbone(self, **inputs):
                return self.model(**inputs)

        Net.__name__ = Net.__qualname__ = f"Readout{base.__name__}"
        _CAUSAL[base] = Net
    return _CAUSAL[base]


# ---- the token budget ------------------------------------------------------------------------------------------
def bytes_per_token(net: nn.Module) -> int:
    """What one token in a forward costs a model beyond its weights, at most: its KV cache entries in every layer
    plus the activations of one layer (q, k, v, attention output, residual; gate, up, product of the MLP)."""
    cfg = unwrap(net).config.get_text_config()
    size = next(net.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim
    return size * (kv + 6 * cfg.hidden_size + 3 * cfg.intermediate_size)


def resolve_budget(setting: Budget, net: nn.Module) -> int | None:
    """`auto`: the tokens that fit 85% of the device's free memory (after the weights) less two logit chunks;
    on a CPU, DEFAULT_MAX_TOKENS. A number or None is used as given."""
    if setting != "auto":
        return setting
    device = next(net.parameters()).device
    if device.type != "cuda":
        return DEFAULT_MAX_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    return max(2048, int((0.85 * free - 8 * DEFAULT_LOGIT_CHUNK) // bytes_per_token(net)))


# ---- adapters ----------------------------------------------------------------------------------------------
def base_state_dict(net: PeftModel, merged: bool = False) -> dict[str, torch.Tensor]:
    """The base model's weights with PEFT's wrappers removed (keys as in the original checkpoint). `merged`:
    after `merge_adapter()`, with the trained `modules_to_save` copies in place of the originals."""
    out = {}
    drop, keep = (".original_module.", ".modules_to_save.default.") if merged else (".modules_to_save.", ".original_module.")
    for key, value in net.get_base_model().state_dict().items():
        if "lora_" in key or drop in key:
            continue
        out[key.replace(".base_layer.", ".").replace(keep, ".")] = value
    return out


def attach_adapter(net: nn.Module, path: Path, trainable: bool = False) -> nn.Module:
    adapter = path / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return net
    return PeftModel.from_pretrained(net, str(adapter), is_trainable=trainable)


def base_dir(path: Path, desc: dict) -> Path:
    """Where the base weights of checkpoint `path` live (itself, or dynboot.json's `base_model_path`)."""
    if (path / "config.json").is_file():
        return path
    if desc.get("base_model_path"):
        return storage.local_model_dir(desc["base_model_path"])
    raise FileNotFoundError(f"{path}: no config.json and no base_model_path in dynboot.json")


def from_pretrained(cls, root: Path, device: str | torch.device, dtype: torch.dtype, **kw) -> nn.Module:
    """`cls.from_pretrained` straight onto `device` in `dtype` (meta-device init, no CPU fp32 detour)."""
    device_map = None if torch.device(device).type == "cpu" else {"": str(device)}
    return cls.from_pretrained(root, local_files_only=True, dtype=dtype, device_map=device_map, **kw)


# ---- the shared backend layer ------------------------------------------------------------------------------
class HFBackend:
    """Mixed into a family's model class (before the core): dynboot.json, save, load, LoRA targets."""

    OPTIONS: tuple[str, ...] = ("guidance_scale", "boi_token", "eoi_token", "max_tokens")
    LAYERS_PREFIX = "model.layers."
    base_path: str | None = None  # where the base weights were loaded from, a directory or URI (None: built in memory)

    # ---- per family ----------------------------------------------------------------------------------------
    @classmethod
    def load_net(cls, root: Path, device, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def _assemble(cls, net, text_tokenizer, *, path: Path, root: Path, prompts: PromptText, policy: ImagePolicy | None,
                  source: str, options: dict, **load_kw) -> "HFBackend":
        raise NotImplementedError

    def _save_image_tokenizer(self, path: Path) -> None:
        """Image-tokenizer files that are not part of the network (the VQ-GAN of liquid / anole)."""

    # ---- shared ----------------------------------------------------------------------------------------------
    def lora_target_modules(self) -> list[str]:
        return language_model_projections(self.net, self.LAYERS_PREFIX)

    def options(self) -> dict:
        """What dynboot.json records (the budget as set, e.g. "auto", not as resolved on this device)."""
        return {k: (getattr(self, "budget_setting", self.max_tokens) if k == "max_tokens" else getattr(self, k))
                for k in self.OPTIONS}

    def describe(self) -> dict:
        return {"backend": self.backend, "prompts": vars(self.prompts), "options": self.options(),
                "image_policy": self.tokenizer.policy.model_dump(mode="json")}

    def save(self, path: str | Path, include_base: bool | None = None, base_model_path: str | None = None,
             merged: bool = False, dtype: str | torch.dtype | None = None) -> Path:
        """Write a loadable checkpoint directory.

        - plain network: the whole model (in `dtype` if given);
        - LoRA-wrapped, `merged=True`: one plain model with the adapter folded in (in `dtype`, e.g. bfloat16);
        - LoRA-wrapped: the adapter, plus the base weights only if `include_base` (default: only when the base
          is not already on disk, i.e. the model was built in memory); otherwise dynboot.json names the base
          directory (`base_model_path`, default the one it was loaded from)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cast = None if dtype is None else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        desc = self.describe()
        net = self.net
        if not isinstance(net, PeftModel):
            if include_base is False:
                raise ValueError("include_base=False needs a LoRA-wrapped net (there is no adapter to save on its own)")
            _save_base(net, path, None, cast)
        elif merged:
            net.merge_adapter()
            try:
                _save_base(net.get_base_model(), path, base_state_dict(net, merged=True), cast)
            finally:
                net.unmerge_adapter()
        else:
            if include_base is None:
                include_base = self.base_path is None
            if include_base:
                _save_base(net.get_base_model(), path, base_state_dict(net), cast)
            else:
                base = base_model_path or self.base_path
                if not base:
                    raise ValueError("include_base=False needs base_model_path (the directory holding the base weights)")
                desc["base_model_path"] = str(base) if storage.is_uri(str(base)) else str(Path(base).resolve())
            net.save_pretrained(path / ADAPTER_DIR)
        self.text_tokenizer.save_pretrained(path)
        self._save_image_tokenizer(path)
        write_json(path / "dynboot.json", desc)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None,
             trainable_adapter: bool = False, origin: str | None = None, **overrides: object) -> "HFBackend":
        """A local checkpoint directory (dynboot's, or a released one; `origin`: the URI it was fetched from);
        `overrides` may set any of `OPTIONS` and the family's load keywords (e.g. `vqgan_path=`)."""
        path = Path(path)
        desc = checkpoint_description(path)
        root = base_dir(path, desc)
        load_kw = {k: overrides.pop(k) for k in list(overrides) if k in getattr(cls, "LOAD_KEYWORDS", ())}
        net = cls.load_net(root, device, load_dtype(device, dtype))
        net = attach_adapter(net, path, trainable_adapter).eval()
        tok_dir = path if (path / "tokenizer_config.json").is_file() else root
        text_tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        options = {**desc.get("options", {}), **known_options(cls, overrides)}
        policy = ImagePolicy.model_validate(desc["image_policy"]) if "image_policy" in desc else None
        model = cls._assemble(net, text_tokenizer, path=path, root=root, prompts=PromptText(**desc.get("prompts", {})),
                              policy=policy, source=path.name, options=options, device=device, **load_kw)
        model.base_path = desc.get("base_model_path") or origin or str(path)
        return model


def _save_base(net: nn.Module, path: Path, state: dict | None, dtype: torch.dtype | None) -> None:
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in (state or net.state_dict()).items()}
    net.save_pretrained(path, state_dict=state)


def config_of(root: Path):
    return AutoConfig.from_pretrained(root, local_files_only=True)
