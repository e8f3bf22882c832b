"""ChatBot: load a checkpoint once, then reply (whole or streamed) with the attention behind each piece.

    bot = ChatBot.from_checkpoint("checkpoints/default")
    r = bot.reply("오늘 너무 힘들었어", strategy="beam", beam_size=5)
    r.text, r.source_tokens, r.reply_tokens, r.attention   # attention: (len(reply_tokens), len(source_tokens))

    for step in bot.stream("안녕"):                          # one step per generated piece
        step.piece, step.attention, step.candidates
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .batching import pad
from .checkpoint import Checkpoint, load_checkpoint
from .config import EOS_ID
from .model import count_parameters
from .search import DecodeOptions, Hypothesis, beam_search, decode, decode_steps
from .text import normalize
from .topic import UNKNOWN_TOPIC, UNSURE_BELOW, topic_name

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default"
MAX_MESSAGE_CHARS = 500  # longer messages are cut before tokenising (bounded time for any input)
EMPTY_PROMPT = "메시지를 입력해 주세요. (Please type a message.)"


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


@dataclass
class Reply:
    text: str  # the reply, detokenised
    source_tokens: list[str]  # the message's pieces as the encoder saw them (heatmap columns)
    reply_tokens: list[str]  # the reply's pieces (heatmap rows)
    attention: np.ndarray | None  # (len(reply_tokens), len(source_tokens)); None without attention
    candidates: list[list[Candidate]] = field(default_factory=list)  # per step: top-k next pieces
    score: float = 0.0  # log-probability (length-normalised for beam search)
    n_best: list["Reply"] = field(default_factory=list)  # beam search: every returned hypothesis
    truncated: bool = False  # the message was cut to fit the encoder
    generated: bool = True  # False: the message was empty, the model was not run
    topic: int | None = None  # the topic label the encoder read (models with model.num_labels > 0)
    topic_probs: list[float] | None = None  # the topic classifier's probabilities, when it chose the topic
    topic_name: str = ""
    topic_source: str | None = None  # given | predicted | unsure (classifier unsure: "unknown") | default (no classifier)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: attention as nested lists of floats."""
        return {
            "reply": self.text,
            "source_tokens": self.source_tokens,
            "reply_tokens": self.reply_tokens,
            "attention": [] if self.attention is None else [[round(float(x), 5) for x in row] for row in self.attention],
            "score": self.score,
            "truncated": self.truncated,
            "generated": self.generated,
            "n_best": [{"reply": h.text, "score": h.score} for h in self.n_best],
            "topic": self.topic_name, "topic_id": self.topic,
            "topic_source": self.topic_source,
            "topic_probs": None if self.topic_probs is None else [round(float(p), 4) for p in self.topic_probs],
        }


@dataclass(frozen=True)
class TopicChoice:
    label: int  # the topic vector the encoder reads
    probs: list[float] | None  # the classifier's probabilities (None: the topic was given)
    source: str  # given | predicted | unsure | default
    name: str


@dataclass
class StreamStep:
    piece: str  # the piece generated at this step
    attention: np.ndarray | None  # (len(source_tokens),) where the decoder looked for it
    candidates: list[Candidate]  # top-k next pieces it chose among
    reply: Reply  # everything generated so far


class ChatBot:
    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu", quantize: bool = False):
        self.model = checkpoint.model.eval()
        self.quantized = quantize and quantize_int8(self.model)
        self.tokenizer = checkpoint.tokenizer
        self.config = checkpoint.config
        self.meta = checkpoint.meta
        self.path = checkpoint.path
        self.topic = checkpoint.topic  # TopicClassifier or None
        # a model with an "unknown topic" vector reads it where the classifier is less sure than this
        self.topic_threshold = UNSURE_BELOW
        self.device = torch.device(device)
        self.max_source_len = self.config.data.max_source_len

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str | torch.device = "auto",
                        quantize: bool | str = "auto") -> "ChatBot":
        """Load once. ``quantize="auto"``: int8 dynamic quantization of the matmuls on the CPU for
        models of a million parameters or more (replies about 2x faster for the shipped model, same
        test-split figures: docs/performance.md); none on a GPU or for tiny models, where the
        (de)quantization overhead outweighs the smaller weight reads."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoint = load_checkpoint(path or DEFAULT_CHECKPOINT, device)
        if quantize == "auto":
            quantize = torch.device(device).type == "cpu" and count_parameters(checkpoint.model) >= 1_000_000
        return cls(checkpoint, device, bool(quantize))

    @property
    def has_attention(self) -> bool:
        return self.model.attention is not None

    @property
    def reads_topic(self) -> bool:
        """The encoder reads a topic label (model.num_labels > 0)."""
        return self.config.model.num_labels > 0

    @property
    def unknown_topic(self) -> int | None:
        """The label of the "unknown topic" vector, for models trained with train.topic_dropout."""
        m = self.config.model
        return m.num_labels if m.num_labels and m.unknown_topic else None

    @property
    def topic_names(self) -> list[str]:
        """One name per topic label this model reads ("unknown" last, where it has one)."""
        n = self.config.model.num_labels
        names = list(self.topic.names) if self.topic is not None else [topic_name(i) for i in range(n)]
        return names + ([UNKNOWN_TOPIC] if self.unknown_topic is not None else [])

    @property
    def name(self) -> str:
        return self.path.name if self.path else "model"

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> tuple[list[int], bool]:
        text = normalize(text[: MAX_MESSAGE_CHARS * 2])
        cut = len(text) > MAX_MESSAGE_CHARS
        ids = self.tokenizer.encode(text[:MAX_MESSAGE_CHARS])
        cut = cut or len(ids) > self.max_source_len
        return ids[: self.max_source_len], cut

    def _pieces(self, ids: list[int]) -> list[str]:
        return self.tokenizer.display_pieces(ids)

    def _candidates(self, ids: np.ndarray, probs: np.ndarray) -> list[Candidate]:
        pieces = self._pieces([int(i) for i in ids])
        return [Candidate(p if int(i) != EOS_ID else "</s>", float(q)) for p, i, q in zip(pieces, ids, probs)]

    def _to_reply(self, h: Hypothesis, src_ids: list[int], truncated: bool) -> Reply:
        return Reply(
            text=self.tokenizer.decode(h.tokens), source_tokens=self._pieces(src_ids),
            reply_tokens=self._pieces(h.tokens), attention=h.attention,
            candidates=[self._candidates(i, p) for i, p in zip(h.topk_ids, h.topk_probs)],
            score=h.norm_score, truncated=truncated)

    def topics(self, texts: list[str], label: int | None = None) -> list[TopicChoice] | None:
        """The topic each message is answered under: ``label`` where given, else the topic classifier's
        choice with its probabilities: its most likely topic, or, for a model with an "unknown topic"
        vector, that one where the classifier is less sure than ``topic_threshold``. A checkpoint
        without a classifier reads its "unknown topic" if it has one, else topic 0. None: the model
        reads no topic."""
        n = self.config.model.num_labels
        if not n:
            return None
        unknown, names = self.unknown_topic, self.topic_names
        if label is not None:
            if not 0 <= int(label) < len(names):
                raise ValueError(f"topic label must be in 0..{len(names) - 1} for this model, got {label}")
            return [TopicChoice(int(label), None, "given", names[int(label)])] * len(texts)
        if self.topic is None:
            lab = 0 if unknown is None else unknown
            return [TopicChoice(lab, None, "default", names[lab])] * len(texts)
        out = []
        for p in self.topic.predict_proba([t[:MAX_MESSAGE_CHARS] for t in texts]):
            sure = unknown is None or p.max() >= self.topic_threshold
            lab = int(p.argmax()) if sure else unknown
            out.append(TopicChoice(lab, [float(x) for x in p], "predicted" if sure else "unsure", names[lab]))
        return out

    def _tensors(self, batch: list[list[int]], topics: list[TopicChoice] | None):
        src = pad(batch).to(self.device)
        src_len = torch.tensor([len(s) for s in batch], device=self.device)
        lab = None if topics is None else torch.tensor([t.label for t in topics], dtype=torch.long, device=self.device)
        return src, src_len, lab

    def _with_topic(self, reply: Reply, topic: TopicChoice | None) -> Reply:
        if topic is not None:
            reply.topic, reply.topic_probs, reply.topic_source, reply.topic_name = (
                topic.label, topic.probs, topic.source, topic.name)
        return reply

    @staticmethod
    def _empty() -> Reply:
        return Reply(EMPTY_PROMPT, [], [], None, generated=False)

    # ------------------------------------------------------------------ API
    def reply(self, text: str, label: int | None = None, **decoding: Any) -> Reply:
        """Decode one message. ``decoding``: any :class:`DecodeOptions` field. ``label``: the topic a
        model with ``model.num_labels`` reads (None: predicted from the message; ignored by other models)."""
        return self.reply_batch([text], label=label, **decoding)[0]

    def reply_batch(self, texts: list[str], label: int | None = None, **decoding: Any) -> list[Reply]:
        opts = DecodeOptions(**decoding)
        encoded = [self._encode(t) for t in texts]
        live = [i for i, (ids, _) in enumerate(encoded) if ids]
        out: list[Reply] = [self._empty() for _ in texts]
        if not live:
            return out
        topics = self.topics([texts[i] for i in live], label)
        src, src_len, lab = self._tensors([encoded[i][0] for i in live], topics)
        with torch.inference_mode():
            results = decode(self.model, src, src_len, opts, lab)
        for k, (i, hyps) in enumerate(zip(live, results)):
            ids, cut = encoded[i]
            replies = [self._with_topic(self._to_reply(h, ids, cut), topics and topics[k]) for h in hyps]
            best = replies[0]
            if opts.strategy == "beam":
                best.n_best = replies
            out[i] = best
        return out

    def stream(self, text: str, label: int | None = None, **decoding: Any) -> Iterator[StreamStep]:
        """Yield one :class:`StreamStep` per generated piece (greedy and sampling decode live;
        beam search finishes first, then its best hypothesis is replayed piece by piece)."""
        opts = DecodeOptions(**decoding)
        ids, cut = self._encode(text)
        if not ids:
            return
        topics = self.topics([text], label)
        topic = topics[0] if topics else None
        src, src_len, lab = self._tensors([ids], topics)
        source_tokens = self._pieces(ids)
        if opts.strategy == "beam":
            with torch.inference_mode():
                hyps = beam_search(self.model, src, src_len, opts, lab)
            full = self._with_topic(self._to_reply(hyps[0], ids, cut), topic)
            full.n_best = [self._with_topic(self._to_reply(h, ids, cut), topic) for h in hyps]
            for t in range(len(full.reply_tokens)):
                partial = self._with_topic(Reply(
                    self.tokenizer.decode(hyps[0].tokens[: t + 1]), source_tokens, full.reply_tokens[: t + 1],
                    None if full.attention is None else full.attention[: t + 1], full.candidates[: t + 1],
                    full.score, full.n_best if t + 1 == len(full.reply_tokens) else [], cut), topic)
                yield StreamStep(full.reply_tokens[t], None if full.attention is None else full.attention[t],
                                 full.candidates[t], partial)
            return
        gen = torch.Generator(device=self.device).manual_seed(opts.seed) if opts.seed is not None else None
        tokens: list[int] = []
        pieces: list[str] = []  # display labels grow one per step (each id's label is context-free)
        rows: list[np.ndarray] = []
        cands: list[list[Candidate]] = []
        score = 0.0
        with torch.inference_mode():  # not held across yields: a server may resume us on another thread
            memory = self.model.encode(src, src_len, lab)
        for step in decode_steps(self.model, memory, opts, gen):  # decode_steps enters inference mode per step
            tok = int(step.tokens[0])
            score += float(step.logprob[0])
            if tok == EOS_ID:
                break
            tokens.append(tok)
            pieces += self._pieces([tok])
            row = None if step.attention is None else step.attention[0].float().cpu().numpy()
            if row is not None:
                rows.append(row)
            cands.append(self._candidates(step.topk_ids[0].cpu().numpy(), step.topk_probs[0].float().cpu().numpy()))
            partial = self._with_topic(Reply(self.tokenizer.decode(tokens), source_tokens, list(pieces),
                                             np.stack(rows) if rows else None, list(cands), score, [], cut), topic)
            yield StreamStep(partial.reply_tokens[-1], row, cands[-1], partial)
