"""Greedy reference outputs from Hugging Face transformers, and the exact comparison.

The engine's greedy tokens must equal `generate`'s. A divergence is accepted only at a
near-tie: where the reference's two best logits are within NEAR_TIE of each other (the
summation order of a different kernel may flip them); the comparison of that request
stops there.
"""

from __future__ import annotations

import torch
import transformers

NEAR_TIE = 1e-4


def hf_greedy(
    model_dir: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    auto: type = transformers.AutoModelForCausalLM,
) -> list[tuple[list[int], torch.Tensor]]:
    """For each prompt (alone, no padding): generated tokens and the logits of each step
    (`auto`: AutoModelForImageTextToText for a vision-language model's text prompts)."""
    model = auto.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
        tokens = gen.sequences[0, len(prompt) :].tolist()
        out.append((tokens, torch.cat(gen.logits)))  # logits: [generated, vocab]
    return out


def compare_greedy(label: str, ours: list[int], ref: list[int], ref_logits: torch.Tensor) -> bool:
    """Assert `ours` equals `ref`; return False when it stopped early at an accepted near-tie."""
    for pos, (a, b) in enumerate(zip(ours, ref, strict=False)):
        if a == b:
            continue
        # Accepted only if the engine's token is itself within NEAR_TIE of the best logit.
        gap = (ref_logits[pos].max() - ref_logits[pos][a]).item()
        assert gap < NEAR_TIE, (
            f"{label}: first difference at generated position {pos}: engine {a}, "
            f"transformers {b} (reference logit gap between them {gap:.2e}); "
            f"engine {ours[: pos + 1]}, transformers {ref[: pos + 1]}"
        )
        return False
    assert len(ours) == len(ref), (
        f"{label}: same first {min(len(ours), len(ref))} tokens but engine gave {len(ours)}, "
        f"transformers {len(ref)}: engine {ours}, transformers {ref}"
    )
    return True
