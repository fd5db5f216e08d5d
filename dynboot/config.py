"""One config mechanism for every command: typed pydantic models, YAML file + `key=value` overrides.

    cfg = load_config(RelabelConfig, ["jobs/configs/relabel.yaml", "batch_size=32", "out=runs/x"])

Rules (the same for every command):
- every field has a default and a description (`Config.help()` prints them);
- a YAML file is optional; `key=value` overrides follow it, dotted keys reach nested models (`lora.rank=8`);
- values are parsed as YAML scalars (`true`, `3`, `0.5`, `[a, b]`), then validated by the field's type;
- an unknown key, a wrong type or an out-of-range value raises `ConfigError` naming the field;
- the resolved config is written to the run directory as `config.yaml` (`save_config`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "save_config"]


class ConfigError(ValueError):
    """A config file or override that does not fit the command's config model."""


class Config(BaseModel):
    """Base of every command's config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    # Operational fields a rerun may change without starting a different run (cluster address, actor counts,
    # progress interval...); any other difference from the recorded config.yaml stops a rerun (dynboot.io.rundir).
    rerun_may_change: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def help(cls) -> str:
        """One line per field (nested fields dotted): name, type, default, description."""
        return "\n".join(_help_lines(cls, prefix=""))


C = TypeVar("C", bound=Config)


def _help_lines(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(_help_lines(ann, prefix=f"{prefix}{name}."))
            continue
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        lines.append(f"  {prefix}{name}: {type_name} = {field.default!r}\n      {field.description or ''}")
    return lines


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a=1", "b.c=x"]` -> `{"a": 1, "b": {"c": "x"}}`; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item or item.startswith("-"):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} reaches into a non-mapping key {part!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_keys(model: type[BaseModel], data: dict[str, Any], prefix: str = "") -> None:
    """Name an unknown key together with the valid ones (pydantic's message does not list them)."""
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint}; valid keys: {', '.join(prefix + f for f in fields)}"
            )
        ann = fields[key].annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(ann, value, prefix=f"{prefix}{key}.")


def build_config(cls: type[C], data: dict[str, Any]) -> C:
    _check_keys(cls, data)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            problems.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems)) from None


def load_config(cls: type[C], args: list[str] | None = None) -> C:
    """Build `cls` from an optional leading YAML path followed by `key=value` overrides."""
    args = list(args or [])
    data: dict[str, Any] = {}
    if args and "=" not in args[0]:
        path = Path(args.pop(0))
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(loaded).__name__}")
        data = loaded
    return build_config(cls, _merge(data, parse_overrides(args)))


def save_config(cfg: Config, run_dir: str | Path) -> str:
    """Write the resolved config as `config.yaml` in the run directory (a local path or a URI)."""
    from dynboot.io import storage

    path = storage.join(str(run_dir), "config.yaml")
    storage.write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
