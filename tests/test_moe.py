"""The mixture-of-experts MLP (workers/layers/moe.py) against transformers' Qwen3-VL-MoE sparse
block: the same output from both checkpoint layouts of the fused experts (transformers' and the
hub's transposed one), and the tensor-parallel shards of every expert's intermediate dimension
summing to the whole."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

from vlmserve.workers.layers import moe
from vlmserve.workers.layers.moe import SparseMoeBlock

HIDDEN, INTER, EXPERTS, TOP_K = 64, 48, 8, 2


def reference_block() -> Qwen3VLMoeTextSparseMoeBlock:
    config = transformers.Qwen3VLMoeTextConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, hidden_act="silu",
    )  # fmt: skip
    torch.manual_seed(0)
    block = Qwen3VLMoeTextSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def loaded(block: SparseMoeBlock, ref: Qwen3VLMoeTextSparseMoeBlock, hub: bool) -> SparseMoeBlock:
    """`block` with `ref`'s weights, the experts given as transformers saves them or (`hub`)
    transposed as the hub's checkpoints hold them."""
    gate_up, down = ref.experts.gate_up_proj.detach(), ref.experts.down_proj.detach()
    if hub:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    with torch.no_grad():
        block.gate.weight.copy_(ref.gate.weight)
    block.load_gate_up(block.experts.gate_up_proj, gate_up)
    block.load_down(block.experts.down_proj, down)
    return block


@pytest.mark.parametrize("hub", [False, True], ids=["transformers_layout", "hub_layout"])
def test_moe_block_matches_transformers(hub: bool) -> None:
    ref = reference_block()
    ours = loaded(SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K), ref, hub)
    x = torch.randn(37, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x[None])[0]
        got = ours(x)
    experts, _ = ours.route(x)
    assert len(experts.unique()) == EXPERTS  # every expert took some token
    torch.testing.assert_close(got, want)


def test_tensor_parallel_shards_sum_to_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks' blocks, each with half of every expert's intermediate dimension, give
    partial outputs whose sum (what the all-reduce makes) is the whole block's output."""
    ref = reference_block()
    x = torch.randn(23, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x[None])[0]
    partial = []
    monkeypatch.setattr(moe, "tp_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(moe, "tp_rank", lambda rank=rank: rank)
        block = loaded(SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K), ref, hub=rank == 1)
        assert block.experts.down_proj.shape == (EXPERTS, HIDDEN, INTER // 2)
        with torch.no_grad():
            partial.append(block(x))  # no group joined: all_reduce leaves it as it is
    torch.testing.assert_close(partial[0] + partial[1], want)


def test_wrong_expert_shapes_are_refused() -> None:
    block = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K)
    with pytest.raises(ValueError, match="gate_up_proj of shape"):
        block.load_gate_up(block.experts.gate_up_proj, torch.zeros(EXPERTS - 1, 2 * INTER, HIDDEN))
    with pytest.raises(ValueError, match="down_proj of shape"):
        block.load_down(block.experts.down_proj, torch.zeros(EXPERTS, HIDDEN, INTER + 1))


@pytest.mark.parametrize("hub", [False, True], ids=["transformers_layout", "hub_layout"])
def test_loads_from_safetensors_slices(tmp_path, hub: bool, monkeypatch) -> None:  # noqa: ANN001
    """The loader hands weight loaders safetensors slices (each rank reads only its part):
    rank 1 of 2 reads its half of every expert from a file in either layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ref = reference_block()
    gate_up, down = ref.experts.gate_up_proj.detach(), ref.experts.down_proj.detach()
    if hub:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    path = str(tmp_path / "experts.safetensors")
    save_file({"gate_up": gate_up.contiguous(), "down": down.contiguous()}, path)
    monkeypatch.setattr(moe, "tp_size", lambda: 2)
    monkeypatch.setattr(moe, "tp_rank", lambda: 1)
    from_file = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K)
    with safe_open(path, framework="pt") as f:
        from_file.load_gate_up(from_file.experts.gate_up_proj, f.get_slice("gate_up"))
        from_file.load_down(from_file.experts.down_proj, f.get_slice("down"))
    from_tensors = loaded(SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K), ref, hub=False)
    half = INTER // 2
    want_gate_up = ref.experts.gate_up_proj.detach()
    want = torch.cat((want_gate_up[:, half:INTER], want_gate_up[:, INTER + half :]), dim=1)
    torch.testing.assert_close(from_file.experts.gate_up_proj, want, rtol=0, atol=0)
    torch.testing.assert_close(from_file.experts.gate_up_proj, from_tensors.experts.gate_up_proj)
    torch.testing.assert_close(
        from_file.experts.down_proj, ref.experts.down_proj.detach()[:, :, half:], rtol=0, atol=0
    )
