"""Reading and validating a peft LoRA adapter directory for serving: its config, its weights, its checks.

Only `adapter_config.json` + `adapter_model.safetensors` are read, with `safetensors`: nothing is
ever unpickled, and a directory holding only `.bin`/`.pt` weights is refused. An adapter is
validated whole against the model it is for (its module names must name float linear layers of
that model, its shapes fit them, its rank match its config and be at most `max_rank`, its values be
finite floats, its config ask for plain LoRA): anything wrong raises `ValueError` saying what.
`AdapterPool` (serving/adapters.py) keeps what `read_adapter` returns in its CPU tier.
"""

import json
import math
import os
import re
from collections.abc import Container, Mapping
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from fused_train.hf.quantize import QuantizedLinear
from fused_train.ops.checks import FLOAT_DTYPES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# peft's save_pretrained names a LoRA weight `base_model.model.<module name>.lora_<A|B>.weight`.
_WEIGHT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# LoraConfig fields that, when set, make an adapter more than scaled B·A on linear layers.
_UNSUPPORTED_OPTIONS = (
    "use_dora", "use_qalora", "lora_bias", "fan_in_fan_out", "alora_invocation_tokens", "modules_to_save",
    "trainable_token_indices", "layer_replication", "target_parameters", "use_bdlora", "arrow_config",
    "kasa_config", "velora_config", "monteclora_config",
)  # fmt: skip


class HostAdapter(NamedTuple):
    """A validated adapter in host memory: module name -> (lora_a [r, in], lora_b [out, r], scaling),
    lora_a and lora_b contiguous in the layer's dtype, and its files' (size, mtime) when read."""

    path: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    files: tuple


def check_adapter_dir(path: str) -> None:
    """`path` is a directory holding `WEIGHTS_FILE` (safetensors; pickle weights are never loaded,
    unpickling can run any code) and `CONFIG_FILE`."""
    if not os.path.isdir(path):
        raise ValueError(f"path {path!r} is not a directory")
    files = set(os.listdir(path))
    if WEIGHTS_FILE not in files:
        pickles = sorted(name for name in files if name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"path {path!r} holds only pickle weights ({', '.join(pickles)}), which are never loaded "
                f"(unpickling can run any code): save the adapter as {WEIGHTS_FILE} (peft's save_pretrained does "
                "by default)"
            )
        raise ValueError(f"path {path!r} has no {WEIGHTS_FILE}")
    if CONFIG_FILE not in files:
        raise ValueError(f"path {path!r} has no {CONFIG_FILE}")


def file_stamps(path: str) -> tuple:
    """(size, mtime) of the adapter's two files (None where one is missing: `read_config` says so)."""
    stamps = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            stat = os.stat(os.path.join(path, name))
        except (OSError, ValueError):
            stamps.append(None)
        else:
            stamps.append((stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def read_config(path: str) -> dict:
    """The adapter's `CONFIG_FILE`, checked to be a plain peft LoRA config; `rank_pattern` and
    `alpha_pattern` are mappings (empty when unset)."""
    check_adapter_dir(path)
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"{CONFIG_FILE} in {path!r} is not readable JSON: {error}") from error
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{CONFIG_FILE} in {path!r} is not a peft LoRA config (peft_type 'LORA')")
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise ValueError(
                f"{CONFIG_FILE} in {path!r} sets {option}={config[option]!r}; AdapterPool serves plain LoRA only"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(f"{CONFIG_FILE} in {path!r} sets bias={config['bias']!r}; AdapterPool serves plain LoRA only")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise ValueError(f"{CONFIG_FILE} in {path!r}: {key} must be a positive number, got {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = config.get(key) or {}
        if not isinstance(config[key], dict):
            raise ValueError(f"{CONFIG_FILE} in {path!r}: {key} must be a mapping, got {config[key]!r}")
    return config


def read_adapter(path: str, modules: Mapping[str, nn.Module], *, max_rank: int, attached: Container[str] = ()):
    """The adapter in directory `path` as a `HostAdapter`, validated against the model whose
    `named_modules()` are `modules`. `attached`: the layers whose instance `forward` is the pool's
    own; any other replaced `forward` is refused (something else patched that layer)."""
    files = file_stamps(path)
    config = read_config(path)
    try:
        tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{WEIGHTS_FILE} in {path!r} is corrupt or truncated: {error}") from error
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _WEIGHT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"adapter {path!r} holds {key!r}, which is not the lora_A or lora_B weight of a layer; "
                "AdapterPool serves plain LoRA on linear layers only"
            )
        pairs.setdefault(match[1], {})[match[2]] = tensor
    if not pairs:
        raise ValueError(f"adapter {path!r} holds no LoRA weights: it would change nothing")
    unknown = sorted(name for name in pairs if name not in modules)
    if unknown:
        example = next((name for name, m in modules.items() if type(m) is nn.Linear), "none")
        raise ValueError(
            f"adapter {path!r} targets {len(unknown)} module(s) this model does not have, e.g. {unknown[0]!r} "
            f"(the model's linear layers are named like {example!r}): an adapter for another model?"
        )
    validated = {}
    for name, pair in sorted(pairs.items()):
        where = f"adapter {path!r}, module {name!r}"
        layer = modules[name]
        if not (type(layer) is nn.Linear and layer.weight.dtype in FLOAT_DTYPES or isinstance(layer, QuantizedLinear)):
            raise ValueError(
                f"{where}: the model's {type(layer).__name__} there is not a float nn.Linear "
                "(or one that fused_train.quantize_base stored int8 or int4)"
            )
        if "forward" in layer.__dict__ and name not in attached:
            raise ValueError(f"{where}: the model's layer has its forward replaced by something else")
        validated[name] = _validated(where, config, name, layer, pair, max_rank)
    return HostAdapter(path, validated, files)


def _validated(where: str, config: dict, name: str, layer: nn.Linear, pair: dict, max_rank: int):
    if set(pair) != {"A", "B"}:
        raise ValueError(f"{where}: only lora_{''.join(pair)} is there, lora_A and lora_B are both needed")
    lora_a, lora_b = pair["A"], pair["B"]
    for label, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: {label} is {tensor.dtype}, not float16, bfloat16 or float32")
        if tensor.dim() != 2:
            raise ValueError(f"{where}: {label} has shape {tuple(tensor.shape)}, not 2-D")
    rank = lora_a.shape[0]
    if lora_a.shape[1] != layer.in_features or lora_b.shape != (layer.out_features, rank):
        raise ValueError(
            f"{where}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not fit the model's "
            f"layer ({layer.in_features} -> {layer.out_features}; expected lora_A [r, {layer.in_features}] and "
            f"lora_B [{layer.out_features}, r]): an adapter for another base model?"
        )
    configured_rank = pattern_value(config["rank_pattern"], name, config["r"])
    if rank != configured_rank:
        raise ValueError(f"{where}: lora_A has rank {rank}, {CONFIG_FILE} says {configured_rank}")
    if rank > max_rank:
        raise ValueError(f"{where}: rank {rank} > max_rank {max_rank}")
    if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
        raise ValueError(f"{where}: the weights hold NaN or infinite values")
    alpha = pattern_value(config["alpha_pattern"], name, config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    # A quantized base's adapters are held in float32, as the pool's slots hold them.
    dtype = layer.weight.dtype if layer.weight.is_floating_point() else torch.float32
    return lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous(), scaling


def pattern_value(pattern: dict, module_name: str, default):
    """peft's rule for rank_pattern/alpha_pattern: the first key that matches the end of the module's
    name at a dot boundary (as a regular expression) gives the value."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})", module_name):
            return value
    return default
