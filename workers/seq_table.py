"""The workers' per-sequence tensors, kept across steps and updated from each plan's deltas.

Every live sequence owns one row of a block table that stays on the model's device: a plan's
new block ids are written into their rows (one small scatter per step, however long the
sequences are), and a step's block tables, slots and positions are tensor ops over those rows.
What crosses from the host each step is one int32 buffer, pinned on CUDA and copied without
blocking, whose size grows with the step's sequences, new tokens and new blocks, never with
the sequences' history.
"""

from __future__ import annotations

import torch

from vlmserve.workers.attention.metadata import AttentionMetadata

_MIN_ROWS = 64
_MIN_WIDTH = 16


class SeqTable:
    """Rows of per-sequence state on `device`: each sequence's block table and block count."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tables = torch.zeros(_MIN_ROWS, _MIN_WIDTH, dtype=torch.int32, device=device)
        self.row_of: dict[int, int] = {}  # seq id -> its row
        self.num_blocks: dict[int, int] = {}  # seq id -> blocks in its row
        self._free_rows = list(range(_MIN_ROWS - 1, -1, -1))  # popped from the end: 0 first
        self._pending: list[int] = []  # (row, column, block) triples not yet written, flat

    def add(self, seq_id: int) -> None:
        """A row for a new (or resumed) sequence, with an empty block table."""
        if not self._free_rows:
            self._grow(rows=2 * self.tables.shape[0])
        row = self._free_rows.pop()
        self.row_of[seq_id] = row
        self.num_blocks[seq_id] = 0
        self.tables[row].zero_()  # padding past a sequence's blocks is block 0, as in a fresh row

    def remove(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            del self.num_blocks[seq_id]
            self._free_rows.append(row)
            if self._pending:  # block ids queued for a sequence that left without a step
                triples = [self._pending[i : i + 3] for i in range(0, len(self._pending), 3)]
                self._pending = [x for t in triples if t[0] != row for x in t]

    def append_blocks(self, seq_id: int, block_ids: list[int]) -> None:
        """Queue `block_ids` for the end of the sequence's table (written by `metadata`)."""
        if not block_ids:
            return
        row, first = self.row_of[seq_id], self.num_blocks[seq_id]
        self.num_blocks[seq_id] = first + len(block_ids)
        if first + len(block_ids) > self.tables.shape[1]:  # queued triples stay valid
            self._grow(width=max(2 * self.tables.shape[1], first + len(block_ids)))
        for col, block in enumerate(block_ids, first):
            self._pending += (row, col, block)

    def _grow(self, rows: int | None = None, width: int | None = None) -> None:
        old_rows, old_width = self.tables.shape
        rows, width = rows or old_rows, width or old_width
        grown = torch.zeros(rows, width, dtype=torch.int32, device=self.device)
        grown[:old_rows, :old_width] = self.tables
        self.tables = grown
        self._free_rows = list(range(rows - 1, old_rows - 1, -1)) + self._free_rows

    def metadata(
        self,
        seq_ids: list[int],
        starts: list[int],
        query_lens: list[int],
        input_ids: list[int],
        sample_rows: list[int],
        block_size: int,
    ) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
        """The step's attention metadata, input ids ([tokens] int64) and the rows whose logits
        are sampled ([sampled] int64), on the device.

        Sequences compute tokens [start, start + query_len) each and come decodes first. The
        queued block ids travel in the same host-to-device copy as the step's inputs.
        """
        num_seqs, num_tokens = len(seq_ids), len(input_ids)
        rows = [self.row_of[seq_id] for seq_id in seq_ids]
        pending, self._pending = self._pending, []
        # One host buffer: rows, starts, query lengths, input ids, sampled rows and the queued
        # (row, column, block) triples.
        host = torch.tensor(
            rows + starts + query_lens + input_ids + sample_rows + pending, dtype=torch.int32
        )
        if self.device.type == "cuda":
            host = host.pin_memory()
        buffer = host.to(self.device, non_blocking=True)
        row, start, query_len, ids, sampled, triples = buffer.split(
            [num_seqs, num_seqs, num_seqs, num_tokens, len(sample_rows), len(pending)]
        )
        if len(pending):
            triples = triples.view(-1, 3)
            self.tables[triples[:, 0].long(), triples[:, 1].long()] = triples[:, 2]

        # Host copies of the small per-sequence figures, for backends that plan shapes.
        start_cpu = host[num_seqs : 2 * num_seqs]
        query_len_cpu = host[2 * num_seqs : 3 * num_seqs]
        seq_lens_cpu = start_cpu + query_len_cpu
        query_start_loc_cpu = torch.zeros(num_seqs + 1, dtype=torch.int32)
        torch.cumsum(query_len_cpu, 0, out=query_start_loc_cpu[1:])
        max_seq_len = max(s + q for s, q in zip(starts, query_lens, strict=True))
        num_decodes = 0
        while num_decodes < num_seqs and query_lens[num_decodes] == 1:
            num_decodes += 1

        seq_lens = start + query_len
        query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(query_len, 0, out=query_start_loc[1:])
        width = -(-max_seq_len // block_size)
        tables = self.tables[:, :width].index_select(0, row.long())  # [seqs, width]
        if num_tokens == num_seqs:  # decodes only: one token per sequence
            seq_of_token = torch.arange(num_seqs, device=self.device)
        else:
            seq_of_token = torch.repeat_interleave(
                torch.arange(num_seqs, device=self.device), query_len.long(), output_size=num_tokens
            )  # [tokens]
        offset = (start - query_start_loc[:-1]).long()  # position minus batch row, per sequence
        positions = torch.arange(num_tokens, device=self.device) + offset[seq_of_token]
        blocks = tables[seq_of_token, positions // block_size].long()
        metadata = AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=tables,
            slot_mapping=blocks * block_size + positions % block_size,
            positions=positions,
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens_cpu=seq_lens_cpu,
            block_size=block_size,
            num_seqs=num_seqs,
            num_decodes=num_decodes,
            num_tokens=num_tokens,
            max_query_len=max(query_lens),
            max_seq_len=max_seq_len,
        )
        return metadata, ids.long(), sampled.long()
