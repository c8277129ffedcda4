"""Exact tests of the block manager: block ids, ref counts, free-list order, prefix cache."""

import pytest

from vlmserve.scheduler.block_manager import BlockManager, NoFreeBlocks

BS = 4


def computed(bm: BlockManager, tokens: list[int], extra=None) -> list[int]:
    """A table covering `tokens`, with all its full blocks registered as computed."""
    table: list[int] = []
    bm.allocate(table, len(tokens))
    assert bm.register_full_blocks(table, tokens, len(tokens), 0, extra) == len(tokens) // BS
    return table


def test_allocate_hands_out_ids_in_order_and_grows_tables():
    bm = BlockManager(8, BS)
    a: list[int] = []
    assert bm.allocate(a, 10) == [0, 1, 2]
    assert bm.allocate(a, 12) == []  # 12 tokens still fit in 3 blocks
    assert bm.allocate(a, 13) == [3]
    b: list[int] = []
    assert bm.allocate(b, 1) == [4]
    assert a == [0, 1, 2, 3] and b == [4]
    assert bm.num_free_blocks == 3
    assert bm.ref_counts[:5] == [1, 1, 1, 1, 1]
    assert bm.free_block_ids() == [5, 6, 7]


def test_free_appends_tail_first_and_reuses_tail_first():
    bm = BlockManager(8, BS)
    a: list[int] = []
    b: list[int] = []
    bm.allocate(a, 12)  # 0 1 2
    bm.allocate(b, 8)  # 3 4
    bm.free(a)
    assert bm.free_block_ids() == [5, 6, 7, 2, 1, 0]
    bm.free(b)
    assert bm.free_block_ids() == [5, 6, 7, 2, 1, 0, 4, 3]
    c: list[int] = []
    assert bm.allocate(c, 5 * BS) == [5, 6, 7, 2, 1]
    assert bm.num_free_blocks == 3


def test_shared_prefix_counts_references():
    bm = BlockManager(8, BS)
    tokens = list(range(10))  # two full blocks and a partial one
    a = computed(bm, tokens)
    assert a == [0, 1, 2]
    assert bm.is_cached(0) and bm.is_cached(1) and not bm.is_cached(2)
    hit = bm.match_prefix(tokens + [99])
    assert hit == [0, 1]  # full blocks only
    b: list[int] = []
    assert bm.num_blocks_to_take(b, 11, hit) == 1  # hits are in use: only the fresh tail
    assert bm.allocate(b, 11, hit) == [0, 1, 3]
    assert bm.ref_counts[:4] == [2, 2, 1, 1]
    bm.free(a)
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert bm.free_block_ids() == [4, 5, 6, 7, 2]
    bm.free(b)
    assert bm.ref_counts[:4] == [0, 0, 0, 0]
    assert bm.free_block_ids() == [4, 5, 6, 7, 2, 3, 1, 0]


def test_prefix_hit_on_freed_block_takes_it_off_the_free_list():
    bm = BlockManager(6, BS)
    tokens = list(range(8))
    bm.free(computed(bm, tokens))  # blocks 0 1, freed but still registered
    assert bm.free_block_ids() == [2, 3, 4, 5, 1, 0]
    hit = bm.match_prefix(tokens + [1, 2])
    assert hit == [0, 1]
    table: list[int] = []
    # Hits that nobody holds come off the free list too, so they count against it.
    assert bm.num_blocks_to_take(table, 10, hit) == 3
    assert bm.allocate(table, 10, hit) == [0, 1, 2]
    assert bm.ref_counts[:3] == [1, 1, 1]
    assert bm.free_block_ids() == [3, 4, 5]


def test_reusing_a_free_block_drops_its_registration():
    bm = BlockManager(4, BS)
    tokens = list(range(8))
    bm.free(computed(bm, tokens))
    assert bm.free_block_ids() == [2, 3, 1, 0]
    other: list[int] = []
    bm.allocate(other, 2 * BS)  # takes 2 3: nothing cached lost
    assert bm.match_prefix(tokens) == [0, 1]
    bm.allocate(other, 3 * BS)  # takes 1, the tail of the cached prefix
    assert other == [2, 3, 1]
    assert not bm.is_cached(1) and bm.is_cached(0)
    assert bm.match_prefix(tokens) == [0]
    bm.allocate(other, 4 * BS)  # takes 0
    assert bm.match_prefix(tokens) == []
    # New content written to the reused blocks registers under its own key.
    new_tokens = list(range(100, 116))
    assert bm.register_full_blocks(other, new_tokens, 16, 0) == 4
    assert bm.match_prefix(new_tokens) == [2, 3, 1, 0]


def test_extra_keys_separate_blocks_with_equal_tokens():
    bm = BlockManager(8, BS)
    tokens = [5] * 8  # e.g. image placeholder ids
    a = computed(bm, tokens, extra=["img-a", "img-a"])
    assert bm.match_prefix(tokens) == []
    assert bm.match_prefix(tokens, ["img-b", "img-b"]) == []
    assert bm.match_prefix(tokens, ["img-a", "img-b"]) == [a[0]]
    assert bm.match_prefix(tokens, ["img-a", "img-a"]) == a
    # A list shorter than the blocks means "no extra key" for the rest.
    b = computed(bm, tokens + [6] * 4, extra=["img-b"])
    assert bm.match_prefix(tokens + [6] * 4, ["img-b"]) == b
    assert bm.match_prefix(tokens + [6] * 4, ["img-b", None, None]) == b


def test_chained_keys_need_the_same_prefix():
    bm = BlockManager(8, BS)
    computed(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    # Same second block after a different first block: no hit.
    assert bm.match_prefix([0, 2, 3, 4, 5, 6, 7, 8]) == []
    assert bm.match_prefix([1, 2, 3, 4, 0, 6, 7, 8]) == [0]


def test_register_only_full_computed_blocks_from_the_cursor():
    bm = BlockManager(8, BS)
    tokens = list(range(11))
    table: list[int] = []
    bm.allocate(table, 11)
    assert bm.register_full_blocks(table, tokens, 3, 0) == 0  # nothing full is computed
    assert bm.register_full_blocks(table, tokens, 6, 0) == 1
    assert bm.is_cached(0) and not bm.is_cached(1)
    assert bm.register_full_blocks(table, tokens, 11, 1) == 2
    assert bm.is_cached(1) and not bm.is_cached(2)
    assert bm.match_prefix(tokens) == [0, 1]


def test_same_prefix_computed_twice_keeps_the_first_block():
    bm = BlockManager(8, BS)
    tokens = list(range(4))
    a = computed(bm, tokens)
    b = computed(bm, tokens)
    assert (a, b) == ([0], [1])
    assert bm.match_prefix(tokens) == [0]
    assert not bm.is_cached(1)


def test_over_allocation_raises_and_changes_nothing():
    bm = BlockManager(4, BS)
    a: list[int] = []
    bm.allocate(a, 3 * BS)
    assert not bm.can_allocate([], 2 * BS)
    assert bm.can_allocate([], BS)
    b: list[int] = []
    with pytest.raises(NoFreeBlocks):
        bm.allocate(b, 2 * BS)
    assert b == [] and bm.num_free_blocks == 1
    with pytest.raises(NoFreeBlocks):
        bm.allocate(a, 5 * BS)
    assert a == [0, 1, 2] and bm.free_block_ids() == [3]


def test_double_free_raises():
    bm = BlockManager(4, BS)
    a: list[int] = []
    bm.allocate(a, 2 * BS)
    bm.free(a)
    with pytest.raises(ValueError, match="double free"):
        bm.free(a)
    with pytest.raises(ValueError, match="double free"):
        bm.free([3])  # never allocated
    assert bm.ref_counts == [0, 0, 0, 0]
    assert bm.free_block_ids() == [2, 3, 1, 0]
