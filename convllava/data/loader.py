"""One rank's training input: the micro-batches of its epoch plan as shard rows, read ahead in row groups.

`RankLoader` reads each row group the rank's remaining steps need exactly once, in the order the micro-batches first
need them, `prefetch` row groups ahead of the step in background threads (S3 latency and Parquet decoding overlap
the step). It keeps only the rows still to be used: at most the rows of the plan's window, the samples carried
between windows, and `prefetch` row groups in flight. No copy of the index per thread: the threads share the
process's ShardSet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from convllava.data.epochs import EpochPlan
from convllava.data.shards import ShardSet

Row = dict[str, Any]


@dataclass
class LoaderStats:
    """What a loader read: row groups and rows, and the most rows it held at once (read, not yet used)."""

    pieces_read: int = 0
    rows_read: int = 0
    max_buffered_rows: int = 0
    max_in_flight: int = 0


class RankLoader:
    """`(step, micro-batches)` for `rank` from `start_step` on, each micro-batch a list of shard rows in plan order.

    Args:
        shards: the opened output the plan indexes.
        plan: the epoch's plan (`plan_shard_epoch`: reads stay local; any EpochPlan works, at a read per row group).
        prefetch: row groups read ahead of the one the current step needs (their memory is the bound you set:
            prefetch × the row-group size, ROW_GROUP_BYTES of images by default).
        threads: parallel reads (≤ prefetch).
    """

    def __init__(
        self, shards: ShardSet, plan: EpochPlan, rank: int, start_step: int = 0, prefetch: int = 4, threads: int = 4
    ) -> None:
        if prefetch < 1 or threads < 1:
            raise ValueError(f"prefetch and threads must be >= 1, got {prefetch} and {threads}")
        if not 0 <= rank < plan.world_size:
            raise IndexError(f"rank {rank} out of range for world_size {plan.world_size}")
        if not 0 <= start_step <= plan.num_steps:
            raise IndexError(f"start_step {start_step} out of range: the epoch has {plan.num_steps} steps")
        self.shards, self.plan, self.rank, self.start_step = shards, plan, rank, start_step
        self.prefetch, self.threads = prefetch, min(threads, prefetch)
        self.stats = LoaderStats()
        flat = plan.batches[start_step:, :, rank, :].ravel()
        pieces = shards.layout.piece_of(flat)
        _, first = np.unique(pieces, return_index=True)
        self.order: list[int] = pieces[np.sort(first)].tolist()  # row groups in the order of first need
        self._wanted = np.zeros(len(shards), dtype=bool)
        self._wanted[flat] = True

    def _read(self, piece: int) -> list[tuple[int, Row]]:
        """(sample, row) of the piece's rows this loader still needs."""
        table = self.shards.read_piece(piece)
        start = int(self.shards.layout.piece_starts[piece])
        keep = np.flatnonzero(self._wanted[start : start + table.num_rows])
        rows = table.take(keep).to_pylist() if len(keep) < table.num_rows else table.to_pylist()
        return list(zip((start + keep).tolist(), rows, strict=True))

    def __iter__(self) -> Iterator[tuple[int, list[list[Row]]]]:
        buffer: dict[int, Row] = {}
        pending: deque[Future] = deque()
        upcoming = iter(self.order)
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix=f"convllava-loader-r{self.rank}")

        def fill() -> None:
            while len(pending) < self.prefetch:
                piece = next(upcoming, None)
                if piece is None:
                    return
                pending.append(pool.submit(self._read, piece))
            self.stats.max_in_flight = max(self.stats.max_in_flight, len(pending))

        try:
            fill()
            for step in range(self.start_step, self.plan.num_steps):
                micro = []
                for samples in self.plan.batches[step, :, self.rank, :].tolist():
                    for i in samples:
                        while i not in buffer:
                            if not pending:
                                raise RuntimeError(f"internal error: sample {i} of step {step} is in no row group read")
                            got = pending.popleft().result()
                            buffer.update(got)
                            self.stats.pieces_read += 1
                            self.stats.rows_read += len(got)
                            self.stats.max_buffered_rows = max(self.stats.max_buffered_rows, len(buffer))
                            fill()
                    micro.append([buffer.pop(i) for i in samples])
                yield step, micro
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
