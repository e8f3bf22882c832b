"""Encoded pairs and length-bucketed batches."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import BOS_ID, EOS_ID, PAD_ID
from .model import RecallInput
from .text import Tokenizer, normalize

MAX_MESSAGE_CHARS = 500  # characters of a message tokenised at most (bounded time for any input)
RECALL_QUESTION_PIECES = 16  # a recall slot keeps this many pieces of its question
RECALL_ANSWER_PIECES = 24  # ... and of its answer


@dataclass
class EncodedPairs:
    src: list[list[int]]  # question ids, cut to max_source_len
    tgt: list[list[int]]  # answer ids + </s>, cut to max_target_len
    topics: list[int]  # each question's topic (the corpus's label column)
    recall_rows: list[list[int]] | None = None  # recall models: each question's K recalled index rows (-1: none)
    recall_scores: list[list[float]] | None = None  # ... and their similarity scores

    def __len__(self) -> int:
        return len(self.src)

    def target_tokens(self) -> int:
        return sum(len(t) for t in self.tgt)


class EncodedMessage(NamedTuple):
    """A user's message as the model reads it."""

    text: str  # normalised, at most MAX_MESSAGE_CHARS characters (what the topic classifier reads)
    ids: list[int]  # its pieces, at most max_source_len (empty: nothing to answer)
    truncated: bool  # pieces were dropped: the model reads only the first max_source_len


def encode_message(tokenizer: Tokenizer, text: str, max_source_len: int) -> EncodedMessage:
    """The one place where a message (chat, ``/reply``, ``/compare``, the CLI, ``evaluate``) is normalised
    and cut: its first MAX_MESSAGE_CHARS characters tokenised, then its first ``max_source_len`` pieces
    kept. ``truncated``: some of the text went unread (pieces, or characters past the limit)."""
    text = normalize(text[: MAX_MESSAGE_CHARS * 2])
    cut = len(text) > MAX_MESSAGE_CHARS
    text = text[:MAX_MESSAGE_CHARS]
    ids = tokenizer.encode(text)
    return EncodedMessage(text, ids[:max_source_len], cut or len(ids) > max_source_len)


def encode_source(tokenizer: Tokenizer, text: str, max_len: int, sample_alpha: float = 0.0,
                  rng: np.random.Generator | None = None) -> list[int]:
    return tokenizer.encode(text, sample_alpha, rng)[:max_len]


def encode_pairs(tokenizer: Tokenizer, questions: Iterable[str], answers: Iterable[str],
                 topics: Iterable[int], max_source_len: int, max_target_len: int) -> EncodedPairs:
    src, tgt = [], []
    for q, a in zip(questions, answers):
        s = encode_source(tokenizer, q, max_source_len) or [EOS_ID]  # never an empty source
        src.append(s)
        tgt.append(tokenizer.encode(a)[: max_target_len - 1] + [EOS_ID])
    return EncodedPairs(src, tgt, [int(x) for x in topics])


class RecallSlots:
    """The indexed training pairs as a recall model reads them: one slot per pair, its question's first
    RECALL_QUESTION_PIECES pieces, ``</s>``, its answer's first RECALL_ANSWER_PIECES pieces (each pair
    tokenised once, when first recalled)."""

    def __init__(self, tokenizer: Tokenizer, questions: Sequence[str], answers: Sequence[str]):
        self.tokenizer, self.questions, self.answers = tokenizer, list(questions), list(answers)
        self._ids: dict[int, list[int]] = {}

    def ids(self, row: int) -> list[int]:
        """The slot of index row ``row`` (-1, no recall: a lone ``</s>``)."""
        if row < 0:
            return [EOS_ID]
        if row not in self._ids:
            q = self.tokenizer.encode(self.questions[row])[:RECALL_QUESTION_PIECES]
            a = self.tokenizer.encode(self.answers[row])[:RECALL_ANSWER_PIECES]
            self._ids[row] = q + [EOS_ID] + a
        return self._ids[row]

    def batch(self, rows: Sequence[Sequence[int]], scores: Sequence[Sequence[float]]) -> RecallInput:
        """(B lists of K rows, their scores) -> :class:`RecallInput` with ids (B, K, L)."""
        slots = [[self.ids(int(r)) for r in rs] for rs in rows]
        L = max(len(x) for s in slots for x in s)
        ids = torch.tensor([[x + [PAD_ID] * (L - len(x)) for x in s] for s in slots], dtype=torch.long)  # (B, K, L)
        lengths = torch.tensor([[len(x) for x in s] for s in slots], dtype=torch.long)
        return RecallInput(ids, lengths, torch.tensor(scores, dtype=torch.float32))


@dataclass
class Batch:
    src: Tensor  # (B, S) padded question ids
    src_len: Tensor  # (B,)
    tgt_in: Tensor  # (B, T) <s> + answer
    tgt_out: Tensor  # (B, T) answer + </s>
    topic: Tensor  # (B,) each question's topic
    recall: RecallInput | None = None  # recall models: the training pairs recalled for each question

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.src, self.src_len, self.tgt_in, self.tgt_out, self.topic)),
                     None if self.recall is None else self.recall.to(device, non_blocking))

    def pin_memory(self) -> "Batch":
        recall = None if self.recall is None else RecallInput(
            *(t.pin_memory() for t in (self.recall.ids, self.recall.lengths, self.recall.scores)))
        return Batch(*(t.pin_memory() for t in (self.src, self.src_len, self.tgt_in, self.tgt_out, self.topic)),
                     recall)

    @property
    def num_target_tokens(self) -> int:
        return int((self.tgt_out != PAD_ID).sum())


def pad(seqs: Sequence[Sequence[int]], prefix: int | None = None) -> Tensor:
    extra = 0 if prefix is None else 1
    out = torch.full((len(seqs), max(len(s) for s in seqs) + extra), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = ([prefix] if prefix is not None else []) + list(s)
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(pairs: EncodedPairs, idx: Sequence[int], slots: RecallSlots | None = None) -> Batch:
    """The pairs ``idx`` as padded tensors; with ``slots``, their recalled pairs too (recall models)."""
    src = [pairs.src[i] for i in idx]
    tgt = [pairs.tgt[i] for i in idx]
    tgt_out = pad(tgt)
    tgt_in = pad([t[:-1] for t in tgt], prefix=BOS_ID)
    tgt_in = tgt_in[:, : tgt_out.size(1)]
    recall = None
    if slots is not None and pairs.recall_rows is not None:
        recall = slots.batch([pairs.recall_rows[i] for i in idx], [pairs.recall_scores[i] for i in idx])
    return Batch(pad(src), torch.tensor([len(s) for s in src]), tgt_in, tgt_out,
                 torch.tensor([pairs.topics[i] for i in idx], dtype=torch.long), recall)


def with_recall(pairs: EncodedPairs, rows: Tensor, scores: Tensor) -> EncodedPairs:
    """``pairs`` with each question's recalled rows (B, K) and scores (B, K) (a RecallIndex search)."""
    return replace(pairs, recall_rows=rows.tolist(), recall_scores=scores.tolist())


def batch_order(pairs: EncodedPairs, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Length-bucketed batches: similar lengths together (little padding), batches in random order.

    Deterministic in (seed, epoch), so a resumed run sees the same order. With ``world_size > 1``
    each rank takes every ``world_size``-th batch of the same global order.
    """
    n = len(pairs)
    rng = np.random.default_rng([seed, epoch])
    lengths = np.array([len(s) + len(t) for s, t in zip(pairs.src, pairs.tgt)], dtype=np.float64)
    if shuffle:
        lengths = lengths + rng.uniform(0, 2, size=n)  # break ties differently every epoch
    order = np.argsort(lengths, kind="stable")
    batches = [order[i: i + batch_size].tolist() for i in range(0, n, batch_size)]
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    if world_size > 1:
        usable = len(batches) - len(batches) % world_size
        batches = batches[rank:usable:world_size]
    return batches
