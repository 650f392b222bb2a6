"""Document-aware packing: documents -> rows of `windows` windows of L tokens, each document from a window boundary.

A document of n tokens is laid out next-token style: its first n - 1 tokens are inputs, its last n - 1 targets
(its first token gets no prediction). It takes ceil((n - 1) / L) whole windows; documents follow each other in a
row, and the rest of a document's last window is padding. A document longer than a row (n - 1 > T = windows L) is
cut into pieces of at most T + 1 tokens that start every T tokens, so consecutive pieces share one token: the last
target of a piece is the first input of the next, and every token but the document's first is a target exactly
once. Each piece is a document of its own (its context starts afresh).

The plan of an epoch (which pieces go in which row) is deterministic from the seed: the pieces are shuffled with
(seed, epoch), then placed first-fit: each goes into the earliest-opened row with enough free windows, else opens a
new row. Rows are numbered in the order they open, epoch after epoch, so row i is a pure function of (the pieces,
the layout, the seed, i), whatever the number of processes reading it.
"""

from __future__ import annotations

import heapq
import threading

import numpy as np

EXAMPLE_KEYS = ("inputs", "targets", "loss_mask", "valid", "document_start", "position")


def split_documents(starts: np.ndarray, lengths: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the pieces of documents (start, length) in a token array: documents of at most
    row_length + 1 tokens stay whole, longer ones become pieces starting every row_length tokens, each at most
    row_length + 1 long. Documents of fewer than 2 tokens (nothing to predict) are dropped."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    keep = lengths >= 2
    starts, lengths = starts[keep], lengths[keep]
    counts = -(-(lengths - 1) // row_length)
    document = np.repeat(np.arange(len(lengths)), counts)
    index_in_document = np.arange(len(document)) - np.repeat(np.cumsum(counts) - counts, counts)
    offset = index_in_document * row_length
    piece_lengths = np.minimum(row_length + 1, lengths[document] - offset)
    return starts[document] + offset, piece_lengths


def windows_needed(lengths: np.ndarray, window: int) -> np.ndarray:
    """Windows a document of each length takes: its n - 1 inputs, rounded up to whole windows."""
    return -(-(np.asarray(lengths, np.int64) - 1) // window)


def first_fit(piece_windows: np.ndarray, order: np.ndarray, windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Places the pieces in `order` first-fit into rows of `windows` windows. Returns (row_starts, pieces): row r
    holds pieces[row_starts[r]:row_starts[r + 1]], in the order they were placed (their order in the row)."""
    open_rows: list[list[int]] = [[] for _ in range(windows)]  # free windows -> heap of the row ids open with them
    row_of = np.empty(len(order), np.int64)
    rows = 0
    for i, piece in enumerate(order):
        need = int(piece_windows[piece])
        candidates = [(heap[0], free) for free, heap in enumerate(open_rows) if free >= need and heap]
        if candidates:
            row, free = min(candidates)
            heapq.heappop(open_rows[free])
        else:
            row, free, rows = rows, windows, rows + 1
        row_of[i] = row
        if free - need:
            heapq.heappush(open_rows[free - need], row)
    placed = np.argsort(row_of, kind="stable")
    return np.searchsorted(row_of[placed], np.arange(rows + 1)), np.asarray(order)[placed]


def row_example(tokens: np.ndarray, starts, lengths, window: int, windows: int, pad_id: int) -> dict:
    """One row of windows * window positions holding the documents tokens[start:start + length] in order, each
    from a window boundary:

    - `inputs`, `targets` (int32): a document's tokens[:-1] and tokens[1:]; `pad_id` on padding;
    - `loss_mask` (float32): 1 on every document input, 0 on padding; `valid` (bool): the same, as a flag;
    - `document_start` (bool): True at each document's first input (always a window boundary);
    - `position` (int32): an input's index in its document (its context is that many tokens before it); 0 on padding.
    """
    length = window * windows
    example = {
        "inputs": np.full(length, pad_id, np.int32),
        "targets": np.full(length, pad_id, np.int32),
        "loss_mask": np.zeros(length, np.float32),
        "valid": np.zeros(length, bool),
        "document_start": np.zeros(length, bool),
        "position": np.zeros(length, np.int32),
    }
    at = 0
    for start, n in zip(starts, lengths, strict=True):
        document = np.asarray(tokens[start : start + n])
        inputs = slice(at, at + n - 1)
        if inputs.stop > length:
            raise ValueError(f"documents of {list(lengths)} tokens do not fit in {windows} windows of {window}")
        example["inputs"][inputs], example["targets"][inputs] = document[:-1], document[1:]
        example["loss_mask"][inputs], example["valid"][inputs] = 1.0, True
        example["document_start"][at] = True
        example["position"][inputs] = np.arange(n - 1)
        at += int(windows_needed(n, window)) * window
    return example


class PackedRows:
    """Rows packed from documents (start, length) of `tokens`, epoch after epoch; `self[i]` is row i.

    Each epoch's plan is computed when a row of it is first asked for (under a lock: grain reads from threads); the
    counts of rows of every epoch so far are kept, the plans of the last two epochs.
    """

    def __init__(self, tokens, starts, lengths, window: int, windows: int, pad_id: int, seed: int) -> None:
        self.tokens, self.window, self.windows, self.pad_id, self.seed = tokens, window, windows, pad_id, seed
        self.piece_starts, self.piece_lengths = split_documents(starts, lengths, window * windows)
        if not len(self.piece_starts):
            raise ValueError("no document of 2 tokens or more to pack")
        self.piece_windows = windows_needed(self.piece_lengths, window)
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rows_before = [0]  # rows in the epochs before epoch e, for every e planned so far and one more
        self._lock = threading.RLock()

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row_starts, pieces) of an epoch (see `first_fit`)."""
        with self._lock:
            if epoch not in self._plans:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.piece_starts))
                self._plans[epoch] = first_fit(self.piece_windows, order, self.windows)
                for old in sorted(self._plans)[:-2]:
                    del self._plans[old]
            return self._plans[epoch]

    def rows_in_epoch(self, epoch: int) -> int:
        return len(self.plan(epoch)[0]) - 1

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, row in the epoch) of row `index`."""
        with self._lock:
            while self._rows_before[-1] <= index:
                self._rows_before.append(self._rows_before[-1] + self.rows_in_epoch(len(self._rows_before) - 1))
        epoch = int(np.searchsorted(self._rows_before, index, side="right")) - 1
        return epoch, index - self._rows_before[epoch]

    def __getitem__(self, index: int) -> dict:
        epoch, row = self.locate(int(index))
        row_starts, pieces = self.plan(epoch)
        placed = pieces[row_starts[row] : row_starts[row + 1]]
        return row_example(
            self.tokens, self.piece_starts[placed], self.piece_lengths[placed], self.window, self.windows, self.pad_id
        )
