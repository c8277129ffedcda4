"""One request as the scheduler sees it: its tokens, how many are computed, and its blocks."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field

from vlmserve.shared.messages import ImageMeta, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Scheduling state of one request.

    Scheduling lets `num_computed` catch up with `num_tokens`: a prefill, a prefill chunk and a
    decode are all "compute the next `n` tokens", and a sampled token appended to `token_ids`
    simply makes one more token to compute.
    """

    request_id: str
    frontend_id: str
    token_ids: list[int]  # prompt followed by the outputs so far
    prompt_len: int
    sampling: SamplingParams
    seed: int  # sampling.seed, or one drawn by the scheduler so a resumed request samples alike
    # Per-block extra cache keys (image hashes); see BlockManager.match_prefix.
    extra_keys: list[Hashable | None] | None = None
    num_computed: int = 0  # tokens whose KV is in the cache (or scheduled to be)
    block_table: list[int] = field(default_factory=list)
    seq_id: int | None = None  # the id workers know it by; new on each admission
    num_sent: int = 0  # how many of token_ids the workers already have
    num_sent_blocks: int = 0  # how many of block_table the workers already have
    num_hashed_blocks: int = 0  # cursor of BlockManager.register_full_blocks
    num_cached_tokens: int = 0  # prefix-cache hit of the first admission, for usage reports
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    images: list[ImageMeta] = field(default_factory=list)
    image_frames: list = field(default_factory=list)  # raw array frames, sent on each admission
    arrived_at: float = 0.0  # time.monotonic() when the scheduler took it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens still to compute; 1 for a decode, 0 while its sampled token is in flight."""
        return len(self.token_ids) - self.num_computed
