"""RMSNorm and RoPE, written for fewer passes over memory, against transformers' own modules:
equal bit for bit (rtol=0, atol=0), in float32 and the half types, on the views the decoder
hands them, without writing what they must not."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from vlmserve.workers.layers.norm import RMSNorm
from vlmserve.workers.layers.rotary import RotaryEmbedding, apply_rope_
from vlmserve.workers.models.llama import LlamaDecoderLayer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 360])
def test_rms_norm_is_transformers_bit_for_bit(dtype: torch.dtype, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    hidden = 96
    theirs = LlamaRMSNorm(hidden, eps=1e-6).to(dtype)
    theirs.weight.data = torch.randn(hidden, generator=gen).to(dtype)
    ours = RMSNorm(hidden, 1e-6).to(dtype)
    ours.weight.data = theirs.weight.data.clone()
    # a strided view, as the per-head q/k norm gets from the fused QKV output
    fused = (torch.randn(rows, 3 * hidden, generator=gen) * 4).to(dtype)
    x = fused[:, hidden : 2 * hidden]
    before = fused.clone()
    with torch.no_grad():
        expected = theirs(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.dtype == expected.dtype
    assert torch.equal(fused, before), "the norm wrote its input"


def _rope(head_dim: int, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    config = transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    positions = torch.randperm(2048, generator=torch.Generator().manual_seed(1))[:tokens]
    return RotaryEmbedding(config, head_dim, 2048)(positions, dtype)  # [tokens, 1, head_dim]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "head_dim"), [(1, 64), (33, 128), (360, 80)])
def test_rope_in_place_on_fused_qkv_is_transformers_bit_for_bit(
    dtype: torch.dtype, tokens: int, head_dim: int
) -> None:
    heads, kv_heads = 6, 2
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    v_before = v.clone()
    cos, sin = _rope(head_dim, tokens, dtype)
    # transformers: [batch, heads, tokens, head_dim], cos/sin [batch, tokens, head_dim]
    their_q, their_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[:, 0][None], sin[:, 0][None]
    )
    view = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    assert apply_rope_((cos, sin), view) is view
    torch.testing.assert_close(q, their_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k, their_k[0].transpose(0, 1), rtol=0, atol=0)
    assert torch.equal(v, v_before), "RoPE wrote the values"


def test_decoder_layer_leaves_its_input_alone() -> None:
    """The residual adds go in place into the sublayers' outputs, never into `x` (the
    caller's embeddings at layer 0)."""
    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1,
    )  # fmt: skip
    layer = LlamaDecoderLayer(config, qkv_bias=True, layer_idx=0, qk_norm=False)
    layer.self_attn = _Echo()  # attention itself is tested elsewhere
    for param in layer.parameters():  # built with torch.empty
        param.data.normal_(generator=torch.Generator().manual_seed(param.numel()))
    x = torch.randn(5, 64)
    before = x.clone()
    with torch.no_grad():
        out = layer(None, x)
    assert torch.equal(x, before), "the layer wrote its input"
    with torch.no_grad():
        h = before + layer.input_layernorm(before)
        expected = h + layer.mlp(layer.post_attention_layernorm(h))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


class _Echo(torch.nn.Module):
    def forward(self, rope: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # a fresh tensor, as the output projection returns
