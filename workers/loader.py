"""Builds a model from a Hugging Face checkpoint directory and streams in its weights.

Tensors are read one at a time with `safe_open`; each parameter's `weight_loader` reads
only this rank's slice. Progress is logged per file.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import nn

from vlmserve.shared.models import checkpoint_spec
from vlmserve.workers.layers.linear import load_whole, pack_linears
from vlmserve.workers.models.registry import build_model

log = logging.getLogger("vlmserve.loader")

# Checkpoint tensors with no parameter here (rotary tables some checkpoints still save).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _target(model: nn.Module, name: str) -> tuple[str, object]:
    """The parameter name a checkpoint tensor loads into, and its shard id (or None)."""
    if hasattr(model, "map_checkpoint_name"):
        name = model.map_checkpoint_name(name)
    if not name.startswith(getattr(model, "packed_prefix", "")):
        return name, None
    for ckpt_part, (param_part, shard_id) in getattr(model, "packed_modules", {}).items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{param_part}."), shard_id
    return name, None


def safetensors_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory!r}")
    return files


def load_weights(
    model: nn.Module, files: list[str], rename: Callable[[str], str | None] | None = None
) -> set[str]:
    """Copy every tensor of `files` into its parameter (`rename` may map a checkpoint name
    first, or skip it with None); fail on unknown names. Returns the parameters loaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    skipped = getattr(model, "skipped_weights", ())  # parameter prefixes the model dropped
    loaded: set[str] = set()
    started = time.monotonic()
    for index, path in enumerate(files, 1):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                ours = rename(name) if rename else name
                if ours is None:
                    continue
                target, shard_id = _target(model, ours)
                if target.startswith(skipped):
                    continue
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} matches no parameter")
                param = params[target]
                loader = getattr(param, "weight_loader", load_whole)
                loader(param, f.get_slice(name), shard_id)
                loaded.add(target)
        log.info(
            "loaded weights file %d/%d (%s) in %.1fs",
            index, len(files), os.path.basename(path), time.monotonic() - started,
        )  # fmt: skip
    return loaded


def tie_as_checkpoint(config: object, files: list[str]) -> None:
    """Tie the output layer to the embeddings as transformers does when it loads the checkpoint,
    which is not always as config.json says (the top-level `tie_word_embeddings` decides for
    every family, text and vision-language; a text_config's own one is not read).

    - Tied in the config, but the checkpoint holds an lm_head of its own (Mistral Small 3.1,
      whose config.json does not say it, so transformers 5 reads the default True): transformers
      unties and uses that lm_head (when its values differ; when they are equal, either way gives
      the same logits). Untied here too.
    - Untied, and the checkpoint has no lm_head: transformers draws a random one and warns that
      it is missing, so its answers are noise; refused here in one line rather than served.
    """
    names: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            names |= set(f.keys())
    has_head = any(name.endswith("lm_head.weight") for name in names)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and has_head:
        config.tie_word_embeddings = False
        text = getattr(config, "text_config", None)
        if text is not None:
            text.tie_word_embeddings = False
    elif not tied and not has_head:
        raise ValueError(
            "the checkpoint has no lm_head weight and config.json says tie_word_embeddings "
            "false: transformers would answer with a random output layer; set "
            "tie_word_embeddings true if the embeddings are its output layer"
        )


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {n for n, p in params.items() if any(p is params[m] for m in loaded)}
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise KeyError(f"checkpoint has no weights for {missing[:5]}")


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give a model built on the meta device real storage on `device`: floating parameters in
    `dtype` (zeros until weights load: rows a checkpoint has no weights for, such as a vocab
    shard's padding, stay zero), tied parameters still one; parameters and buffers already real
    (computed when built) moved there, buffers keeping their dtype."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in made:
                kind = dtype if param.is_floating_point() else param.dtype
                data = (
                    torch.zeros(param.shape, dtype=kind, device=device)
                    if param.is_meta
                    else param.data.to(device=device, dtype=kind)
                )
                new = nn.Parameter(data, requires_grad=False)
                new.__dict__.update(param.__dict__)  # its weight_loader and shard attributes
                made[id(param)] = new
            module._parameters[name] = made[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None:
                if buffer.is_meta:
                    raise RuntimeError(f"buffer {name} of {type(module).__name__} has no values")
                module._buffers[name] = buffer.to(device)


def load_model(
    model_dir: str, dtype: torch.dtype, device: torch.device, cpu_gemm: str = "onednn"
) -> nn.Module:
    """The model of `model_dir`'s architecture with its weights, in `dtype` on `device`, its
    linear layers' weights packed for `cpu_gemm` (see layers/linear.py) once loaded."""
    spec = checkpoint_spec(model_dir)
    config = spec.hf_config(model_dir)
    tie_as_checkpoint(config, safetensors_files(model_dir))
    with torch.device("meta"):  # shapes only: no memory, no global dtype to change
        model = build_model(spec, config)
    materialize(model, dtype, device)
    sources = model.weight_sources(model_dir) if hasattr(model, "weight_sources") else None
    loaded: set[str] = set()
    for directory, rename in sources or [(model_dir, None)]:
        loaded |= load_weights(model, safetensors_files(directory), rename=rename)
    check_all_loaded(model, loaded)
    packed = pack_linears(model, cpu_gemm)
    if packed:
        log.info("packed the weights of %d linear layers for oneDNN", packed)
    return model.eval()
