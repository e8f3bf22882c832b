"""The recall index: for a message, the training pairs whose questions read most like it.

A recall model's decoder attends over, and may copy from, the answers of training questions
similar to the user's message; this index finds them. It never replies on its own: a model
reads what it recalls (and learns how far to trust it from the score), and the evaluation's
retrieval baseline (:class:`chatbot.evaluate.RetrievalBaseline`, the top-1 answer of this same
index) is a yardstick, not a chatbot.

The search is scikit-learn's ``TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3),
sublinear_tf=True)`` + cosine, reimplemented on :mod:`chatbot.topic`'s n-grams so that it needs
no vocabulary object: each character 1–3-gram of the normalised, lower-cased question (each word
padded with a space on both sides) is keyed by its full 32-bit crc32 (no two of ChatbotData's
37k training n-grams collide), weighted ``(1 + log tf) · idf`` with the smooth idf
``log((1 + n) / (1 + df)) + 1``, and each question's vector scaled to unit length. An n-gram no
training question has is dropped, as scikit-learn drops words outside its vocabulary.

Leave-one-out: recalling for the training questions themselves (``exclude_self=True``) never
returns a pair whose normalised question is the query's, and the query drops the n-grams only those
pairs hold, so training sees what a new question sees (the splits are made by normalised question:
a test question never has a training twin, and its unseen n-grams count for nothing).

    index = RecallIndex(train_questions, train_answers)
    index.recall(["헤어진 지 일주일 됐어"], k=5)  # [[Recalled(question, answer, score, row), ...]]
    index.save("recall.safetensors"); RecallIndex.load("recall.safetensors")
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from .text import normalize
from .topic import NGRAMS, hashed_counts, tfidf_weights

RECALL_FILE = "recall.safetensors"
FORMAT = "chatbot-recall-index/1"  # the file's "format" metadata; bump when the layout changes
HASH_SPACE = 2 ** 32  # n-grams keyed by their whole crc32: hashed_counts' buckets never fold them
CHUNK = 256  # queries scored at once: (CHUNK, pairs) float32 scores, 10 MB at 10k pairs
_LOW32 = (1 << 32) - 1


@dataclass(frozen=True)
class Recalled:
    """One recalled training pair."""
    question: str
    answer: str
    score: float  # cosine similarity of the two questions' tf-idf vectors, in [0, 1]
    row: int  # the pair's position in the index (the training split's row order)


def _key(question: str) -> str:
    """The text whose n-grams are counted: normalised and lower-cased (scikit-learn's default)."""
    return normalize(question).lower()


class RecallIndex:
    """Training (question, answer) pairs searchable by character n-gram tf-idf cosine.

    Built from the texts (``RecallIndex(questions, answers)``) or read with :meth:`load`. Holds the
    pairs' text and the questions' tf-idf rows as a sparse matrix in bag form: ``cols`` (nnz,) the
    column (position in ``vocab``) of each n-gram of each question, ``counts`` (nnz,) its count,
    ``offsets`` (N + 1,) where each question's n-grams start and end.
    """

    def __init__(self, questions: Sequence[str], answers: Sequence[str]):
        questions, answers = [str(q) for q in questions], [str(a) for a in answers]
        if len(questions) != len(answers) or not questions:
            raise ValueError(f"a recall index needs as many answers as questions, and at least one pair "
                             f"(got {len(questions)} questions, {len(answers)} answers)")
        ids, counts, starts = hashed_counts([_key(q) for q in questions], HASH_SPACE, NGRAMS)
        vocab, cols = torch.unique(ids, return_inverse=True)  # sorted crc32s; each n-gram's column
        self._build(questions, answers, vocab, cols, counts, torch.cat([starts, torch.tensor([ids.numel()])]))

    def _build(self, questions: list[str], answers: list[str], vocab: torch.Tensor, cols: torch.Tensor,
               counts: torch.Tensor, offsets: torch.Tensor) -> None:
        self.questions, self.answers = questions, answers
        self.vocab = vocab.long()  # (V,) sorted crc32 of every n-gram of the indexed questions
        self.cols, self.counts, self.offsets = cols.long(), counts.float(), offsets.long()  # (nnz,) (nnz,) (N+1,)
        self.df = torch.bincount(self.cols, minlength=len(self.vocab))  # (V,) questions holding each n-gram
        self.idf = torch.log((1 + len(questions)) / (1 + self.df.float())) + 1  # (V,) scikit-learn's smooth idf
        self.weights = tfidf_weights(self.cols, self.counts, self.offsets[:-1], self.idf)  # (nnz,) unit rows
        # Each row's answer as an id (one per distinct text) and its normalised question's group.
        answer_id: dict[str, int] = {}
        self.answer_ids = torch.tensor([answer_id.setdefault(a, len(answer_id)) for a in answers])  # (N,)
        self.num_answers = len(answer_id)
        self.rows_of: dict[str, list[int]] = {}  # normalised question -> its rows (leave-one-out)
        for row, q in enumerate(questions):
            self.rows_of.setdefault(normalize(q), []).append(row)

    def __len__(self) -> int:
        return len(self.questions)

    # ------------------------------------------------------------------ search
    def _query_bags(self, questions: Sequence[str], left_out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries' unit tf-idf vectors over the index's n-grams: (column, query, weight) triples,
        each (nnz_q,). An n-gram no indexed question has is dropped, taking no share of the norm.

        ``left_out`` (B,): how many indexed pairs share each query's normalised question and are left
        out (leave-one-out). Those pairs hold exactly the query's n-grams, so an n-gram found in no
        other pair is one a new question would not find in the index: dropped too.
        """
        ids, counts, starts = hashed_counts([_key(q) for q in questions], HASH_SPACE, NGRAMS)
        if not len(self.vocab):  # every indexed question is empty
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
        query = torch.repeat_interleave(torch.arange(len(questions)),
                                        torch.diff(starts, append=torch.tensor([ids.numel()])))
        pos = torch.searchsorted(self.vocab, ids).clamp(max=len(self.vocab) - 1)
        known = self.vocab[pos] == ids
        if left_out is not None:
            known &= self.df[pos] > left_out[query]
        # Dropped n-grams read idf 0 (an extra last entry): no weight, so no share of the norm.
        w = tfidf_weights(torch.where(known, pos, len(self.vocab)), counts, starts,
                          torch.cat([self.idf, torch.zeros(1)]))
        return pos[known], query[known], w[known]

    def scores(self, questions: Sequence[str], *, exclude_self: bool = False) -> torch.Tensor:
        """(B, N) cosine similarity of each question to each indexed question, in [0, 1].

        ``exclude_self``: leave-one-out, for the indexed questions themselves. Every pair whose
        normalised question equals the query's scores -1, and the query reads the index as a new
        question would: without the n-grams only those pairs hold (the idf still counts them).
        """
        if not len(questions):
            return torch.zeros(0, len(self))
        own = [self.rows_of.get(normalize(q), []) for q in questions] if exclude_self else None
        cols, query, w = self._query_bags(questions, None if own is None else torch.tensor([len(r) for r in own]))
        # Only the n-grams the queries hold matter: a (U + 1, B) table of their weights, whose last
        # row (zeros) every other n-gram of the index reads. Small, so the gathers stay in cache.
        used, row = torch.unique(cols, return_inverse=True)
        table = torch.zeros(len(used) + 1, len(questions))
        table[row, query] = w
        lookup = torch.full((len(self.vocab),), len(used), dtype=torch.long)
        lookup[used] = torch.arange(len(used))
        # Row n of the result: sum_j weights[n, j] * table[lookup[cols[n, j]]], the sparse (N, V) @ (V, B).
        s = F.embedding_bag(lookup[self.cols], table, self.offsets[:-1], mode="sum",
                            per_sample_weights=self.weights)  # (N, B)
        s = s.T.clamp(0.0, 1.0).contiguous() + 0.0  # (B, N); + 0.0 turns a -0.0 into 0.0 (sign bit clear)
        if own is not None and any(own):
            hit = torch.tensor([(i, r) for i, rows in enumerate(own) for r in rows])
            s[hit[:, 0], hit[:, 1]] = -1.0
        return s

    def search(self, questions: Sequence[str], k: int, *, exclude_self: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the top-``k`` distinct answers for each question, best first.

        Returns ``rows`` (B, k) long and ``scores`` (B, k) float: the row of each answer's
        best-scoring question and that cosine; ``-1`` and ``0.0`` pad a question left with fewer
        than ``k`` distinct answers. Ties go to the lower row. ``exclude_self``: leave-one-out for
        the indexed questions themselves (see :meth:`scores`): no pair whose normalised question
        equals the query's is recalled.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        questions = list(questions)
        rows = torch.full((len(questions), k), -1, dtype=torch.long)
        scores = torch.zeros(len(questions), k)
        top = min(k, self.num_answers)
        row_code = _LOW32 - torch.arange(len(self))  # (N,) larger for earlier rows: ties go to them
        for start in range(0, len(questions), CHUNK):
            chunk = questions[start: start + CHUNK]
            s = self.scores(chunk, exclude_self=exclude_self)  # (b, N)
            # One exact int64 sort key per (query, row): the score's float bits (monotonic for floats
            # >= 0) above the row code. A left-out pair (-1.0, sign bit set) gets a negative key.
            key = (s.view(torch.int32).long() << 32) | row_code
            # Each distinct answer keeps its best key; the best k answers are the k largest of those.
            best = torch.full((len(chunk), self.num_answers), -1, dtype=torch.long)
            best.scatter_reduce_(1, self.answer_ids.expand(len(chunk), -1), key, "amax")
            found = best.topk(top, dim=1).values  # (b, top)
            ok = found >= 0
            rows[start: start + len(chunk), :top] = torch.where(ok, _LOW32 - (found & _LOW32), -1)
            scores[start: start + len(chunk), :top] = torch.where(
                ok, (found >> 32).int().view(torch.float32), torch.zeros(()))
        return rows, scores

    def recall(self, questions: Sequence[str], k: int, *, exclude_self: bool = False) -> list[list[Recalled]]:
        """For each question, its top-``k`` distinct answers as :class:`Recalled`, best first (fewer
        where the index has fewer distinct answers left); see :meth:`search`."""
        rows, scores = self.search(questions, k, exclude_self=exclude_self)
        return [[Recalled(self.questions[r], self.answers[r], s, r)
                 for r, s in zip(rs, ss) if r >= 0] for rs, ss in zip(rows.tolist(), scores.tolist())]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the pairs' text (metadata) and the n-gram bags (tensors); ~4 MB for ChatbotData's
        10k training pairs. Loading rebuilds the tf-idf weights from these in milliseconds."""
        path = Path(path)
        save_file({"vocab": self.vocab, "cols": self.cols.int(), "counts": self.counts.int(), "offsets": self.offsets},
                  str(path), metadata={"format": FORMAT, "hash": "crc32", "ngrams": json.dumps(list(NGRAMS)),
                                       "questions": json.dumps(self.questions, ensure_ascii=False),
                                       "answers": json.dumps(self.answers, ensure_ascii=False)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RecallIndex":
        """Read :meth:`save`'s file; ``ValueError`` naming the file if it is damaged or does not match."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recall index not found: {path}")
        try:
            t = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        found = {k: meta.get(k) for k in ("format", "hash", "ngrams")}
        if found != {"format": FORMAT, "hash": "crc32", "ngrams": json.dumps(list(NGRAMS))}:
            raise ValueError(f"{path} is not a recall index ({FORMAT}, crc32, n-grams {list(NGRAMS)}): "
                             f"its metadata says {found}")
        try:
            questions, answers = json.loads(meta["questions"]), json.loads(meta["answers"])
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: damaged recall index: no readable questions/answers ({e})") from None
        _check(path, t, questions, answers)
        index = cls.__new__(cls)
        index._build(questions, answers, t["vocab"], t["cols"], t["counts"], t["offsets"])
        return index


def _check(path: Path, t: dict[str, torch.Tensor], questions: object, answers: object) -> None:
    """Raise ``ValueError`` unless the tensors form a well-formed index of these texts."""
    def fail(what: str) -> None:
        raise ValueError(f"{path}: damaged recall index: {what}")

    if set(t) != {"vocab", "cols", "counts", "offsets"}:
        fail(f"tensors {sorted(t)}, expected cols, counts, offsets, vocab")
    if not (isinstance(questions, list) and isinstance(answers, list) and questions
            and len(questions) == len(answers) and all(isinstance(x, str) for x in questions + answers)):
        fail("its questions and answers are not two equally long, non-empty lists of strings")
    vocab, cols, counts, offsets = t["vocab"], t["cols"], t["counts"], t["offsets"]
    if any(x.dim() != 1 or x.dtype.is_floating_point for x in t.values()):
        fail("every tensor must be a 1-D integer tensor")
    if offsets.numel() != len(questions) + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != cols.numel() \
            or counts.numel() != cols.numel() or bool((torch.diff(offsets) < 0).any()):
        fail(f"offsets ({offsets.numel()}) do not delimit {cols.numel()} n-grams of {len(questions)} questions")
    if vocab.numel() and (bool((torch.diff(vocab) <= 0).any()) or int(vocab[0]) < 0 or int(vocab[-1]) > _LOW32):
        fail("vocab is not a sorted list of distinct crc32 values")
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= vocab.numel() or int(counts.min()) < 1):
        fail("n-gram columns or counts out of range")
    # The tensors must be these questions' n-grams: recount a few questions spread over the file.
    for row in sorted({round(i * (len(questions) - 1) / 7) for i in range(8)}):
        a, b = int(offsets[row]), int(offsets[row + 1])
        stored = sorted(zip(vocab[cols[a:b]].tolist(), counts[a:b].tolist()))
        ids, cnt, _ = hashed_counts([_key(questions[row])], HASH_SPACE, NGRAMS)
        if stored != sorted(zip(ids.tolist(), cnt.long().tolist())):
            fail(f"the n-grams stored for question {row} ({questions[row]!r}) are not its own: "
                 f"text and tensors do not match")

