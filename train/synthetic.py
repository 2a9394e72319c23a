"""A deterministic, learnable token stream behind the loader interface.

Documents are walks of a fixed random Markov chain (each token has 4 likely successors), packed
into rows with segment_ids and restarting positions. Batch `step` of host `shard_index` is a pure
function of (seed, split, step, global row), so any process count sees the same global batch and
a restored position continues the same stream. Used for tests and benchmarks, and by the loop
when `config.data.kind == "synthetic"`.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from hibari.base.segments import positions_from_segments

SPLITS = {"train": 0, "eval": 1}


class SyntheticTokens:
    def __init__(self, *, vocab_size: int, batch_size: int, seq_len: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, split: str = "train",
                 mean_doc_len: int = 0):
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.seed, self.split = seed, SPLITS[split]
        self.shard_index, self.shard_count = shard_index, shard_count
        self.mean_doc_len = mean_doc_len or max(seq_len // 2, 1)
        self.successors = np.random.default_rng([seed, 7]).integers(
            0, vocab_size, size=(vocab_size, 4))
        self._step = 0

    def _row(self, step: int, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split, step, row])
        t = self.seq_len
        starts = rng.random(t) < 1.0 / self.mean_doc_len
        starts[0] = True
        segment_ids = np.cumsum(starts).astype(np.int32)
        positions = positions_from_segments(segment_ids)
        choice = rng.integers(0, 4, size=t)
        uniform = rng.integers(0, self.vocab_size, size=t)
        jump = rng.random(t) < 0.1
        tokens = np.empty(t, np.int32)
        for i in range(t):
            if starts[i] or jump[i]:
                tokens[i] = uniform[i]
            else:
                tokens[i] = self.successors[tokens[i - 1], choice[i]]
        return tokens, segment_ids, positions

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch `step`."""
        first = self.shard_index * self.batch_size
        rows = [self._row(step, first + r) for r in range(self.batch_size)]
        tokens, segment_ids, positions = (np.stack(x) for x in zip(*rows))
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            batch = self.batch(self._step)
            self._step += 1
            yield batch

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])
