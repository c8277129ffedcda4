"""Tiny random-weight checkpoints made from a real checkpoint's published configuration files.

Every field is kept as published (nesting, RoPE settings, `mrope_section`, dtype fields, tied
embeddings, eos lists, pad and image token ids, the real `vocab_size`, preprocessor settings,
chat template); only the sizes shrink, and the fields that depend on them follow (a multimodal
RoPE section still covers half a head, a projector still maps into the decoder's width). The
tokenizer is a small byte-level BPE trained here, with every special token of the published
tokenizer at its real id. Tests serve these through the same loading code as the real
checkpoint, and compare with transformers on the same files.

    vlmserve demo-checkpoint OUT --from-config tests/data/realconfigs/Qwen__Qwen2-VL-2B-Instruct
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vlmserve.shared.models import checkpoint_spec
from vlmserve.shared.models.spec import read_json
from vlmserve.workers.demo_checkpoint import training_text

# Files copied as published (config.json and generation_config.json are written separately).
COPIED = (
    "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja", "special_tokens_map.json", "added_tokens.json",
    "video_preprocessor_config.json",
)  # fmt: skip
TEXT_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
HEAD_DIM = 16  # hidden_size / num_attention_heads
CLIP_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
    projection_dim=32,
)  # fmt: skip
TRAINED_TOKENS = 600  # the BPE's own tokens (byte alphabet and merges)
# Weights of a random checkpoint drawn wider than real configs' initializer_range, so that
# greedy choices are clear rather than near-ties.
INIT_RANGE = 0.2


def shrink_text(text: dict) -> dict:
    """The decoder's fields with the sizes shrunk; multimodal RoPE sections rescaled to the
    smaller head, per-layer lists cut to the fewer layers."""
    out = dict(text)
    heads, kv = text.get("num_attention_heads", 32), text.get("num_key_value_heads")
    out |= TEXT_SIZES
    out["num_key_value_heads"] = TEXT_SIZES["num_attention_heads"] if kv in (None, heads) else 2
    if "head_dim" in text:
        out["head_dim"] = HEAD_DIM
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(text.get(key), dict) and "mrope_section" in text[key]:
            out[key] = {**text[key], "mrope_section": _rescale(text[key]["mrope_section"])}
    if isinstance(text.get("layer_types"), list):
        out["layer_types"] = text["layer_types"][: TEXT_SIZES["num_hidden_layers"]]
    return out


def _rescale(sections: list[int]) -> list[int]:
    """Sections in the same proportions, summing to half the shrunk head."""
    total, half = sum(sections), HEAD_DIM // 2
    out = [max(1, s * half // total) for s in sections]
    out[-1] += half - sum(out)
    return out


def shrink_vision(vision: dict, text_hidden: int, model_type: str) -> dict:
    """The vision tower's fields with the sizes shrunk, by the checkpoint's model type (the
    published vision config may hold only the fields that differ from its class's defaults)."""
    out = dict(vision)
    if model_type == "qwen2_5_vl":
        return out | dict(
            depth=2, num_heads=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=text_hidden, fullatt_block_indexes=[1],
        )  # fmt: skip
    if model_type == "qwen3_vl":  # every DeepStack level kept, taken after a shrunk layer
        levels = len(vision.get("deepstack_visual_indexes", []))
        return out | dict(
            depth=levels + 1, num_heads=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=text_hidden, deepstack_visual_indexes=list(range(1, levels + 1)),
        )  # fmt: skip
    if model_type == "internvl":  # tiles keep their pixels, so rows per tile stay as published
        return out | dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
    if model_type in ("idefics3", "smolvlm", "gemma3"):  # frames keep their pixels and patches
        return out | dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
    if model_type == "mistral3":  # Pixtral: images keep their pixels, patches and merging
        return out | dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            head_dim=16,
        )  # fmt: skip
    if model_type == "qwen2_vl":  # embed_dim inside; hidden_size is the merger's output
        return out | dict(depth=2, num_heads=2, embed_dim=32, hidden_size=text_hidden)
    if vision.get("model_type", "clip_vision_model") == "clip_vision_model":
        return out | CLIP_SIZES
    raise ValueError(f"no shrinking rule for the vision tower of {model_type!r}")


def shrink_config(raw: dict) -> dict:
    out = copy.deepcopy(raw)
    # The weights written here are plain floats: a quantized checkpoint's config would describe
    # packed weights that are not there.
    out.pop("quantization_config", None)
    if "text_config" in raw:
        out["text_config"] = shrink_text(raw["text_config"])
        text_hidden = out["text_config"]["hidden_size"]
    else:  # a flat config: the decoder's fields at the top (Llama, Qwen2-VL, original LLaVA)
        out = shrink_text(out)
        text_hidden = out["hidden_size"]
    if "vision_config" in raw:
        out["vision_config"] = shrink_vision(raw["vision_config"], text_hidden, raw["model_type"])
    if "mm_hidden_size" in raw:  # original LLaVA: its CLIP tower is built beside it
        out["mm_hidden_size"] = CLIP_SIZES["hidden_size"]
    return out


# ---- tokenizer ---------------------------------------------------------------------------


def published_special_tokens(config_dir: str) -> dict[int, str]:
    """Id -> content of every added token of the published tokenizer (Llama's three when the
    checkpoint ships none, as the original LLaVA and Vicuna repositories use them)."""
    tokenizer_config = read_json(os.path.join(config_dir, "tokenizer_config.json"))
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    found = {int(i): t["content"] for i, t in decoder.items()}
    added = read_json(os.path.join(config_dir, "added_tokens.json"))
    found |= {int(i): content for content, i in added.items()}
    for content in _mapped_only(config_dir).values():  # base-vocabulary tokens: ids unknown
        if content not in found.values():
            found[min(set(range(len(found) + 1)) - set(found))] = content
    return found or {0: "<unk>", 1: "<s>", 2: "</s>"}


def _mapped_only(config_dir: str) -> dict[str, str]:
    """The bos/eos/unk/pad tokens of a special_tokens_map.json published without a
    tokenizer_config.json (SmolVLM2's folder); {} otherwise. Those of them that are not added
    tokens are base-vocabulary ones whose ids the folder does not say: they take the lowest
    free ids."""
    if os.path.exists(os.path.join(config_dir, "tokenizer_config.json")):
        return {}
    named = read_json(os.path.join(config_dir, "special_tokens_map.json"))
    roles = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {role: _content(named[role]) for role in roles if named.get(role)}


def _content(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def published_bos(config_dir: str) -> str | None:
    """The BOS the published tokenizer adds to every text, if it adds one: Llama-family
    tokenizers (their `add_bos_token`, true by default; Llama 3's fast tokenizer always)."""
    config = read_json(os.path.join(config_dir, "tokenizer_config.json"))
    if not config and _mapped_only(config_dir):
        return None  # SmolVLM2's byte-level tokenizer: its chat template writes the BOS
    if not config:
        return "<s>"  # the original LLaVA and Vicuna repositories: Llama's tokenizer
    bos = _content(config.get("bos_token"))
    llama_like = config.get("tokenizer_class") in (
        "LlamaTokenizer", "LlamaTokenizerFast", "PreTrainedTokenizerFast"
    )  # fmt: skip
    return bos if bos and config.get("add_bos_token", llama_like) else None


def real_tokenizer(config_dir: str, seed: int) -> Tokenizer:
    """A trained byte-level BPE whose special tokens sit at the published ids; ids between are
    filled with tokens no text produces."""
    specials = published_special_tokens(config_dir)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(training_text(random.Random(seed), 5000), trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    own = sorted(model["vocab"], key=model["vocab"].get)
    size = max(max(specials) + 1, len(own) + len(specials))
    free = (i for i in range(size) if i not in specials)
    vocab = {token: next(free) for token in own}
    vocab |= {f"<|unused_{i}|>": i for i in free}  # fillers up to the highest special id
    vocab |= {content: i for i, content in specials.items()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([specials[i] for i in sorted(specials)])
    bos = published_bos(config_dir)
    if bos is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return tok


def save_tokenizer(config_dir: str, out_dir: str, seed: int) -> None:
    """tokenizer.json from `real_tokenizer`; tokenizer_config.json as published (or, with
    none published, one naming the special tokens map's tokens, or else Llama's)."""
    real_tokenizer(config_dir, seed).save(os.path.join(out_dir, "tokenizer.json"))
    published = read_json(os.path.join(config_dir, "tokenizer_config.json"))
    if not published and _mapped_only(config_dir):
        published = {"tokenizer_class": "PreTrainedTokenizerFast", **_mapped_only(config_dir)}
    if not published:
        published = {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
            "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        }  # fmt: skip
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(published, f, indent=2)


# ---- weights -----------------------------------------------------------------------------


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _random_model(hf_config: object, architecture: str, seed: int) -> torch.nn.Module:
    config = copy.deepcopy(hf_config)
    config.initializer_range = INIT_RANGE
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub).initializer_range = INIT_RANGE
    torch.manual_seed(seed)
    return getattr(transformers, architecture)(config).eval()


def build_from_config(config_dir: str, out_dir: str, seed: int = 0) -> str:
    """A tiny checkpoint at `out_dir` from the published files in `config_dir`."""
    raw = read_json(os.path.join(config_dir, "config.json"))
    shrunk = shrink_config(raw)
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"), shrunk)
    for name in COPIED:
        if os.path.exists(os.path.join(config_dir, name)):
            shutil.copy(os.path.join(config_dir, name), out_dir)
    save_tokenizer(config_dir, out_dir, seed)
    spec = checkpoint_spec(out_dir)
    if spec.family == "llava_original":
        _build_original_llava(raw, out_dir, seed)
    else:
        hf_config = transformers.AutoConfig.from_pretrained(out_dir)
        model = _random_model(hf_config, raw["architectures"][0], seed)
        model.save_pretrained(out_dir)
    # save_pretrained rewrites both files in its own form: put back the published ones.
    _write_json(os.path.join(out_dir, "config.json"), shrunk)
    generation = read_json(os.path.join(config_dir, "generation_config.json"))
    if generation:
        _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    else:
        os.remove(os.path.join(out_dir, "generation_config.json"))
    return out_dir


def _build_original_llava(raw: dict, out_dir: str, seed: int) -> None:
    """An original-format LLaVA: its CLIP tower at the path config.json names (relative to the
    checkpoint, as a hub id would be laid out), its weights under the original names, and an
    `hf-twin/` beside them in transformers' format with the same weights (the reference)."""
    from vlmserve.shared.models.llava_original import original_config
    from vlmserve.workers.demo_vlm import save_original_weights

    tower_dir = os.path.join(out_dir, raw["mm_vision_tower"])
    vision = transformers.CLIPVisionConfig(**CLIP_SIZES, image_size=336, patch_size=14)
    vision.save_pretrained(tower_dir)
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    ).save_pretrained(tower_dir)
    hf_config = original_config(out_dir)
    twin = _random_model(hf_config, hf_config.architectures[0], seed)
    tower = transformers.CLIPVisionModel(vision)
    tower.load_state_dict(twin.model.vision_tower.state_dict())
    tower.save_pretrained(tower_dir)
    save_original_weights(twin, out_dir)
    twin_dir = os.path.join(out_dir, "hf-twin")
    twin.save_pretrained(twin_dir)
    twin.generation_config.save_pretrained(out_dir)  # replaced by the published one, if any
