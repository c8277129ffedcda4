"""Sampling defaults from the checkpoint's generation_config.json, applied as vLLM applies them.

Model makers publish the sampling settings their model is meant to be used with there
(Qwen2.5-7B-Instruct: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05). vLLM's
`--generation-config auto` (its default) uses them for every request field a request leaves
unset; `vllm` ignores them (the neutral defaults: temperature 1, top_p 1, top_k and min_p off, no
repetition penalty); a directory reads the generation_config.json in it instead. We offer the
same flag with the same values. As in vLLM, only these fields are read and `do_sample` is not
(a checkpoint that publishes a temperature without `do_sample` still gets that temperature), and
a request's own fields always win.
"""

from __future__ import annotations

import json
import logging
import os

import msgspec

log = logging.getLogger("vlmserve.frontend")

AUTO, NEUTRAL = "auto", "vllm"
FILE = "generation_config.json"


class SamplingDefaults(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Defaults for requests that leave a field unset; None: the neutral default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # generation_config's max_new_tokens


NO_DEFAULTS = SamplingDefaults()

# generation_config.json key -> (our field, whether a value is allowed). vLLM reads these keys.
_FIELDS = {
    "temperature": ("temperature", lambda v: v >= 0),
    "top_p": ("top_p", lambda v: 0 < v <= 1),
    "top_k": ("top_k", lambda v: v >= -1),
    "min_p": ("min_p", lambda v: 0 <= v <= 1),
    "repetition_penalty": ("repetition_penalty", lambda v: v > 0),
    "max_new_tokens": ("max_tokens", lambda v: v >= 1),
}


def defaults_file(setting: str, model_dir: str) -> str | None:
    """The generation_config.json that `--generation-config setting` reads; None for `vllm`.
    ValueError when the setting is neither auto, vllm nor a directory."""
    if setting == NEUTRAL:
        return None
    if setting == AUTO:
        return os.path.join(model_dir, FILE)
    if not os.path.isdir(setting):
        raise ValueError(
            f"--generation-config must be auto, vllm or a directory; {setting!r} is none of them"
        )
    return os.path.join(setting, FILE)


def load_sampling_defaults(setting: str, model_dir: str) -> SamplingDefaults:
    """The defaults `--generation-config setting` gives for the checkpoint in `model_dir`.

    A missing file means no defaults (vLLM's "auto" for a checkpoint without one); a value
    outside what a request may ask for is a ValueError naming the file and the field, so a
    broken file stops the server at start rather than failing every request.
    """
    path = defaults_file(setting, model_dir)
    if path is None or not os.path.exists(path):
        return NO_DEFAULTS
    with open(path) as f:
        published = json.load(f)
    values = {}
    for key, (name, allowed) in _FIELDS.items():
        value = published.get(key)
        if value is None:
            continue
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not allowed(value) or (name in ("top_k", "max_tokens") and value % 1):
            raise ValueError(f"{path}: {key} {value!r} is not a value a request may ask for")
        values[name] = value
    return msgspec.convert(values, SamplingDefaults, strict=False)


def describe(defaults: SamplingDefaults, setting: str, model_dir: str) -> str:
    """One log line: which defaults requests get, and where they come from."""
    fields = msgspec.structs.asdict(defaults)
    given = ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    if not given:
        source = defaults_file(setting, model_dir) or "--generation-config vllm"
        return f"sampling defaults: the neutral ones (none taken from {source})"
    return (
        f"sampling defaults from {defaults_file(setting, model_dir)}: {given} (a request's own "
        "fields win; --generation-config vllm ignores the file)"
    )


def log_sampling_defaults(setting: str, model_dir: str) -> SamplingDefaults:
    """Load the defaults and log them once (the launcher and `vlmserve frontend` call this)."""
    defaults = load_sampling_defaults(setting, model_dir)
    log.info("%s", describe(defaults, setting, model_dir))
    return defaults
