"""The ring's work plan: which of a rank's queries see which rows of a K/V block.

At ring step i, rank r holds the K/V shard of rank (r - i) mod P. Each shard is one
or two equal chunks of the sequence (ckpt_attn.distributed.sharding), so the work
of a step is a few rectangles of the full problem, one of our chunks against one
of theirs: without a causal mask all of them; with one, a chunk sees the chunks
before it entirely, itself under the causal mask (local order is global order, so
the kernel's top-left causal path is exact), and nothing after it:

    zigzag, ours = chunks (r, 2P-1-r), theirs = chunks (s, 2P-1-s):
        s == r   (r, r) causal, (2P-1-r, r) full, (2P-1-r, 2P-1-r) causal
        s <  r   (r, s) and (2P-1-r, s)                  2 chunk x chunk rectangles
        s >  r   (2P-1-r, s) and (2P-1-r, 2P-1-s)        2 chunk x chunk rectangles
    contiguous, ours = chunk r:  s == r causal;  s < r full;  s > r nothing

Under zigzag every step costs two chunk x chunk rectangles' worth of pairs (the
diagonal step's two causal halves make up one), so ranks finish their steps
together. Each rectangle is one call of the attention op with its origin (the
global positions of its first row and key): the op draws dropout by global pair
index from it, and knows that its rows are part of longer rows.
"""

from __future__ import annotations

import dataclasses

from .sharding import shard_ranges


@dataclasses.dataclass(frozen=True)
class Block:
    """One attention call of a ring step: local query rows `rows` against K/V block rows
    `keys`, with the causal mask (top-left aligned, within the slices) or without;
    `origin` holds the global positions of rows.start and keys.start."""

    rows: slice
    keys: slice
    causal: bool
    origin: tuple[int, int]

    def pairs(self) -> int:
        """(query, key) pairs it computes, per batch and head."""
        rows, keys = self.rows.stop - self.rows.start, self.keys.stop - self.keys.start
        return rows * (rows + 1) // 2 if self.causal else rows * keys


def blocks(rank: int, source: int, world_size: int, local_len: int, causal: bool,
           layout: str) -> list[Block]:
    """What rank computes with the K/V shard of `source`: the visible chunk-by-chunk
    rectangles (none when nothing is visible)."""
    ours = shard_ranges(local_len * world_size, rank, world_size, layout)
    theirs = shard_ranges(local_len * world_size, source, world_size, layout)
    pieces = []
    for i, rows in enumerate(ours):
        for j, keys in enumerate(theirs):
            if causal and keys.start > rows.start:
                continue  # equal chunks: a later chunk is invisible to an earlier one
            pieces.append(Block(slice(i * len(rows), (i + 1) * len(rows)),
                                slice(j * len(keys), (j + 1) * len(keys)),
                                causal and keys.start == rows.start, (rows.start, keys.start)))
    return pieces


def steps(rank: int, world_size: int, local_len: int, causal: bool, layout: str
          ) -> list[tuple[int, list[Block]]]:
    """(source rank, its blocks) of each ring step, in the order the ring visits them."""
    sources = [(rank - step) % world_size for step in range(world_size)]
    return [(s, blocks(rank, s, world_size, local_len, causal, layout)) for s in sources]


def rank_pairs(rank: int, world_size: int, local_len: int, causal: bool, layout: str) -> int:
    """(query, key) pairs rank computes over the whole ring, per batch and head."""
    return sum(b.pairs() for _, step in steps(rank, world_size, local_len, causal, layout)
               for b in step)
