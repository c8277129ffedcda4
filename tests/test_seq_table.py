"""The device-side sequence table against the list-based metadata builder, step by step."""

from __future__ import annotations

import random

import torch

from vlmserve.workers.attention.metadata import build_metadata
from vlmserve.workers.seq_table import SeqTable

CPU = torch.device("cpu")


def assert_same_metadata(ours, reference) -> None:  # noqa: ANN001
    for name in (
        "query_start_loc", "seq_lens", "block_tables", "slot_mapping", "positions",
        "query_start_loc_cpu", "seq_lens_cpu",
    ):  # fmt: skip
        a, b = getattr(ours, name), getattr(reference, name)
        assert a.dtype == b.dtype, f"{name}: {a.dtype} != {b.dtype}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs")
    for name in ("block_size", "num_seqs", "num_decodes", "num_tokens"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.max_query_len == reference.max_query_len
    assert ours.max_seq_len == reference.max_seq_len


def test_random_plans_match_the_list_builder() -> None:
    """Sequences arrive, prefill in chunks, decode, leave and come back (preempted), over
    enough rows and blocks that the table grows in both directions."""
    rng = random.Random(0)
    block_size = 4
    table = SeqTable(CPU)
    free_blocks = list(range(1, 5000))
    rng.shuffle(free_blocks)
    live: dict[int, dict] = {}  # seq id -> its blocks, computed tokens, total tokens
    next_id = 0
    for _ in range(60):
        for seq_id in [s for s in live if rng.random() < 0.1]:  # finished or preempted
            free_blocks += live.pop(seq_id)["blocks"]
            table.remove(seq_id)
        for _ in range(rng.randint(0, 12)):
            table.add(next_id)
            live[next_id] = {"blocks": [], "done": 0, "total": rng.randint(1, 150)}
            next_id += 1
        decodes, prefills = [], []
        for seq_id, seq in live.items():
            if seq["done"] >= seq["total"]:
                seq["total"] += 1  # it sampled a token: decode it
            n = min(seq["total"] - seq["done"], rng.randint(1, 40))
            need = -(-(seq["done"] + n) // block_size) - len(seq["blocks"])
            new = [free_blocks.pop() for _ in range(need)]
            seq["blocks"] += new
            table.append_blocks(seq_id, new)
            (decodes if n == 1 else prefills).append((seq_id, seq["done"], n))
            seq["done"] += n
        steps = decodes + prefills
        if not steps:
            continue
        ids = [rng.randrange(1000) for _ in range(sum(n for _, _, n in steps))]
        rows = sorted(rng.sample(range(len(steps)), rng.randint(0, len(steps))))
        ours, our_ids, our_rows = table.metadata(
            [s for s, _, _ in steps], [a for _, a, _ in steps], [n for _, _, n in steps],
            ids, rows, block_size,
        )  # fmt: skip
        reference = build_metadata(
            [a for _, a, _ in steps], [n for _, _, n in steps],
            [live[s]["blocks"] for s, _, _ in steps], block_size, CPU,
        )  # fmt: skip
        assert_same_metadata(ours, reference)
        assert our_ids.tolist() == ids and our_ids.dtype == torch.long
        assert our_rows.tolist() == rows and our_rows.dtype == torch.long
    assert table.tables.shape[0] > 64 and table.tables.shape[1] > 16, "the table grew"


def test_blocks_queued_for_a_sequence_that_left_do_not_reach_the_next_one() -> None:
    table = SeqTable(CPU)
    table.add(1)
    table.append_blocks(1, [7, 8])
    table.remove(1)  # left before any step wrote its blocks
    table.add(2)  # takes the same row
    table.append_blocks(2, [3])
    meta, _, _ = table.metadata([2], [0], [4], [0] * 4, [3], 4)
    assert meta.block_tables.tolist() == [[3]]
    assert meta.slot_mapping.tolist() == [12, 13, 14, 15]
    assert table.tables[table.row_of[2], :3].tolist() == [3, 0, 0]
