"""mergekit-style YAML merge configurations: parsing, validation and parameter settings.

A config is the YAML that ``mergekit-yaml`` takes::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code
        parameters:
          weight: [0.2, 0.8]          # a gradient over the layers
          density:
            - filter: mlp             # the first filter contained in the tensor name wins
              value: 0.3
            - value: 0.6
    parameters: {normalize: true}
    dtype: float32

Every key is checked here, before any checkpoint is opened: an unknown or unsupported key is an
error that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "name"}
UNSUPPORTED_TOP = {
    "modules": "multi-module configs are not supported; merge each module with its own config",
    "tokenizer": "the 'tokenizer' section (vocabulary surgery) is not supported; use tokenizer_source: base or a model",
    "chat_template": "chat_template is not supported; edit tokenizer_config.json of the output",
}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float64": torch.float64}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


@dataclass
class Source:
    """One input of an output slice: a model reference, its layer range (None: all) and parameters."""

    model: str
    layer_range: Optional[Tuple[int, int]] = None
    parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OutSlice:
    sources: List[Source]
    base_model: Optional[str] = None
    parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    merge_method: str
    slices: List[OutSlice]
    base_model: Optional[str] = None
    parameters: Dict[str, Any] = field(default_factory=dict)
    dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None
    tokenizer_source: Optional[str] = None
    uses_slices: bool = False
    raw: Dict[str, Any] = field(default_factory=dict)
    base_dir: Optional[str] = None  # the config file's folder (relative model paths are tried there too)

    def models(self) -> List[str]:
        """Every model reference, base first, in order of appearance, without repeats."""
        out = [self.base_model] if self.base_model else []
        for s in self.slices:
            if s.base_model:
                out.append(s.base_model)
            out += [src.model for src in s.sources]
        return list(dict.fromkeys(out))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _dtype(value, key: str) -> Optional[torch.dtype]:
    if value is None:
        return None
    d = DTYPE_NAMES.get(str(value).lower())
    if d is None:
        raise ConfigError(f"{key}: unknown dtype {value!r}; use float32, bfloat16, float16 or float64")
    return d


def _model_ref(value, where: str) -> str:
    if isinstance(value, dict):  # mergekit's long form {model: {path: ...}} or {path: ...}
        inner = value.get("model", value)
        if isinstance(inner, dict):
            extra = set(inner) - {"path", "revision"}
            if extra or "path" not in inner:
                raise ConfigError(f"{where}: unsupported model reference {value!r}; give a folder or a repo name")
            return inner["path"] + (f"@{inner['revision']}" if inner.get("revision") else "")
        value = inner
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: a model must be a folder or a repo name, got {value!r}")
    return value.strip()


def _params(value, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: parameters must be a mapping of names to values, got {value!r}")
    for k, v in value.items():
        _check_setting(v, f"{where}.{k}")
    return dict(value)


def _check_setting(v, where: str) -> None:
    """A setting is a scalar, a list of scalars (a gradient), or a list of {filter, value} items."""
    if isinstance(v, (bool, int, float, str)):
        return
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list):
        if not v:
            raise ConfigError(f"{where}: an empty list is not a value")
        if all(isinstance(e, (bool, int, float, str)) for e in v):
            return
        for e in v:
            if not isinstance(e, dict) or "value" not in e or set(e) - {"filter", "value"}:
                raise ConfigError(f"{where}: a conditional value must be {{filter: NAME, value: V}}, got {e!r}")
            if e.get("filter") is not None and not isinstance(e["filter"], str):
                raise ConfigError(f"{where}: a filter must be a string, got {e['filter']!r}")
            _check_setting(e["value"], where)
        return
    raise ConfigError(f"{where}: unsupported value {v!r}")


def parse_config(data: Dict[str, Any], base_dir: Optional[str] = None) -> MergeConfig:
    """Validate a config mapping (the loaded YAML) into a :class:`MergeConfig`."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping with at least merge_method and models (or slices)")
    for k in data:
        if k in UNSUPPORTED_TOP:
            raise ConfigError(f"unsupported key '{k}': {UNSUPPORTED_TOP[k]}")
        if k not in TOP_KEYS:
            raise ConfigError(f"unknown key '{k}' in the config; the keys are {', '.join(sorted(TOP_KEYS))}")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError("merge_method is missing; e.g. merge_method: ties")
    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        raise ConfigError("give exactly one of 'models' and 'slices'")
    base = _model_ref(data["base_model"], "base_model") if data.get("base_model") is not None else None
    slices: List[OutSlice] = []
    if has_models:
        models = data["models"]
        if not isinstance(models, list) or not models:
            raise ConfigError("models must be a non-empty list of {model: ..., parameters: ...} entries")
        srcs = []
        for i, m in enumerate(models):
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
                bad = sorted(set(m) - {"model", "parameters"}) if isinstance(m, dict) else None
                raise ConfigError(f"models[{i}]: " + (f"unknown key '{bad[0]}'" if bad else "needs a 'model' key"))
            srcs.append(Source(_model_ref(m["model"], f"models[{i}].model"), None,
                               _params(m.get("parameters"), f"models[{i}].parameters")))
        slices.append(OutSlice(srcs))
    else:
        if not isinstance(data["slices"], list) or not data["slices"]:
            raise ConfigError("slices must be a non-empty list of {sources: [...]} entries")
        for j, s in enumerate(data["slices"]):
            if not isinstance(s, dict) or "sources" not in s:
                raise ConfigError(f"slices[{j}] needs a 'sources' list")
            for k in s:
                if k not in ("sources", "base_model", "parameters"):
                    raise ConfigError(f"slices[{j}]: unknown or unsupported key '{k}'")
            srcs = []
            for i, src in enumerate(s["sources"] or []):
                where = f"slices[{j}].sources[{i}]"
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise ConfigError(f"{where} needs 'model' and 'layer_range'")
                for k in src:
                    if k not in ("model", "layer_range", "parameters"):
                        raise ConfigError(f"{where}: unknown key '{k}'")
                lr = src["layer_range"]
                if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(x, int) for x in lr)
                        or not 0 <= lr[0] < lr[1]):
                    raise ConfigError(f"{where}.layer_range must be [start, end) with 0 <= start < end, got {lr!r}")
                srcs.append(Source(_model_ref(src["model"], f"{where}.model"), (lr[0], lr[1]),
                                   _params(src.get("parameters"), f"{where}.parameters")))
            if not srcs:
                raise ConfigError(f"slices[{j}].sources is empty")
            lens = {src.layer_range[1] - src.layer_range[0] for src in srcs}
            if len(lens) != 1:
                raise ConfigError(f"slices[{j}]: all sources of a slice must span the same number of layers, got "
                                  f"{sorted(lens)}")
            sb = _model_ref(s["base_model"], f"slices[{j}].base_model") if s.get("base_model") else None
            slices.append(OutSlice(srcs, sb, _params(s.get("parameters"), f"slices[{j}].parameters")))
    ts = data.get("tokenizer_source")
    if ts is not None:
        if ts == "union":
            raise ConfigError("tokenizer_source: union (vocabulary merging) is not supported; use base or a model")
        ts = ts if ts == "base" else _model_ref(ts, "tokenizer_source")
    return MergeConfig(
        merge_method=method.strip(), slices=slices, base_model=base,
        parameters=_params(data.get("parameters"), "parameters"),
        dtype=_dtype(data.get("dtype"), "dtype"), out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
        tokenizer_source=ts, uses_slices=has_slices, raw=data, base_dir=base_dir)


def load_config(config) -> MergeConfig:
    """A :class:`MergeConfig` from a path to a YAML file, a YAML string, a mapping, or itself."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    text, base_dir = config, None
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        base_dir = os.path.dirname(os.path.abspath(config))
        with open(config) as f:
            text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"the config is not valid YAML: {e}") from None
    if isinstance(data, str):
        raise ConfigError(f"config file not found: {config}")
    return parse_config(data, base_dir)


# ------------------------------------------------------------------------------- settings

def evaluate(setting, tensor_name: str, t: float, numeric: bool):
    """The value of a setting for one tensor at layer position ``t`` in [0, 1].

    A list of numbers is a gradient: interpolated linearly at ``t * (len - 1)``. A list of
    non-numbers picks the entry at ``int(t * (len - 1))``. A list of ``{filter, value}`` items takes the
    first whose filter is absent, ``*``, or contained in the tensor name (None when none matches).
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if numeric and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            pos = t * (len(setting) - 1)
            i0 = int(pos)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = pos - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(cond["value"], tensor_name, t, numeric)
    return None
