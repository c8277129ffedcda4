"""Images in the worker: encode new ones (batched, cached by content), merge them into the
token embeddings, and Qwen2-VL's multimodal positions.

A sequence's images are encoded when the sequence arrives (every new image of a step in one
batch, across requests); a prefill chunk then takes the rows of any image its tokens cover.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from vlmserve.shared.arrays import from_frames
from vlmserve.shared.messages import ImageMeta, NewSeq
from vlmserve.workers.layers.deepstack import LayerAdditions


@dataclass
class SeqImage:
    offset: int  # its placeholders are token_ids[offset:offset + length]
    length: int
    # [length, hidden * (1 + DeepStack levels)]: the placeholders' embeddings, then each
    # level's rows (Qwen3-VL); kept side by side so one slice serves a chunk's tokens.
    features: torch.Tensor
    # Which rows of the span are placeholders, in order (None: all of them); the others are
    # text tokens inside the image's span (Idefics3's row/column and frame separators).
    rows: torch.Tensor | None = None


@dataclass
class SeqPositions:
    """Qwen2-VL positions of a sequence's first tokens; later (text) ones are index + delta."""

    known: torch.Tensor  # [3, tokens known when the sequence arrived]
    delta: int

    def span(self, start: int, end: int) -> torch.Tensor:
        head = self.known[:, start:end]
        known = self.known.shape[1]  # a chunk may end before the known positions do
        rest = torch.arange(max(start, known), max(end, known)) + self.delta
        return torch.cat((head, rest.expand(3, -1)), dim=1)


class EncoderCache:
    """Vision encoder outputs by image content hash, least recently used dropped first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.queries = 0  # lookups and hits since start, for the encoder-cache hit rate
        self.hits = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        self.queries += 1
        if value is not None:
            self.hits += 1
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.max_bytes <= 0:
            return  # caching is off
        self.entries[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def _split_frames(new_seqs: list[NewSeq], frames: list) -> list[list[tuple[ImageMeta, list]]]:
    """Each new sequence's images with their own frames (they follow the plan in order)."""
    out, cursor = [], 0
    for new in new_seqs:
        images = []
        for meta in new.images:
            images.append((meta, frames[cursor : cursor + len(meta.arrays)]))
            cursor += len(meta.arrays)
        out.append(images)
    if cursor != len(frames):
        raise ValueError(f"plan carried {len(frames)} image frames, its images name {cursor}")
    return out


class ImageInputs:
    """The multimodal side of a ModelRunner for a VisionLanguageModel."""

    def __init__(self, model: torch.nn.Module, device: torch.device, cache_bytes: int) -> None:
        self.model = model
        self.device = device
        self.cache = EncoderCache(cache_bytes)

    def arrive(
        self, new_seqs: list[NewSeq], frames: list
    ) -> tuple[dict[int, tuple[list[SeqImage], SeqPositions | None]], dict[int, str]]:
        """Encode the images of newly arrived sequences that the cache lacks, in one batch.

        Returns each sequence's images and positions, and the sequences whose images could not
        be read or encoded, with the reason: one request's bad image fails that request alone.
        """
        per_seq = _split_frames(new_seqs, frames)
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, dict[str, torch.Tensor]] = {}
        bad: dict[str, str] = {}  # image hash -> why it cannot be used
        for images in per_seq:
            for meta, image_frames in images:
                if meta.hash in found or meta.hash in todo or meta.hash in bad:
                    continue
                cached = self.cache.get(meta.hash)
                if cached is not None:
                    found[meta.hash] = cached
                    continue
                try:
                    arrays = from_frames(meta.arrays, image_frames)
                    todo[meta.hash] = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
                except Exception as exc:  # arrays that do not match their description
                    bad[meta.hash] = f"{type(exc).__name__}: {exc}"
        if todo:
            found |= self._encode(todo, bad)
        ready, failed = {}, {}
        for new, images in zip(new_seqs, per_seq, strict=True):
            try:
                reasons = [bad[meta.hash] for meta, _ in images if meta.hash in bad]
                if reasons:
                    raise ValueError(reasons[0])
                ready[new.seq_id] = (
                    self._seq_images(new, images, found),
                    self._positions(new, images),
                )
            except Exception as exc:
                failed[new.seq_id] = f"the model could not take this request's image: {exc}"
        return ready, failed

    def _encode(
        self, todo: dict[str, dict[str, torch.Tensor]], bad: dict[str, str]
    ) -> dict[str, torch.Tensor]:
        """Every image of `todo` through the vision tower in one batch; if the batch fails,
        one image at a time, so that only the images that fail are marked `bad`."""
        try:
            features = self._encode_batch(todo)
        except Exception as exc:
            if len(todo) == 1:
                bad[next(iter(todo))] = f"{type(exc).__name__}: {exc}"
                return {}
            features = {}
            for key, arrays in todo.items():
                features |= self._encode({key: arrays}, bad)
            return features
        for key, value in features.items():
            self.cache.put(key, value)
        return features

    def _encode_batch(self, todo: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch per kind of input (images; Qwen-VL's videos name other arrays)."""
        kinds: dict[tuple[str, ...], list[str]] = {}
        for key, arrays in todo.items():
            kinds.setdefault(tuple(sorted(arrays)), []).append(key)
        out = {}
        for names, keys in kinds.items():
            batch = {n: torch.cat([todo[k][n] for k in keys]).to(self.device) for n in names}
            out |= dict(zip(keys, self.model.vision(batch), strict=True))
        return out

    def _seq_images(
        self, new: NewSeq, images: list[tuple[ImageMeta, list]], found: dict[str, torch.Tensor]
    ) -> list[SeqImage]:
        out = []
        for meta, _ in images:
            features, rows = found[meta.hash], None
            placeholders = meta.length
            if self.model.image_span_holds_text:
                span = torch.tensor(new.token_ids[meta.offset : meta.offset + meta.length])
                rows = torch.isin(span, self.model.placeholder_ids()).nonzero().flatten()
                placeholders = len(rows)
            if features.shape[0] != placeholders:
                raise ValueError(
                    f"image {meta.hash[:12]} encodes to {features.shape[0]} rows "
                    f"for {placeholders} placeholder tokens"
                )
            out.append(SeqImage(meta.offset, meta.length, features, rows))
        return out

    def _positions(self, new: NewSeq, images: list) -> SeqPositions | None:
        if not self.model.uses_mrope:
            return None
        ids = torch.tensor(new.token_ids)
        if not images:
            return SeqPositions(torch.arange(len(ids)).expand(3, -1), 0)
        grids: dict[str, list[torch.Tensor]] = {}  # image_grid_thw, video_grid_thw, seconds
        for meta, image_frames in images:
            for name, value in from_frames(meta.arrays, image_frames).items():
                if name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
                    grids.setdefault(name, []).append(torch.from_numpy(np.array(value)))
        positions, delta = self.model.rope_index(
            ids, *(torch.cat(grids[n]) if n in grids else None
                   for n in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"))
        )  # fmt: skip
        return SeqPositions(positions, delta)

    def embed(
        self, input_ids: torch.Tensor, spans: list[tuple[int, int, int, list[SeqImage]]]
    ) -> tuple[torch.Tensor, LayerAdditions | None]:
        """Token embeddings with image rows put in, and the DeepStack levels of those rows
        (None when the model has none or the step holds no image token): `spans` are
        (batch row, start, end, images) of each sequence in the step."""
        embeds = self.model.embed(input_ids)  # [tokens, hidden]
        rows: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        for row, start, end, images in spans:
            for image in images:  # the part of each image that this chunk of tokens covers
                a, b = max(start, image.offset), min(end, image.offset + image.length)
                if a >= b:
                    continue
                if image.rows is None:
                    rows.append(torch.arange(row + a - start, row + b - start))
                    features.append(image.features[a - image.offset : b - image.offset])
                else:  # only its placeholders: span rows a..b that are image tokens
                    inside = (image.rows >= a - image.offset) & (image.rows < b - image.offset)
                    rows.append(image.rows[inside] + image.offset - start + row)
                    features.append(image.features[inside])
        if not rows:
            return embeds, None
        hidden = embeds.shape[-1]
        at, found = torch.cat(rows).to(embeds.device), torch.cat(features)
        embeds[at] = found[:, :hidden].to(embeds.dtype)
        if found.shape[-1] == hidden:
            return embeds, None
        return embeds, LayerAdditions(at, list(found[:, hidden:].split(hidden, dim=-1)))
