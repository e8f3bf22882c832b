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

One message (a chat) is searched through the index's posting lists, scoring exactly only the rows
that can win; a batch, through one sparse product over every question. Both give the same float bits.

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
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
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
FEW = 3  # up to this many queries (a chat's one message), search scores only the rows that can win
WIDE = 32  # up to this many queries, scores() weighs n-grams in a (V, B) table (4.8 MB at 37k n-grams)
MARGIN = 1e-4  # |posting-list score - exact score| bound; the orders of summation differ by < 1e-5
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
        self._idf_or_0 = torch.cat([self.idf, torch.zeros(1)])  # (V + 1,) an extra idf 0 for dropped n-grams
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
        w = tfidf_weights(torch.where(known, pos, len(self.vocab)), counts, starts, self._idf_or_0)
        return pos[known], query[known], w[known]

    def scores(self, questions: Sequence[str], *, exclude_self: bool = False) -> torch.Tensor:
        """(B, N) cosine similarity of each question to each indexed question, in [0, 1].

        ``exclude_self``: leave-one-out, for the indexed questions themselves. Every pair whose
        normalised question equals the query's scores -1, and the query reads the index as a new
        question would: without the n-grams only those pairs hold (the idf still counts them).
        """
        if not len(questions):
            return torch.zeros(0, len(self))
        own = self._own(questions) if exclude_self else None
        cols, query, w = self._query_bags(questions, None if own is None else torch.tensor([len(r) for r in own]))
        if len(questions) <= WIDE:  # a (V, B) table of the queries' weights, 0 for n-grams they lack
            table, at = torch.zeros(len(self.vocab), len(questions)), self.cols
            table[cols, query] = w
        else:  # only the n-grams the queries hold: a (U + 1, B) table that stays in cache, whose
            # last row (zeros) every other n-gram of the index reads (one more gather of all n-grams)
            used, row = torch.unique(cols, return_inverse=True)
            table = torch.zeros(len(used) + 1, len(questions))
            table[row, query] = w
            lookup = torch.full((len(self.vocab),), len(used), dtype=torch.long)
            lookup[used] = torch.arange(len(used))
            at = lookup[self.cols]
        # Row n of the result: sum_j weights[n, j] * table[at[n, j]], the sparse (N, V) @ (V, B); the same
        # float operations with either table.
        s = F.embedding_bag(at, table, self.offsets[:-1], mode="sum", per_sample_weights=self.weights)  # (N, B)
        s = s.T.clamp(0.0, 1.0).contiguous() + 0.0  # (B, N); + 0.0 turns a -0.0 into 0.0 (sign bit clear)
        _leave_out(s, own)
        return s

    def _own(self, questions: Sequence[str]) -> list[list[int]]:
        """Leave-one-out: each question's own rows (the pairs whose normalised question is its)."""
        return [self.rows_of.get(normalize(q), []) for q in questions]

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
        for start in range(0, len(questions), CHUNK):
            chunk = questions[start: start + CHUNK]
            found = self._best_few(chunk, top, exclude_self) if len(chunk) <= FEW else None
            if found is None:
                found = self._best(chunk, top, exclude_self)  # (b, top)
            ok = found >= 0
            rows[start: start + len(chunk), :top] = torch.where(ok, _LOW32 - (found & _LOW32), -1)
            scores[start: start + len(chunk), :top] = torch.where(
                ok, (found >> 32).int().view(torch.float32), torch.zeros(()))
        return rows, scores

    def _best(self, questions: list[str], top: int, exclude_self: bool) -> torch.Tensor:
        """The sort keys (:func:`_keys`) of each question's ``top`` best distinct answers, (B, top), from
        its score against every indexed question (:meth:`scores`); ``-1``: no answer left."""
        key = _keys(self.scores(questions, exclude_self=exclude_self), torch.arange(len(self)))  # (B, N)
        # Each distinct answer keeps its best key; the best k answers are the k largest of those.
        best = torch.full((len(questions), self.num_answers), -1, dtype=torch.long)
        best.scatter_reduce_(1, self.answer_ids.expand(len(questions), -1), key, "amax")
        return best.topk(top, dim=1).values

    def _best_few(self, questions: list[str], top: int, exclude_self: bool) -> torch.Tensor | None:
        """:meth:`_best` for a few questions, the same keys, from exact scores of only the rows that can win.

        A first pass adds up each question's n-grams' posting lists (~20k of the 350k n-grams of
        ChatbotData's questions, against the 350k :meth:`scores` reads): every row's score up to the
        order of summation (< 1e-5 apart). Only the rows within 2 · MARGIN of the question's ``top``-th
        best answer can be among its top answers; they are scored as :meth:`scores` scores them (the
        same ``embedding_bag`` on their bags, so the same float bits). None where a question's
        ``top``-th answer scores about 0 (ties on 0 go to the lowest rows of all): :meth:`_best` decides.
        """
        own = self._own(questions) if exclude_self else None
        cols, query, w = self._query_bags(questions, None if own is None else torch.tensor([len(r) for r in own]))
        found = torch.full((len(questions), top), -1, dtype=torch.long)
        for b in range(len(questions)):
            mine = query == b if len(questions) > 1 else slice(None)
            approx = self._approx(cols[mine].tolist(), w[mine].tolist())
            if own is not None:
                approx[own[b]] = -1.0
            rows = self._contenders(approx, top)
            if rows is None:
                return None
            key = self._exact_keys(cols[mine], w[mine], rows)
            found[b] = self._top_answers(key, rows.tolist(), top)
        return found

    def _approx(self, cols: list[int], weights: list[float]) -> np.ndarray:
        """(N,) float32: one query's score against every row, from the posting lists of its n-grams
        (``cols``, with the query's ``weights``), in an order of summation of their own."""
        start, post_rows, post_weights = self._postings
        approx = np.zeros(len(self), np.float32)
        for c, x in zip(cols, weights):
            at = slice(start[c], start[c + 1])
            approx[post_rows[at]] += post_weights[at] * np.float32(x)  # a row holds an n-gram once
        return approx

    def _contenders(self, approx: np.ndarray, top: int) -> np.ndarray | None:
        """The rows (ascending) whose approximate score is within 2 · MARGIN of the ``top``-th best distinct
        answer's, or None where that answer scores about 0 (or fewer than ``top`` answers score above 0)."""
        level = float(approx.max()) / 2
        while level > MARGIN:  # the rows above a level, lowered until they hold ``top`` answers
            above = np.flatnonzero(approx >= level)
            seen: set[int] = set()
            for r in above[np.argsort(-approx[above], kind="stable")].tolist():
                seen.add(self._answer_of[r])
                if len(seen) == top:
                    kth = float(approx[r])
                    return np.flatnonzero(approx >= kth - 2 * MARGIN) if kth > 2 * MARGIN else None
            level /= 4
        return None

    def _exact_keys(self, cols: torch.Tensor, weights: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The sort keys of ``rows`` (n,) for one query (its ``cols``, ``weights`` from :meth:`_query_bags`),
        from the scores :meth:`scores` gives them: the same ``embedding_bag`` over their bags."""
        table = torch.zeros(len(self.vocab), 1)  # the query's weight of each n-gram (0: not in the query)
        table[cols, 0] = weights
        offsets = self.offsets.numpy()
        bag = offsets[rows + 1] - offsets[rows]
        at = torch.from_numpy(np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows.tolist()]))
        s = F.embedding_bag(self.cols[at], table, torch.from_numpy(np.cumsum(bag) - bag), mode="sum",
                            per_sample_weights=self.weights[at])  # (n, 1)
        return _keys(s[:, 0].clamp(0.0, 1.0) + 0.0, torch.from_numpy(rows))  # + 0.0: as in scores()

    def _top_answers(self, key: torch.Tensor, rows: list[int], top: int) -> torch.Tensor:
        """The ``top`` largest keys of distinct answers among ``rows`` (their ``key``), largest first."""
        best: dict[int, int] = {}
        for r, k in zip(rows, key.tolist()):
            a = self._answer_of[r]
            best[a] = max(k, best.get(a, -1))
        return torch.tensor((sorted(best.values(), reverse=True) + [-1] * top)[:top])

    @cached_property
    def _answer_of(self) -> list[int]:
        """Each row's answer id (``answer_ids`` as a list)."""
        return self.answer_ids.tolist()

    @cached_property
    def _postings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tf-idf rows by column (an inverted index), built on first use: ``start`` (V + 1,) where each
        n-gram's postings begin, the ``rows`` (nnz,) holding them and their ``weights`` (nnz,)."""
        order = torch.argsort(self.cols, stable=True)
        rows = torch.repeat_interleave(torch.arange(len(self)), torch.diff(self.offsets))
        start = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(self.df, 0)])
        return start.numpy(), rows[order].numpy(), self.weights[order].numpy()

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


def _keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One exact int64 sort key per (query, row): the score's float bits (monotonic for floats >= 0)
    above a row code larger for earlier rows (ties go to them). A left-out pair (-1.0, sign bit set)
    gets a negative key. scores (..., n) float32, rows (n,) -> (..., n)."""
    return (scores.view(torch.int32).long() << 32) | (_LOW32 - rows)


def _leave_out(scores: torch.Tensor, own: list[list[int]] | None) -> None:
    """Score -1 each query's own rows (leave-one-out), in place; scores (B, N)."""
    if own is not None and any(own):
        hit = torch.tensor([(i, r) for i, rows in enumerate(own) for r in rows])
        scores[hit[:, 0], hit[:, 1]] = -1.0


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

