"""The question's topic (the corpus's label: 0 everyday, 1 breakup, 2 love), predicted from its text.

A model trained with ``model.num_topics`` reads a topic vector beside the question's pieces; the
corpus gives it one for every training pair, but a user of the demo types only a message. This
classifier fills that gap: a linear model over the message's character 1–3-grams (each word
padded with spaces, as scikit-learn's ``char_wb``), hashed into a fixed number of buckets and
weighted tf-idf style (sublinear tf × idf, L2-normalised), trained by softmax regression on the
training questions. 86 % of the test questions get their corpus label (always guessing the
most frequent label gets 46 %): the same character n-grams with which the retrieval baseline
finds paraphrases.

It is part of the checkpoint (``topic.safetensors``, ~130 KB) and never looks up an answer:
it only chooses which of the model's topic vectors the encoder reads.

    clf = TopicClassifier.fit(questions, labels)
    clf.predict_proba(["헤어진 지 일주일 됐어"])  # (1, 3) probabilities
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from .text import normalize

TOPIC_FILE = "topic.safetensors"
TOPIC_NAMES = ("일상 everyday", "이별 breakup", "사랑 love")  # ChatbotData's labels 0, 1, 2
BUCKETS = 8192  # hashed n-gram features: 8192 x 3 weights + 8192 idf = 131 KB in fp32
NGRAMS = (1, 3)


def topic_name(label: int, names: Sequence[str] = TOPIC_NAMES) -> str:
    return names[label] if 0 <= label < len(names) else f"label {label}"


def char_ngrams(text: str, ngrams: tuple[int, int] = NGRAMS) -> list[str]:
    """Character n-grams of each whitespace-separated word padded with one space on both sides
    (scikit-learn's ``char_wb``), on the NFC-normalised text."""
    out = []
    for word in normalize(text).split():
        w = f" {word} "
        for n in range(ngrams[0], ngrams[1] + 1):
            out += [w[i: i + n] for i in range(len(w) - n + 1)]
    return out


def hashed_counts(texts: Sequence[str], buckets: int, ngrams: tuple[int, int] = NGRAMS
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bucket ids, counts, offsets) of each text's n-grams, for ``F.embedding_bag``. crc32 is the
    hash: the same on every machine and Python run (``hash()`` is salted per process)."""
    ids: list[int] = []
    counts: list[float] = []
    offsets: list[int] = []
    for text in texts:
        offsets.append(len(ids))
        bag: dict[int, int] = {}
        for g in char_ngrams(text, ngrams):
            b = zlib.crc32(g.encode("utf-8")) % buckets
            bag[b] = bag.get(b, 0) + 1
        ids += list(bag)
        counts += [float(c) for c in bag.values()]
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(counts, dtype=torch.float32),
            torch.tensor(offsets, dtype=torch.long))


def tfidf_weights(ids: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    """Sublinear tf × idf for each (bucket, count) of :func:`hashed_counts`, L2-normalised per text."""
    w = (1.0 + torch.log(counts)) * idf[ids] if ids.numel() else counts
    row = torch.repeat_interleave(torch.arange(len(offsets)), torch.diff(offsets, append=torch.tensor([ids.numel()])))
    norm = torch.zeros(len(offsets)).index_add_(0, row, w * w).sqrt().clamp(min=1e-12)
    return w / norm[row]


class TopicClassifier:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, idf: torch.Tensor,
                 ngrams: tuple[int, int] = NGRAMS, names: Sequence[str] = TOPIC_NAMES):
        self.weight = weight.float()  # (buckets, L)
        self.bias = bias.float()  # (L,)
        self.idf = idf.float()  # (buckets,)
        self.ngrams = (int(ngrams[0]), int(ngrams[1]))
        self.names = list(names)[: self.num_topics] + [f"label {i}" for i in range(len(names), self.num_topics)]

    @property
    def num_topics(self) -> int:
        return self.bias.numel()

    @property
    def buckets(self) -> int:
        return self.idf.numel()

    def _bags(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bags with tf-idf weights whose squares sum to 1 per text."""
        ids, counts, offsets = hashed_counts(texts, self.buckets, self.ngrams)
        return ids, tfidf_weights(ids, counts, offsets, self.idf), offsets

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        ids, w, offsets = self._bags(texts)
        return F.embedding_bag(ids, self.weight, offsets, mode="sum", per_sample_weights=w) + self.bias

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_topics) probabilities; an empty text gets the prior (the bias alone)."""
        if not len(texts):
            return np.zeros((0, self.num_topics), dtype=np.float32)
        with torch.no_grad():
            return torch.softmax(self.logits(texts), -1).numpy()

    def predict(self, texts: Sequence[str]) -> list[int]:
        return [int(i) for i in self.predict_proba(texts).argmax(-1)]

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        return float(np.mean([p == int(y) for p, y in zip(self.predict(texts), labels)])) if len(texts) else 0.0

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int], num_topics: int | None = None, *,
            buckets: int = BUCKETS, ngrams: tuple[int, int] = NGRAMS, l2: float = 5e-5, steps: int = 100,
            names: Sequence[str] = TOPIC_NAMES) -> "TopicClassifier":
        """Softmax regression with an L2 penalty, full batch, L-BFGS (deterministic: no random draws).

        ``l2`` = 1 / (C · n) for scikit-learn's ``LogisticRegression(C)`` (5e-5: C = 2 at 10k
        questions), chosen among 1e-5 … 1e-4 on ChatbotData's validation split (84.5 % there, 86.3 %
        on the test split; 93.9 % on the training questions).
        """
        if len(texts) != len(labels) or not len(texts):
            raise ValueError("fit needs as many labels as texts, and at least one")
        y = torch.tensor([int(x) for x in labels], dtype=torch.long)
        num_topics = max(int(num_topics or 0), int(y.max()) + 1)
        bag_ids, counts, offsets = hashed_counts(texts, buckets, ngrams)
        df = torch.zeros(buckets).index_add_(0, bag_ids, torch.ones_like(counts))  # texts containing each bucket
        idf = torch.log((1 + len(texts)) / (1 + df)) + 1  # scikit-learn's smooth idf
        w = tfidf_weights(bag_ids, counts, offsets, idf)
        prior = torch.bincount(y, minlength=num_topics).float() + 1
        weight = torch.zeros(buckets, num_topics, requires_grad=True)
        bias = torch.log(prior / prior.sum()).requires_grad_(True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = F.embedding_bag(bag_ids, weight, offsets, mode="sum", per_sample_weights=w) + bias
            loss = F.cross_entropy(logits, y) + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(weight.detach(), bias.detach(), idf, ngrams, names)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous(), "idf": self.idf.contiguous()},
                  str(path), metadata={"ngrams": json.dumps(list(self.ngrams)), "hash": "crc32",
                                       "names": json.dumps(self.names, ensure_ascii=False)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TopicClassifier":
        from safetensors import safe_open

        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("hash", "crc32") != "crc32" or set(t) != {"weight", "bias", "idf"}:
            raise ValueError(f"{path} is not a topic classifier file (tensors {sorted(t)}, metadata {meta})")
        weight, bias, idf = t["weight"], t["bias"], t["idf"]
        if weight.shape != (idf.numel(), bias.numel()):
            raise ValueError(f"{path}: weight {tuple(weight.shape)} does not match idf {idf.numel()} x bias {bias.numel()}")
        if not all(math.isfinite(float(x.abs().sum())) for x in (weight, bias, idf)):
            raise ValueError(f"{path} holds non-finite values")
        return cls(weight, bias, idf, tuple(json.loads(meta.get("ngrams", "[1, 3]"))),
                   json.loads(meta.get("names", json.dumps(TOPIC_NAMES))))


def fit_on_splits(splits: dict, num_topics: int) -> tuple[TopicClassifier, dict[str, float]]:
    """Fit on the training split's questions and labels (``split_corpus``'s frames); the accuracy on
    the training and validation questions (the test split is left to ``evaluate``)."""
    train, val = splits["train"], splits["val"]
    clf = TopicClassifier.fit(list(train["Q"]), list(train["label"]), num_topics)
    return clf, {"train": round(clf.accuracy(list(train["Q"]), list(train["label"])), 4),
                 "val": round(clf.accuracy(list(val["Q"]), list(val["label"])), 4)}
