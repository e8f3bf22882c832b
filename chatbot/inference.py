"""ChatBot: load a checkpoint once, then reply (whole or streamed) with the attention behind each piece.

    bot = ChatBot.from_checkpoint("checkpoints/default")
    r = bot.reply("오늘 너무 힘들었어", strategy="beam", beam_size=5)
    r.text, r.source_tokens, r.reply_tokens, r.attention   # attention: (len(reply_tokens), len(source_tokens))

    for step in bot.stream("안녕"):                          # one step per generated piece
        step.piece, step.attention, step.candidates
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .batching import EncodedMessage, RecallSlots, encode_message, pad
from .checkpoint import Checkpoint, load_checkpoint
from .config import EOS_ID
from .model import Memory, RecallInput, count_parameters
from .recall import Recalled
from .search import DecodeOptions, Hypothesis, beam_search, decode, decode_steps
from .topic import topic_name

# Relative to the working directory (the repository root, where the README's commands run); the
# package itself assumes no layout around it. $CHATBOT_CHECKPOINT overrides it.
DEFAULT_CHECKPOINT = "checkpoints/default"
EMPTY_PROMPT = "메시지를 입력해 주세요. (Please type a message.)"


def default_checkpoint() -> Path:
    """``$CHATBOT_CHECKPOINT`` if set, else ``checkpoints/default``."""
    return Path(os.environ.get("CHATBOT_CHECKPOINT") or DEFAULT_CHECKPOINT)


QUANTIZE_MIN_WEIGHTS = 1_000_000  # Linear layers smaller than this stay fp32 (int8 is slower for them)


def quantize_int8(model: torch.nn.Module) -> bool:
    """Swap the GRU / LSTM layers and the large Linear layers of an eval-mode CPU model for int8
    dynamic-quantized ones.

    Decoding one message is bound by reading the weights at every step (the 256 x V output
    layer above all); int8 weights read 4x fewer bytes. For small layers (the 2H -> E combine
    layer, attention projections) quantising the activations costs more than it saves, so they
    stay fp32. Returns False (model unchanged) where this torch build has no quantized CPU engine.
    """
    try:
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
        spec = {name: default_dynamic_qconfig for name, m in model.named_modules()
                if isinstance(m, (nn.GRU, nn.LSTM))
                or (isinstance(m, nn.Linear) and m.weight.numel() >= QUANTIZE_MIN_WEIGHTS)}
        with warnings.catch_warnings():  # torch marks its quantized tensor API deprecated; pinned torch has it
            warnings.simplefilter("ignore")
            quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    except (ImportError, RuntimeError, AssertionError):
        return False
    return True


@dataclass
class Candidate:
    piece: str
    prob: float
    copied: float | None = None  # recall models: the share of ``prob`` that copying gave (the rest: generating)
    source: str | None = None  # ... and the column group most of that copy came from (e.g. "기억 1")


@dataclass(frozen=True)
class ColumnGroup:
    """A run of heatmap columns: the message, or one recalled training pair (recall models)."""

    name: str  # "메시지" (the message) or "기억 k" (recall k)
    start: int  # first column
    end: int  # one past the last column
    question: str = ""  # recall k: the recalled training question ...
    answer: str = ""  # ... its answer
    score: float = 0.0  # ... and how similar the question is to the message (cosine of TF-IDF vectors)


@dataclass(frozen=True)
class TopicChoice:
    """The topic a model with ``model.num_topics`` read for one message, and who chose it."""

    label: int  # the topic vector the encoder reads
    probs: list[float] | None  # the classifier's probabilities (None: the topic was given)
    source: str  # given | predicted | default (no classifier in the checkpoint: topic 0)
    name: str


@dataclass
class Reply:
    text: str  # the reply, detokenised
    source_tokens: list[str]  # the message's pieces as the encoder saw them (heatmap columns)
    reply_tokens: list[str]  # the reply's pieces (heatmap rows)
    attention: np.ndarray | None  # (len(reply_tokens), len(source_tokens)); None without attention
    candidates: list[list[Candidate]] = field(default_factory=list)  # per step: top-k next pieces
    score: float = 0.0  # log-probability, </s> included (length-normalised for beam search)
    n_best: list["Reply"] = field(default_factory=list)  # beam search: every returned hypothesis
    truncated: bool = False  # the model read only the first data.max_source_len pieces of the message
    generated: bool = True  # False: the message was empty, the model was not run
    topic: TopicChoice | None = None  # the topic the encoder read (models with model.num_topics > 0)
    groups: list[ColumnGroup] = field(default_factory=list)  # recall models: message, recall 1..K columns
    gate: np.ndarray | None = None  # (len(reply_tokens),) recall models: g_t, the share generated (1 - copied)
    finished: bool = True  # False: the reply stopped at the length limit (max_len) before writing </s>

    @property
    def message_tokens(self) -> list[str]:
        """The message's pieces (the first column group; for other models all of source_tokens)."""
        return self.source_tokens[: self.groups[0].end] if self.groups else self.source_tokens

    @property
    def source_chars(self) -> int:
        """About how many characters of the message the model read (its pieces' characters)."""
        return sum(len(p) for p in self.message_tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: attention as nested lists of floats."""
        t = self.topic
        return {
            "reply": self.text,
            "source_tokens": self.source_tokens,
            "reply_tokens": self.reply_tokens,
            "attention": [] if self.attention is None else [[round(float(x), 5) for x in row] for row in self.attention],
            "score": self.score,
            "truncated": self.truncated,
            "finished": self.finished,
            "generated": self.generated,
            "n_best": [{"reply": h.text, "score": h.score} for h in self.n_best],
            "topic": t and t.name, "topic_id": t and t.label, "topic_source": t and t.source,
            "topic_probs": None if t is None or t.probs is None else [round(float(p), 4) for p in t.probs],
            **({"column_groups": [vars(g) for g in self.groups],
                "recalled": [{"question": g.question, "answer": g.answer, "score": round(g.score, 4)}
                             for g in self.groups[1:]],
                "gate": [] if self.gate is None else [round(float(x), 4) for x in self.gate],
                "candidates": [[{"piece": c.piece, "prob": round(c.prob, 4), "copied": c.copied, "source": c.source}
                                for c in cands] for cands in self.candidates]} if self.groups else {}),
        }


@dataclass
class StreamStep:
    """One streamed piece, or (``done``) the end of the reply."""

    piece: str | None  # the piece generated at this step (None on the final step)
    attention: np.ndarray | None  # (len(source_tokens),) where the decoder looked for it
    candidates: list[Candidate]  # top-k next pieces it chose among
    reply: Reply  # everything generated so far; on the final step, the finished reply
    done: bool = False  # the last step of every stream: ``reply`` is what ``ChatBot.reply`` returns


@dataclass
class Columns:
    """What each heatmap column of one message holds: the message's pieces, then each recall slot's."""

    ids: np.ndarray  # (C,) the piece at each column
    groups: list[ColumnGroup]  # message, recall 1..K: consecutive, together all C columns

    @cached_property
    def copy_ids(self) -> np.ndarray:
        """The piece each column copies (a slot's </s> separator copies nothing: -1)."""
        return np.where(np.arange(len(self.ids)) < self.groups[0].end, self.ids,
                        np.where(self.ids == EOS_ID, -1, self.ids))

    def group_at(self, column: int) -> str:
        return next(g.name for g in self.groups if g.start <= column < g.end)

    def copy_credit(self, ids: np.ndarray, probs: np.ndarray, rows: np.ndarray, gates: np.ndarray
                    ) -> tuple[list[list[float]], list[list[str | None]]]:
        """For T steps' candidates ``ids`` (T, k) of probabilities ``probs`` (T, k), the steps' attention
        over these columns ``rows`` (T, C) and copy gates ``gates`` (T,): the share of each candidate's
        probability that copying gave, (1 - g) · (its columns' attention) / p, rounded to 4 places, and
        the group of its most attended column (None where copying gave it nothing)."""
        match = self.copy_ids == ids[..., None]  # (T, k, C): the columns that copy each candidate
        mass = np.where(match, rows[:, None, :], np.float32(0)).sum(-1)  # (T, k): exact for 0 or 1 column
        for t, i in zip(*np.nonzero(match.sum(-1) > 1)):  # more: summed as their own array (same bits)
            mass[t, i] = rows[t][match[t, i]].sum()
        top = np.where(match, rows[:, None, :], np.float32(-1)).argmax(-1)  # (T, k) first most attended column
        group = np.searchsorted([g.end for g in self.groups], top, side="right")
        copied = [[round(min(1.0, (1.0 - g) * m / max(p, 1e-9)), 4) for m, p in zip(ms, ps)]
                  for g, ms, ps in zip(np.asarray(gates).tolist(), mass.tolist(), probs.tolist())]
        sources = [[self.groups[j].name if m > 0 else None for j, m in zip(js, ms)]
                   for js, ms in zip(group.tolist(), mass.tolist())]
        return copied, sources


class ChatBot:
    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu", quantize: bool = False):
        self.model = checkpoint.model.eval()
        self.quantized = quantize and quantize_int8(self.model)
        self.tokenizer = checkpoint.tokenizer
        self.config = checkpoint.config
        self.meta = checkpoint.meta
        self.path = checkpoint.path
        self.topic_classifier = checkpoint.topic_classifier  # TopicClassifier or None
        self.recall_index = checkpoint.recall_index  # RecallIndex (models with model.recall_k > 0) or None
        self.slots = None if self.recall_index is None else RecallSlots(
            self.tokenizer, self.recall_index.questions, self.recall_index.answers)
        self.device = torch.device(device)
        self.max_source_len = self.config.data.max_source_len

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str | torch.device = "auto",
                        quantize: bool | str = "auto") -> "ChatBot":
        """Load once. ``path`` None: :func:`default_checkpoint`. ``quantize="auto"``: int8 dynamic
        quantization of the matmuls on the CPU for models of a million parameters or more (replies about
        2x faster for the shipped model, same test-split figures: docs/performance.md); none on a GPU or
        for tiny models, where the (de)quantization overhead outweighs the smaller weight reads."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoint = load_checkpoint(path or default_checkpoint(), device)
        if quantize == "auto":
            quantize = torch.device(device).type == "cpu" and count_parameters(checkpoint.model) >= 1_000_000
        return cls(checkpoint, device, bool(quantize))

    @property
    def has_attention(self) -> bool:
        return self.model.attention is not None

    @property
    def reads_topic(self) -> bool:
        """The encoder reads a topic (model.num_topics > 0)."""
        return self.config.model.num_topics > 0

    @property
    def topic_names(self) -> list[str]:
        """One name per topic this model reads (none for a model that reads no topic)."""
        n = self.config.model.num_topics
        return list(self.topic_classifier.names) if self.topic_classifier is not None else [
            topic_name(i) for i in range(n)]

    @property
    def name(self) -> str:
        return self.path.name if self.path else "model"

    # ------------------------------------------------------------------ the model's input
    def read(self, text: str) -> EncodedMessage:
        """The message as this model reads it: :func:`chatbot.batching.encode_message`."""
        return encode_message(self.tokenizer, text, self.max_source_len)

    def topics(self, texts: list[str], topic: int | None = None) -> list[TopicChoice] | None:
        """The topic each message is answered under: ``topic`` where given, else the topic classifier's
        most likely topic, with its probabilities (a checkpoint without a classifier reads topic 0, and
        says so). None: the model reads no topic. ``texts``: the messages as read (normalised, cut)."""
        if not self.reads_topic:
            return None
        names = self.topic_names
        if topic is not None:
            if not 0 <= int(topic) < len(names):
                raise ValueError(f"topic must be in 0..{len(names) - 1} for this model, got {topic}")
            return [TopicChoice(int(topic), None, "given", names[int(topic)])] * len(texts)
        if self.topic_classifier is None:
            return [TopicChoice(0, None, "default", names[0])] * len(texts)
        return [TopicChoice(int(p.argmax()), [float(x) for x in p], "predicted", names[int(p.argmax())])
                for p in self.topic_classifier.predict_proba(texts)]

    def tensors(self, batch: list[list[int]], topics: list[TopicChoice] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token-id lists (each non-empty) -> src (B, S), src_len (B,), topic (B,) or None, on the device."""
        src = pad(batch).to(self.device)
        src_len = torch.tensor([len(s) for s in batch], device=self.device)
        topic = None if topics is None else torch.tensor([t.label for t in topics], dtype=torch.long,
                                                        device=self.device)
        return src, src_len, topic

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> Memory:
        """The encoder's memory of each message, read as a reply reads it (no topic: for probes)."""
        src, src_len, _ = self.tensors([self.read(t).ids or [EOS_ID] for t in texts])
        return self.model.encode_message(src, src_len)

    # ------------------------------------------------------------------ helpers
    def _pieces(self, ids: list[int]) -> list[str]:
        """:meth:`Tokenizer.display_pieces` (each id's label is context-free: kept once made)."""
        known = self._labels
        new = [i for i in ids if i not in known]
        if new:
            known.update(zip(new, self.tokenizer.display_pieces(new)))
        return [known[i] for i in ids]

    @cached_property
    def _labels(self) -> dict[int, str]:
        return {}

    def _candidates(self, ids: np.ndarray, probs: np.ndarray, row: np.ndarray | None = None,
                    gate: float | None = None, columns: Columns | None = None) -> list[Candidate]:
        """The step's top-k next pieces; for a recall model (``gate``, ``row``: that step's attention over
        ``columns``), how much of each one's probability came from copying, and from which group."""
        return self._candidate_steps(ids[None], probs[None], None if row is None else row[None],
                                     None if gate is None else np.array([gate]), columns)[0]

    def _candidate_steps(self, ids: np.ndarray, probs: np.ndarray, rows: np.ndarray | None = None,
                         gates: np.ndarray | None = None, columns: Columns | None = None) -> list[list[Candidate]]:
        """:meth:`_candidates` of T steps at once: ids, probs (T, k), rows (T, C), gates (T,)."""
        labels = self._pieces(ids.ravel().tolist())  # each id's label is context-free
        k = ids.shape[1]
        out = [[Candidate(p if i != EOS_ID else "</s>", q) for p, i, q in zip(labels[t * k: t * k + k], ts, qs)]
               for t, (ts, qs) in enumerate(zip(ids.tolist(), probs.tolist()))]
        if gates is None or rows is None or columns is None or not out:
            return out
        copied, sources = columns.copy_credit(ids, probs, rows, gates)
        for step, shares, groups in zip(out, copied, sources):
            for c, share, group in zip(step, shares, groups):
                c.copied, c.source = share, group
        return out

    def _to_reply(self, h: Hypothesis, message: EncodedMessage, topic: TopicChoice | None,
                  columns: Columns | None = None) -> Reply:
        source_ids = message.ids if columns is None else columns.ids.tolist()
        return Reply(
            text=self.tokenizer.decode(h.tokens), source_tokens=self._pieces(source_ids),
            reply_tokens=self._pieces(h.tokens), attention=h.attention,
            candidates=self._candidate_steps(h.topk_ids, h.topk_probs, h.attention, h.gate, columns),
            score=h.norm_score, truncated=message.truncated, topic=topic,
            groups=[] if columns is None else columns.groups, gate=h.gate, finished=h.finished)

    # ------------------------------------------------------------------ recall (model.recall_k > 0)
    def recall(self, messages: list[EncodedMessage]) -> tuple[RecallInput | None, list[Columns | None]]:
        """A recall model's input for each message (its top-K recalled training pairs, on the device)
        and what each heatmap column shows; (None, [None, ...]) for other models."""
        if self.recall_index is None:
            return None, [None] * len(messages)
        index, k = self.recall_index, self.config.model.recall_k
        rows, scores = index.search([m.text for m in messages], k)
        rows, scores = rows.tolist(), scores.tolist()
        columns = []
        for m, rs, ss in zip(messages, rows, scores):
            groups, ids = [ColumnGroup("메시지", 0, len(m.ids))], list(m.ids)
            for j, (r, score) in enumerate(zip(rs, ss)):
                slot = self.slots.ids(r)
                groups.append(ColumnGroup(f"기억 {j + 1}", len(ids), len(ids) + len(slot),
                                          index.questions[r] if r >= 0 else "", index.answers[r] if r >= 0 else "",
                                          round(float(score), 4)))
                ids += slot
            columns.append(Columns(np.array(ids), groups))
        return self.slots.batch(rows, scores).to(self.device), columns

    @staticmethod
    def _empty() -> Reply:
        return Reply(EMPTY_PROMPT, [], [], None, generated=False)

    # ------------------------------------------------------------------ API
    def reply(self, text: str, topic: int | None = None, **decoding: Any) -> Reply:
        """Decode one message. ``decoding``: any :class:`DecodeOptions` field. ``topic``: the topic a
        model with ``model.num_topics`` reads (None: predicted from the message; ignored by other models)."""
        return self.reply_batch([text], topic=topic, **decoding)[0]

    def reply_batch(self, texts: list[str], topic: int | None = None, **decoding: Any) -> list[Reply]:
        opts = DecodeOptions(**decoding)
        messages = [self.read(t) for t in texts]
        live = [i for i, m in enumerate(messages) if m.ids]
        out: list[Reply] = [self._empty() for _ in texts]
        if not live:
            return out
        topics = self.topics([messages[i].text for i in live], topic)
        src, src_len, topic_ids = self.tensors([messages[i].ids for i in live], topics)
        recall, columns = self.recall([messages[i] for i in live])
        with torch.inference_mode():
            results = decode(self.model, src, src_len, opts, topic_ids, recall)
        for k, (i, hyps) in enumerate(zip(live, results)):
            replies = [self._to_reply(h, messages[i], topics and topics[k], columns[k]) for h in hyps]
            best = replies[0]
            if opts.strategy == "beam":
                best.n_best = replies
            out[i] = best
        return out

    def stream(self, text: str, topic: int | None = None, **decoding: Any) -> Iterator[StreamStep]:
        """Yield one :class:`StreamStep` per generated piece, then a final one (``done``) whose reply is
        what :meth:`reply` returns (greedy and sampling decode live; beam search finishes first, then its
        best hypothesis is replayed piece by piece). An empty message yields the final step alone."""
        opts = DecodeOptions(**decoding)
        message = self.read(text)
        if not message.ids:
            yield StreamStep(None, None, [], self._empty(), done=True)
            return
        topics = self.topics([message.text], topic)
        src, src_len, topic_ids = self.tensors([message.ids], topics)
        choice = topics[0] if topics else None
        recall, (columns,) = self.recall([message])
        if opts.strategy == "beam":
            with torch.inference_mode():
                hyps = beam_search(self.model, src, src_len, opts, topic_ids, recall)
            full = self._to_reply(hyps[0], message, choice, columns)
            full.n_best = [self._to_reply(h, message, choice, columns) for h in hyps]
            yield from self._replay(full, hyps[0].tokens)
            return
        yield from self._stream_live(src, src_len, topic_ids, message, choice, opts, recall, columns)

    def _replay(self, full: Reply, tokens: list[int]) -> Iterator[StreamStep]:
        """A finished reply (of piece ids ``tokens``) one piece at a time, then the reply itself."""
        for t in range(len(full.reply_tokens)):
            partial = Reply(self.tokenizer.decode(tokens[: t + 1]), full.source_tokens, full.reply_tokens[: t + 1],
                            None if full.attention is None else full.attention[: t + 1], full.candidates[: t + 1],
                            full.score, [], full.truncated, topic=full.topic, groups=full.groups,
                            gate=None if full.gate is None else full.gate[: t + 1])
            yield StreamStep(full.reply_tokens[t], None if full.attention is None else full.attention[t],
                             full.candidates[t], partial)
        yield StreamStep(None, None, [], full, done=True)

    def _stream_live(self, src: torch.Tensor, src_len: torch.Tensor, topic_ids: torch.Tensor | None,
                     message: EncodedMessage, topic: TopicChoice | None, opts: DecodeOptions,
                     recall: RecallInput | None = None, columns: Columns | None = None) -> Iterator[StreamStep]:
        """Greedy or sampled decoding of one message, a step per piece, then the finished reply."""
        gen = torch.Generator(device=self.device).manual_seed(opts.seed) if opts.seed is not None else None
        tokens: list[int] = []
        pieces: list[str] = []  # display labels grow one per step (each id's label is context-free)
        rows: list[np.ndarray] = []
        cands: list[list[Candidate]] = []
        gates: list[float] = []
        score = 0.0
        source_tokens = self._pieces(message.ids if columns is None else columns.ids.tolist())

        def reply_so_far() -> Reply:
            return Reply(self.tokenizer.decode(tokens), source_tokens, list(pieces),
                         np.stack(rows) if rows else None, list(cands), score, [], message.truncated, topic=topic,
                         groups=[] if columns is None else columns.groups,
                         gate=np.array(gates, dtype=np.float32) if columns is not None else None)

        ended = False  # </s> written (else the reply stops at max_len)
        with torch.inference_mode():  # not held across yields: a server may resume us on another thread
            memory = self.model.encode(src, src_len, topic_ids, recall)
        real = memory.mask[0].cpu().numpy()  # recall slots are padded: the heatmap shows real pieces only
        for step in decode_steps(self.model, memory, opts, gen):  # decode_steps enters inference mode per step
            tok = int(step.tokens[0])
            score += float(step.logprob[0])
            if tok == EOS_ID:
                ended = len(tokens) < opts.max_len  # at max_len, decoding forced the </s>
                break
            tokens.append(tok)
            pieces += self._pieces([tok])
            row = None if step.attention is None else step.attention[0].float().cpu().numpy()[real]
            if row is not None:
                rows.append(row)
            gate = None if step.gate is None else float(step.gate[0])
            if gate is not None:
                gates.append(gate)
            cands.append(self._candidates(step.topk_ids[0].cpu().numpy(), step.topk_probs[0].float().cpu().numpy(),
                                          row, gate, columns))
            yield StreamStep(pieces[-1], row, cands[-1], reply_so_far())
        final = reply_so_far()
        final.finished = ended
        if not self.has_attention or not rows:
            final.attention = None if not self.has_attention else np.zeros((0, len(source_tokens)), np.float32)
        yield StreamStep(None, None, [], final, done=True)
