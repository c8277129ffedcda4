"""The CPU RoPE kernel (workers/layers/cpu_rope.py) against torch's ops: equal bit for bit
(rtol=0, atol=0) on the strided view of the fused QKV output the decoder hands it, the values
untouched; inputs it does not take come back untouched, for torch to run. (tests/test_layers.py
compares the whole apply_rope_, which takes this kernel in float32, with transformers.)
"""

from __future__ import annotations

import logging

import pytest
import torch

from vlmserve.workers.layers import cpu_rope


def torch_rope_(cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The torch path of rotary.apply_rope_, op for op."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:]
    x1_sin, x2_sin = x1 * sin, x2 * sin
    x1.mul_(cos).sub_(x2_sin)
    x2.mul_(cos).add_(x1_sin)
    return x


def test_the_kernel_builds_here() -> None:
    assert cpu_rope.kernel() is not None, "gcc is on this machine and in CI"


@pytest.mark.parametrize(("tokens", "head_dim"), [(1, 64), (7, 128), (360, 80), (2048, 64)])
def test_rope_is_torchs_bit_for_bit_on_the_fused_qkv_view(tokens: int, head_dim: int) -> None:
    heads, kv_heads = 8, 2
    gen = torch.Generator().manual_seed(tokens + head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3
    angles = torch.rand(tokens, 1, head_dim // 2, generator=gen) * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = qkv.clone()
    qk = (heads + kv_heads) * head_dim
    torch_rope_(cos, sin, expected[:, :qk].view(tokens, heads + kv_heads, head_dim))
    assert cpu_rope.rope_(cos, sin, qkv[:, :qk].view(tokens, heads + kv_heads, head_dim))
    torch.testing.assert_close(qkv, expected, rtol=0, atol=0)  # the values untouched too


def test_inputs_the_kernel_does_not_take_are_left_to_torch() -> None:
    x = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    cos = sin = torch.ones(4, 1, 8, dtype=torch.bfloat16)
    before = x.clone()
    assert not cpu_rope.rope_(cos, sin, x) and torch.equal(x, before)
    y = torch.randn(8, 4).t()[:, None]  # [4, 1, 8], its values 4 apart
    cos32 = sin32 = torch.ones(4, 1, 8)
    before = y.clone()
    assert not cpu_rope.rope_(cos32, sin32, y) and torch.equal(y, before)
    z = torch.randn(4, 2, 8)
    one = torch.ones(1, 1, 8)  # one row for every token: torch broadcasts, the kernel does not
    before = z.clone()
    assert not cpu_rope.rope_(one, one, z) and torch.equal(z, before)


def test_a_missing_compiler_is_one_warning(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # noqa: ANN001
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="vlmserve.cpu_rope"):
        assert cpu_rope._load() is None
    assert "could not be built" in caplog.text
