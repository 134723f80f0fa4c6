"""From a config and the safetensors headers to a list of per-tensor merge items, before any weight
is read.

Every check that can fail runs here: the models resolve to folders, their headers parse, the
architectures agree (or ``allow_crimes``), every input tensor exists with the same shape (and dtype,
unless the config sets ``dtype``), the method exists and takes these inputs, and every parameter of
every tensor resolves to a valid value.

Layers: a tensor whose name holds ``<container>.<i>.`` (container one of ``layers``, ``h``,
``blocks``, ``block``, ``layer``, ``resblocks``) belongs to layer ``i`` of that container. A layer
gradient is evaluated at ``t = i / (L - 1)`` (L the number of layers of the output); every other
tensor has ``t = 0``. With ``slices``, the output layers are the slices' layers in order, renumbered
from 0, and the non-layer tensors come from the first slice's sources.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import methods as M
from .config import ConfigError, MergeConfig, Source, evaluate
from .io import FLOAT_DTYPES, Checkpoint, CheckpointError, OutTensor, resolve_model

LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|block|layer|resblocks)\.(\d+)\.")


class PlanError(ValueError):
    """A merge that cannot run, found before any weight is read."""


def split_layer(name: str) -> Optional[Tuple[str, int, str]]:
    """``model.layers.3.mlp.up_proj.weight`` -> (``model.layers.``, 3, ``mlp.up_proj.weight``)."""
    m = LAYER_RE.search(name)
    if not m:
        return None
    head = name[: m.end(2) + 1]
    return head, int(m.group(3)), name[m.end():]


def layer_counts(names) -> Dict[str, int]:
    """Number of layers (max index + 1) of each layer container."""
    out: Dict[str, int] = {}
    for n in names:
        s = split_layer(n)
        if s:
            out[s[0]] = max(out.get(s[0], 0), s[1] + 1)
    return out


def _is_pre(name: str, before_layers: bool) -> bool:
    """Whether a non-layer tensor belongs before the layers (embeddings) or after them (final norm,
    output head): by its name where it says, else by its place in the reference checkpoint."""
    low = name.lower()
    if "embed" in low or "pre_" in low or ".pre" in low:
        return True
    if any(k in low for k in ("lm_head", "norm", "head", "final", "post", "pooler", "classifier", "score")):
        return False
    return before_layers


@dataclass
class Item:
    """One output tensor: where its inputs come from and its resolved parameters."""

    out_name: str
    shape: Tuple[int, ...]
    out_dtype: torch.dtype
    base: Optional[Tuple[str, str]]  # (model, tensor name) or None
    inputs: List[Tuple[str, str]]  # (model, tensor name) of the non-base inputs
    shared: Dict[str, Any]
    per: List[Dict[str, Any]]
    t: float
    copy: bool = False  # a non-float tensor: copied from the reference model
    in_bytes: int = 0
    work_bytes: int = 0  # peak extra bytes while merging this tensor (float32 temporaries)


@dataclass
class Plan:
    config: MergeConfig
    method: M.Method
    folders: Dict[str, str]  # model reference -> folder
    checkpoints: Dict[str, Checkpoint]
    items: List[Item]
    reference_model: str
    layers_out: Dict[str, int] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)  # config problems that do not stop the merge

    @property
    def in_bytes(self) -> int:
        return sum(i.in_bytes for i in self.items)

    @property
    def out_bytes(self) -> int:
        return sum(o.nbytes for o in self.out_tensors())

    def out_tensors(self) -> List[OutTensor]:
        return [OutTensor(i.out_name, i.out_dtype, i.shape) for i in self.items]

    def peak_bytes(self, prefetch_bytes: int, queue_bytes: int, chunk: int) -> int:
        """Memory the merge will hold at most besides the runtime: the mapped inputs of the chunk being
        merged (a whole tensor when it is one chunk), the float32 temporaries of methods without a
        fused pass, the prefetched inputs and the output pieces waiting for the disk."""
        best = 0
        for it in self.items:
            n = max(1, math.prod(it.shape))
            share = min(1.0, chunk / n) if (self.method.gta or self.method.name == "linear") else 1.0
            best = max(best, int(it.in_bytes * share) + it.work_bytes)
        return best + prefetch_bytes + queue_bytes

    def close(self) -> None:
        for c in self.checkpoints.values():
            c.close()


def _model_config(folder: str) -> dict:
    p = os.path.join(folder, "config.json")
    if not os.path.exists(p):
        return {}
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PlanError(f"{p} is not valid JSON ({e}); fix or remove it") from None


def _arch(cfg: dict) -> Optional[str]:
    a = cfg.get("architectures")
    if isinstance(a, list) and a:
        return str(a[0])
    return cfg.get("model_type")


class _Resolver:
    """Parameter values for one tensor, with mergekit's precedence: the model's own parameters, then
    the slice's, then the top-level ones, then the method's default."""

    def __init__(self, cfg: MergeConfig, method: M.Method):
        self.cfg = cfg
        self.method = method
        known = {p.name for p in method.params}
        self.unused: List[str] = []
        for where, params in self._all_params():
            for k in params:
                if k not in known:  # mergekit ignores these; we say so
                    self.unused.append(f"{where}: parameter '{k}' is not used by merge_method {method.name} (its "
                                       f"parameters are {', '.join(sorted(known)) or 'none'}); ignored")

    def _all_params(self):
        yield "parameters", self.cfg.parameters
        for j, s in enumerate(self.cfg.slices):
            yield f"slices[{j}].parameters", s.parameters
            for i, src in enumerate(s.sources):
                where = f"models[{i}].parameters" if not self.cfg.uses_slices else f"slices[{j}].sources[{i}].parameters"
                yield where, src.parameters

    def value(self, p: M.Param, scopes: List[Dict[str, Any]], tensor: str, t: float, who: str):
        for sc in scopes:
            if p.name in sc:
                v = evaluate(sc[p.name], tensor, t, numeric=p.kind is float)
                if v is not None:
                    return self._check(p, v, tensor, who)
        if p.default is M.REQUIRED:
            raise ConfigError(f"{who}: missing parameter '{p.name}' for tensor {tensor} (merge_method "
                              f"{self.method.name}); add it to the model's parameters or to the top-level parameters")
        return p.default

    def _check(self, p: M.Param, v, tensor: str, who: str):
        if p.kind is str:
            allowed = {"scope": ("tensor", "global")}.get(p.name)
            if not isinstance(v, str) or (allowed and v not in allowed):
                raise ConfigError(f"{who}: parameter '{p.name}' must be one of {', '.join(allowed or ())}, got {v!r}")
            return v
        if p.kind is bool:
            if isinstance(v, str) and v.lower() in ("true", "false"):
                v = v.lower() == "true"
            if not isinstance(v, bool):
                raise ConfigError(f"{who}: parameter '{p.name}' must be true or false, got {v!r}")
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ConfigError(f"{who}: parameter '{p.name}' must be a number, got {v!r}")
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"{who}: parameter '{p.name}' must be a number, got {v!r}") from None
        if p.name == "density" and not 0 < v <= 1:
            raise ConfigError(f"{who}: density {v} for tensor {tensor} is outside (0, 1]; use a fraction of entries "
                              f"to keep, e.g. 0.5")
        if p.name in ("gamma", "epsilon") and not 0 <= v < 1:
            raise ConfigError(f"{who}: {p.name} {v} for tensor {tensor} is outside [0, 1)")
        return v

    def shared(self, sl, tensor: str, t: float) -> Dict[str, Any]:
        scopes = [sl.parameters, self.cfg.parameters]
        return {p.name: self.value(p, scopes, tensor, t, "parameters") for p in self.method.params if p.scope == "shared"}

    def per_input(self, sl, src: Source, tensor: str, t: float, is_base: bool) -> Dict[str, Any]:
        scopes = [src.parameters, sl.parameters, self.cfg.parameters]
        out = {}
        for p in self.method.params:
            if p.scope == "input" or (p.scope == "non_base" and not is_base):
                out[p.name] = self.value(p, scopes, tensor, t, f"model {src.model}")
        if (self.method.gta or {}).get("sparsification") == "della" and out.get("density", 1.0) < 1:
            d, e = out["density"], out["epsilon"]
            if not (0 < d - e and d + e < 1):  # mergekit 0.1.5 refuses these too
                raise ConfigError(f"model {src.model}: DELLA's keep probabilities density +/- epsilon "
                                  f"({d} +/- {e}) for tensor {tensor} must lie inside (0, 1); lower epsilon")
        return out


def build_plan(cfg: MergeConfig, *, allow_crimes: bool = False) -> Plan:
    """Resolve the models, read their headers, and plan every output tensor (raises on any problem)."""
    method = M.METHODS.get(cfg.merge_method)
    if method is None:
        raise ConfigError(f"unknown merge_method '{cfg.merge_method}'; fastmerge implements "
                          f"{', '.join(sorted(M.METHODS))}")
    resolver = _Resolver(cfg, method)
    folders = {m: resolve_model(m, cfg.base_dir) for m in cfg.models()}
    ckpts: Dict[str, Checkpoint] = {}
    try:
        for m, f in folders.items():
            ckpts[m] = Checkpoint(f, m)
            ckpts[m].check_index()
        plan = _plan_items(cfg, method, resolver, folders, ckpts, allow_crimes)
    except BaseException:
        for c in ckpts.values():
            c.close()
        raise
    return plan


def _inputs_of(cfg: MergeConfig, method: M.Method, sl) -> Tuple[Optional[Source], List[Source]]:
    """The base source and the non-base sources of a slice, per the method's contract."""
    base_ref = sl.base_model or cfg.base_model
    base_src = None
    others: List[Source] = []
    for src in sl.sources:
        if base_ref is not None and src.model == base_ref and base_src is None:
            base_src = src
        else:
            others.append(src)
    if method.base == "optional":
        # linear / passthrough: every listed model is an input, and so is a base_model that is not listed
        # (as mergekit does: it then needs its own weight, e.g. from the top-level parameters)
        inputs = list(sl.sources) + ([Source(base_ref, None, {})] if base_ref is not None and base_src is None else [])
        if method.max_inputs is not None and len(inputs) > method.max_inputs:
            raise ConfigError(f"merge_method {method.name} takes {method.max_inputs} model per output tensor, got "
                              f"{len(inputs)} ({', '.join(s.model for s in inputs)}); use slices with one source each "
                              f"and no base_model")
        return None, inputs
    if base_ref is None:
        raise ConfigError(f"merge_method {method.name} needs a base_model")
    if base_src is None:
        if cfg.uses_slices:
            raise ConfigError(f"merge_method {method.name}: the base model {base_ref} must be one of each slice's sources "
                              f"(it gives the layer range of the base)")
        base_src = Source(base_ref, None, {})
    if len(others) < method.min_inputs:
        raise ConfigError(f"merge_method {method.name} needs at least {method.min_inputs} model(s) besides the base, "
                          f"got {len(others)}")
    if method.max_inputs is not None and len(others) > method.max_inputs:
        raise ConfigError(f"merge_method {method.name} takes at most {method.max_inputs} model(s) besides the base, "
                          f"got {len(others)}")
    return base_src, others


def _plan_items(cfg: MergeConfig, method: M.Method, resolver: _Resolver, folders, ckpts, allow_crimes) -> Plan:
    ref = cfg.base_model or cfg.slices[0].sources[0].model
    ref_cfg = _model_config(folders[ref])
    ref_arch = _arch(ref_cfg)
    if not allow_crimes:
        for m, f in folders.items():
            a = _arch(_model_config(f))
            if a != ref_arch and a is not None and ref_arch is not None:
                raise PlanError(f"model {m} is a {a}, but {ref} is a {ref_arch}: merging different architectures is "
                                f"refused; pass --allow-crimes to merge them anyway")
    for sl in cfg.slices:
        _inputs_of(cfg, method, sl)  # the method's input contract, checked once per slice
    ref_ck = ckpts[ref]
    names = sorted(ref_ck.tensors, key=lambda n: (ref_ck.tensors[n].file, ref_ck.tensors[n].start))
    # an untied output head in some input is merged even when the reference model ties it
    heads = {n for c in ckpts.values() for n in c.tensors if n.endswith("lm_head.weight")} - set(names)
    names += sorted(heads)
    counts = layer_counts(names)
    items: List[Item] = []
    layers_out: Dict[str, int] = {}

    def add(out_name: str, sl, src_names: Dict[str, str], t: float):
        base_src, others = _inputs_of(cfg, method, sl)
        srcs = ([base_src] if base_src is not None else []) + others
        infos = []
        for src in srcs:
            ck = ckpts[src.model]
            nm = src_names[src.model]
            info = ck.tensors.get(nm)
            if info is None and nm.endswith("lm_head.weight"):  # tied embeddings: the input embedding stands in
                tied = [x for x in ck.tensors if x.endswith("embed_tokens.weight")]
                if len(tied) == 1:
                    nm = src_names[src.model] = tied[0]
                    info = ck.tensors[nm]
            if info is None:
                raise PlanError(f"model {src.model}: tensor {nm} is missing (needed for output tensor {out_name}); "
                                f"remove the model from the config or use a checkpoint of the same architecture")
            infos.append((src, info))
        first = infos[0][1]
        for src, info in infos[1:]:
            if info.shape != first.shape:
                raise PlanError(f"model {src.model}: tensor {info.name} has shape {list(info.shape)} but "
                                f"{infos[0][0].model} has {list(first.shape)}; these checkpoints cannot be merged "
                                f"tensor by tensor")
            if info.dtype != first.dtype and cfg.dtype is None:
                raise PlanError(f"model {src.model}: tensor {info.name} is {info.dtype} but {infos[0][0].model} has "
                                f"{first.dtype}; set dtype: in the config (e.g. dtype: float32) to merge them")
        ref_info = first
        is_float = ref_info.dtype in FLOAT_DTYPES
        out_dtype = (cfg.out_dtype or cfg.dtype or ref_info.dtype) if is_float else ref_info.dtype
        in_bytes = sum(i.nbytes for _, i in infos)
        if not is_float:  # integer buffers (e.g. position ids): copied, never averaged
            src, info = infos[0]
            items.append(Item(out_name, info.shape, out_dtype, None, [(src.model, info.name)], {}, [{"scale": None}], t,
                              copy=True, in_bytes=info.nbytes))
            return
        shared = resolver.shared(sl, out_name, t)
        per = [resolver.per_input(sl, src, i.name, t, is_base=(src is base_src)) for src, i in infos
               if src is not base_src]
        if method.name == "linear":
            total = sum(p["weight"] for p in per)
            if shared.get("normalize", True) and abs(total) < 1e-12:
                raise ConfigError(f"linear: the weights of tensor {out_name} sum to 0 with normalize: true; "
                                  f"change the weights or set normalize: false")
        numel = ref_info.numel
        fused = method.name == "linear" or (method.gta and method.gta.get("sparsification") != "della")
        work = 0 if fused else 4 * numel * (len(infos) + 2)  # float32 copies of the inputs, the result
        items.append(Item(out_name, ref_info.shape, out_dtype,
                          (base_src.model, src_names[base_src.model]) if base_src is not None else None,
                          [(src.model, i.name) for src, i in infos if src is not base_src], shared, per, t,
                          in_bytes=in_bytes, work_bytes=work))

    if not cfg.uses_slices:
        sl = cfg.slices[0]
        for n in names:
            s = split_layer(n)
            L = counts[s[0]] if s else 0
            t = (s[1] / (L - 1) if L > 1 else 1.0) if s else 0.0
            add(n, sl, {m: n for m in folders}, t)
        layers_out = dict(counts)
    else:
        first = cfg.slices[0]
        layer_names = [n for n in names if split_layer(n)]
        if len(counts) != 1:
            raise PlanError(f"slices need models with one stack of layers; {ref} has {len(counts)} "
                            f"({', '.join(counts) or 'none found'})")
        head = next(iter(counts))
        suffixes: List[str] = []
        for n in layer_names:
            sfx = split_layer(n)[2]
            if sfx not in suffixes:
                suffixes.append(sfx)
        non_layer = [n for n in names if not split_layer(n)]
        pre = [n for n in non_layer if _is_pre(n, names.index(n) < names.index(layer_names[0]))]
        post = [n for n in non_layer if n not in pre]
        for n in pre:
            add(n, first, {src.model: n for src in first.sources} | ({cfg.base_model: n} if cfg.base_model else {}), 0.0)
        out_layer = 0
        total = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in cfg.slices)
        for j, sl in enumerate(cfg.slices):
            length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            for src in sl.sources:
                have = layer_counts(ckpts[src.model].tensors).get(head, 0)
                if src.layer_range[1] > have:
                    raise PlanError(f"model {src.model}: slices[{j}] asks for layers {list(src.layer_range)} but the "
                                    f"model has {have}; fix layer_range")
            for off in range(length):
                t = off / (length - 1) if length > 1 else 1.0  # mergekit: t = 1 in a one-layer slice
                for sfx in suffixes:
                    src_names = {src.model: f"{head}{src.layer_range[0] + off}.{sfx}" for src in sl.sources}
                    add(f"{head}{out_layer}.{sfx}", sl, src_names, t)
                out_layer += 1
        last = cfg.slices[-1]
        for n in post:
            add(n, last, {src.model: n for src in last.sources} | ({cfg.base_model: n} if cfg.base_model else {}), 0.0)
        layers_out = {head: total}
    if not items:
        raise PlanError(f"model {ref} has no tensors to merge")
    return Plan(cfg, method, folders, ckpts, items, ref, layers_out, list(resolver.unused))
