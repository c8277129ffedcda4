"""Builds tiny random-weight checkpoints in real Hugging Face format, offline.

A checkpoint is what `from_pretrained` reads: config.json, generation_config.json,
model.safetensors, a byte-level BPE tokenizer trained here with `tokenizers` on generated
text, and a chat template. Tests, benchmarks and the demo server all use it; the engine
loads it through the same code as a real 7B checkpoint. The weights are random: the text
the model writes is noise.
"""

from __future__ import annotations

import argparse
import logging
import os
import random

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger("vlmserve.demo_checkpoint")

# Shapes by size; "bench" is the ~30 M-parameter checkpoint the engine benchmark uses.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512,
    ),
    "small": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, vocab_size=1024,
    ),
    "bench": dict(
        hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1024, vocab_size=4096,
    ),
}  # fmt: skip

WORDS = (
    "the a of and to in is you that it he was for on are as with his they I at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her would "
    "make like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part image "
    "picture cat dog red blue green photo model token server request stream batch cache"
).split()
EXTRA_TEXT = ["héllo wörld", "日本語のテキスト", "naïve café", "🙂 👍 🚀", "Ελληνικά", "кириллица"]

# Chat templates. The Llama one writes no BOS itself: the tokenizer adds it, as with Vicuna
# and LLaVA, so the frontend must keep the tokenizer's special tokens when it tokenizes.
LLAMA_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\\n') %}{% endif %}"
    "{% if m['role'] == 'system' %}{{ text }}\n"
    "{% elif m['role'] == 'user' %}USER: {{ text }}\n"
    "{% else %}ASSISTANT: {{ text }}</s>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\\n') %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ text }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def training_text(rng: random.Random, lines: int) -> list[str]:
    """Generated text: common words, invented words (to give BPE merges) and non-ASCII."""
    out = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(4, 16)):
            roll = rng.random()
            if roll < 0.6:
                words.append(rng.choice(WORDS))
            elif roll < 0.95:
                words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))))
            else:
                words.append(rng.choice(EXTRA_TEXT))
        out.append(" ".join(words) + rng.choice([".", "!", "?", ",", ":", " 42", " 2026"]))
    return out


def build_tokenizer(vocab_size: int, special: list[str], bos: str | None, seed: int) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens, trained on generated text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(random.Random(seed), 20000), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def fast_tokenizer(
    vocab_size: int, special: list[str], bos: str | None, eos: str, seed: int
) -> transformers.PreTrainedTokenizerFast:
    """build_tokenizer's result as the transformers tokenizer a checkpoint saves; the first
    special token is the padding (and, with a BOS, the unknown) token."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab_size, special, bos, seed),
        bos_token=bos,
        eos_token=eos,
        unk_token=special[0] if bos else None,
        pad_token=special[0],
        model_max_length=4096,
    )


def _text_family(arch: str) -> tuple[type, type, dict, list[str], str | None, str, str]:
    """Config class, model class, extra config, special tokens, bos, eos and chat template."""
    llama_special = ["<unk>", "<s>", "</s>"]
    chatml_special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if arch == "llama":
        return (
            transformers.LlamaConfig, transformers.LlamaForCausalLM,
            dict(tie_word_embeddings=False, rope_theta=10000.0),
            llama_special, "<s>", "</s>", LLAMA_TEMPLATE,
        )  # fmt: skip
    if arch == "mistral":
        return (
            transformers.MistralConfig, transformers.MistralForCausalLM,
            dict(tie_word_embeddings=False, sliding_window=None, rope_theta=1000000.0),
            llama_special, "<s>", "</s>", LLAMA_TEMPLATE,
        )  # fmt: skip
    if arch == "qwen2":
        return (
            transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
            dict(tie_word_embeddings=True, rope_theta=1000000.0),
            chatml_special, None, "<|im_end|>", CHATML_TEMPLATE,
        )  # fmt: skip
    if arch == "qwen3":  # a head_dim of its own, as Qwen3's (not hidden_size / heads)
        return (
            transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
            dict(tie_word_embeddings=True, rope_theta=1000000.0, head_dim=32),
            chatml_special, None, "<|im_end|>", CHATML_TEMPLATE,
        )  # fmt: skip
    raise ValueError(f"unknown --arch {arch!r}; choose llama, qwen2, qwen3 or mistral")


ARCHES = ("llama", "qwen2", "mistral", "qwen3")


def build_checkpoint(
    out_dir: str,
    arch: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    rope_scaling: dict | None = None,
    **overrides: int,
) -> str:
    """Write a random-weight checkpoint of `arch` and `size` to `out_dir` and return it."""
    config_cls, model_cls, extra, special, bos, eos, template = _text_family(arch)
    shape = {"max_position_embeddings": 2048} | SIZES[size] | overrides
    log.info("building %s/%s checkpoint in %s: %s", arch, size, out_dir, shape)
    fast = fast_tokenizer(shape["vocab_size"], special, bos, eos, seed)
    fast.chat_template = template
    ids = {name: fast.convert_tokens_to_ids(name) for name in special}
    config = config_cls(
        **shape,
        **extra,
        bos_token_id=ids.get(bos) if bos else None,
        eos_token_id=ids[eos],
        pad_token_id=ids[special[0]],
        initializer_range=0.2,  # larger than real init, so logits rarely tie
        rope_scaling=rope_scaling,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=ids[eos], pad_token_id=ids[special[0]]
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vlmserve demo-checkpoint",
        description="Write a tiny random-weight checkpoint in Hugging Face format (no download).",
    )
    from vlmserve.workers.demo_gemma3 import build_gemma3, build_gemma3_text
    from vlmserve.workers.demo_idefics3 import IDEFICS3_ARCHES, build_idefics3
    from vlmserve.workers.demo_internvl import INTERNVL_ARCHES, build_internvl
    from vlmserve.workers.demo_mistral3 import build_mistral3
    from vlmserve.workers.demo_vlm import VISION_ARCHES, build_vision_checkpoint

    parser.add_argument("dir")
    arches = [
        *ARCHES, *VISION_ARCHES, *INTERNVL_ARCHES, *IDEFICS3_ARCHES, "mistral3", "gemma3",
        "gemma3_text",
    ]  # fmt: skip
    parser.add_argument("--arch", default="llama", choices=arches)
    parser.add_argument("--size", default="tiny", choices=list(SIZES), help="text models only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--from-config",
        metavar="DIR",
        help="a real checkpoint's published config files: keep every field, shrink the sizes",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s")
    if args.from_config:
        from vlmserve.workers.demo_real import build_from_config

        build_from_config(args.from_config, args.dir, seed=args.seed)
        print(f"wrote a random-weight checkpoint shaped like {args.from_config} to {args.dir}")
        return
    if args.arch in INTERNVL_ARCHES:
        build_internvl(args.dir, seed=args.seed, text_arch=INTERNVL_ARCHES[args.arch])
    elif args.arch in IDEFICS3_ARCHES:
        build_idefics3(args.dir, smolvlm=args.arch == "smolvlm", seed=args.seed)
    elif args.arch == "mistral3":
        build_mistral3(args.dir, seed=args.seed)
    elif args.arch == "gemma3":
        build_gemma3(args.dir, seed=args.seed)
    elif args.arch == "gemma3_text":
        build_gemma3_text(args.dir, seed=args.seed)
    elif args.arch in VISION_ARCHES:
        build_vision_checkpoint(args.dir, args.arch, seed=args.seed)
    else:
        build_checkpoint(args.dir, arch=args.arch, size=args.size, seed=args.seed)
    print(f"wrote a random-weight {args.arch} checkpoint to {args.dir}")
