"""Encoded pairs and length-bucketed batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import BOS_ID, EOS_ID, PAD_ID
from .text import Tokenizer


@dataclass
class EncodedPairs:
    src: list[list[int]]  # question ids, cut to max_source_len
    tgt: list[list[int]]  # answer ids + </s>, cut to max_target_len
    labels: list[int]

    def __len__(self) -> int:
        return len(self.src)

    def target_tokens(self) -> int:
        return sum(len(t) for t in self.tgt)


def encode_source(tokenizer: Tokenizer, text: str, max_len: int, sample_alpha: float = 0.0) -> list[int]:
    return tokenizer.encode(text, sample_alpha)[:max_len]


def encode_pairs(tokenizer: Tokenizer, questions: Iterable[str], answers: Iterable[str],
                 labels: Iterable[int], max_source_len: int, max_target_len: int) -> EncodedPairs:
    src, tgt = [], []
    for q, a in zip(questions, answers):
        s = encode_source(tokenizer, q, max_source_len) or [EOS_ID]  # never an empty source
        src.append(s)
        tgt.append(tokenizer.encode(a)[: max_target_len - 1] + [EOS_ID])
    return EncodedPairs(src, tgt, [int(x) for x in labels])


@dataclass
class Batch:
    src: Tensor  # (B, S) padded question ids
    src_len: Tensor  # (B,)
    tgt_in: Tensor  # (B, T) <s> + answer
    tgt_out: Tensor  # (B, T) answer + </s>
    label: Tensor  # (B,)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.src, self.src_len, self.tgt_in, self.tgt_out, self.label)))

    def pin_memory(self) -> "Batch":
        return Batch(*(t.pin_memory() for t in (self.src, self.src_len, self.tgt_in, self.tgt_out, self.label)))

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


def collate(pairs: EncodedPairs, idx: Sequence[int]) -> Batch:
    src = [pairs.src[i] for i in idx]
    tgt = [pairs.tgt[i] for i in idx]
    tgt_out = pad(tgt)
    tgt_in = pad([t[:-1] for t in tgt], prefix=BOS_ID)
    tgt_in = tgt_in[:, : tgt_out.size(1)]
    return Batch(pad(src), torch.tensor([len(s) for s in src]), tgt_in, tgt_out,
                 torch.tensor([pairs.labels[i] for i in idx], dtype=torch.long))


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
