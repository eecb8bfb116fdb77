"""Context parallelism on gloo: 4 CPU ranks on 127.0.0.1, spawned once; they run every
case (tests/context_parallel_worker.py) with the sequence over all 4 ranks, then over 2
(two subgroups of 2 at once), each against the single-process computation on the full
sequence.

Every rank is bounded in time: the group's collectives time out, the spawned processes
are killed at a deadline, and a rank that fails makes the test fail (its peers, left
waiting on it, are killed), so a stuck rank never hangs CI.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import time

import context_parallel_worker as worker
import pytest
import torch

from ckpt_attn.distributed import ring_buffer_bytes, ring_bytes_sent, shard_positions
from ckpt_attn.distributed.schedule import rank_pairs, steps

DEADLINE_S = 150  # wall clock for every case on every rank, process startup included
KILL_GRACE_S = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks() -> dict[int, dict]:
    """Run the worker on its ranks: {rank: {(group size, case): (status, detail)}}."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=worker.run, args=(rank, port, results), daemon=True)
             for rank in range(worker.WORLD_SIZE)]
    for process in ranks:
        process.start()
    outcome, deadline = {}, time.monotonic() + DEADLINE_S
    try:
        while len(outcome) < len(ranks):
            try:
                rank, cases = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                break
            outcome[rank] = cases
            if any(status == "failed" for status, _ in cases.values()):
                break  # the other ranks wait on this one: stop them
    finally:
        for process in ranks:
            process.join(timeout=KILL_GRACE_S if len(outcome) == len(ranks) else 0.1)
            if process.is_alive():
                process.kill()
                process.join()
    return outcome


@pytest.fixture(scope="module")
def outcome():
    """Every rank's case outcomes, from one spawn."""
    return _spawn_ranks()


CASES = [(size, name) for size in worker.GROUP_SIZES for name in worker.case_names(size)]


@pytest.mark.parametrize(("size", "name"), CASES, ids=[f"{s}ranks-{n}" for s, n in CASES])
def test_case(outcome, size, name):
    """The case passed on every rank (see context_parallel_worker for what it checks)."""
    failures = [f"rank {rank} {key}: {detail}" for rank, cases in sorted(outcome.items())
                for key, (status, detail) in cases.items() if status == "failed"]
    for rank in range(worker.WORLD_SIZE):
        if (size, name) not in outcome.get(rank, {}):
            pytest.fail(f"case {name} over {size} ranks did not run on rank {rank} (ranks "
                        f"that reported within {DEADLINE_S} s: {sorted(outcome)}); failures:\n"
                        + "\n".join(failures))
        status, detail = outcome[rank][size, name]
        assert status == "ok", f"rank {rank}:\n{detail}"


def _planned(rank, world_size, local_len, causal, layout):
    """{source: (local_len, local_len) bool of the pairs rank's blocks compute}, checking
    that each block's origin is the global position of its first row and key."""
    seq = local_len * world_size
    rows = shard_positions(seq, rank, world_size, layout)
    planned = {}
    for source, blocks in steps(rank, world_size, local_len, causal, layout):
        keys = shard_positions(seq, source, world_size, layout)
        done = torch.zeros(local_len, local_len, dtype=torch.int64)
        for block in blocks:
            assert block.origin == (int(rows[block.rows.start]), int(keys[block.keys.start]))
            part = torch.ones(block.rows.stop - block.rows.start,
                              block.keys.stop - block.keys.start, dtype=torch.int64)
            done[block.rows, block.keys] += part.tril() if block.causal else part
        planned[source] = done
    return planned


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False])
def test_schedule_computes_each_visible_pair_once(layout, causal):
    """Over the ring, each rank's blocks cover exactly the pairs the global mask lets its
    queries see, each once, from every source."""
    for world_size in (1, 2, 3, 4):
        local_len, seq = 6, 6 * world_size
        for rank in range(world_size):
            rows = shard_positions(seq, rank, world_size, layout)
            for source, done in _planned(rank, world_size, local_len, causal, layout).items():
                keys = shard_positions(seq, source, world_size, layout)
                visible = (keys[None, :] <= rows[:, None]) if causal else \
                    torch.ones(local_len, local_len, dtype=torch.bool)
                assert torch.equal(done, visible.long()), (world_size, rank, source)


def test_zigzag_balances_causal_work():
    """Under zigzag every rank computes as many causal pairs, at every step (the diagonal
    step's two causal triangles stand for one rectangle, plus a diagonal); contiguous does
    not."""
    for world_size in (2, 3, 4):
        per_rank = [rank_pairs(r, world_size, 6, True, "zigzag") for r in range(world_size)]
        seq = 6 * world_size
        assert len(set(per_rank)) == 1 and sum(per_rank) == seq * (seq + 1) // 2
        for rank in range(world_size):
            work = [sum(b.pairs() for b in blocks)
                    for _, blocks in steps(rank, world_size, 6, True, "zigzag")]
            # chunks of 3: two 3 x 3 rectangles; the diagonal's causal halves 6 + 6
            assert work[1:] == [18] * (world_size - 1) and work[0] == 6 + 9 + 6, work
    pairs = [rank_pairs(r, 4, 6, True, "contiguous") for r in range(4)]
    assert pairs == [21, 57, 93, 129]


def test_ring_costs_formulas():
    """The stated buffer and traffic formulas on one configuration, by hand."""
    kv = 2 * 1 * 2 * 8 * 16 * 2  # k and v, bf16
    dkv = kv * 2  # float32
    accumulator = 1 * 4 * 8 * 16 * 4
    held = ring_buffer_bytes(1, 4, 2, 8, 16, torch.bfloat16, 4)
    assert (held.forward, held.backward) == (2 * kv + accumulator,
                                             2 * kv + 2 * dkv + accumulator)
    sent = ring_bytes_sent(1, 4, 2, 8, 16, torch.bfloat16, 4)
    assert (sent.forward, sent.backward) == (3 * kv, 3 * kv + 4 * dkv)
    assert ring_bytes_sent(1, 4, 2, 8, 16, torch.bfloat16, 1).total == 0
    with pytest.raises(ValueError, match="local_len"):
        ring_buffer_bytes(1, 4, 2, -1, 16, torch.bfloat16, 2)
