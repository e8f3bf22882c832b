"""Decoding as plain functions, separate from the model: greedy, sampling and beam search.

Every function returns, for each hypothesis, the attention matrix that produced it
(``(reply_len, source_len)``) and, per step, the top-k next-token probabilities the decoder
chose from. Beam search keeps them for every beam and reorders them with the beams'
back-pointers, so each of the n-best hypotheses carries its own attention.

Score rewriting (special-token bans, minimum length, repetition penalty, n-gram blocking)
is done by small functions on the logits before the softmax.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, get_args, get_type_hints

import numpy as np
import torch
from torch import Tensor

from .config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from .model import Memory, RecallInput, Seq2Seq, select_state

STRATEGY_LABELS = {"greedy": "탐욕 greedy", "beam": "빔 beam", "sample": "샘플링 sampling"}  # value -> label
STRATEGIES = tuple(STRATEGY_LABELS)


@dataclass(frozen=True)
class OptionSpec:
    """One :class:`DecodeOptions` field: its default, its limits and its labels.

    Written once, on the field; the CLI's flags, the API's clamping and the demo's controls are
    built from these (:data:`OPTIONS`).
    """

    name: str
    type: type  # int, float or str
    default: Any
    label: str  # the control's label, Korean first: "최대 길이 max length"
    help: str  # one English line (the CLI's help)
    low: int | float | None = None  # inclusive limits (numbers only)
    high: int | float | None = None
    step: int | float | None = None  # a slider's step
    choices: tuple[str, ...] | None = None  # the allowed values of a str option
    strategies: tuple[str, ...] = STRATEGIES  # the strategies whose decoding it changes
    optional: bool = False  # None allowed (seed)

    def range_text(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        fmt = str if self.type is int else (lambda x: f"{x:g}")
        return f"{fmt(self.low)}–{fmt(self.high)}"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed here (e.g. "must be in 1–80"), or None when it is."""
        if value is None:
            return None if self.optional else "must be set"
        if self.choices:
            return None if value in self.choices else f"must be one of {self.range_text()}"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.type is int else numbers.Real):
            return "must be an integer" if self.type is int else "must be a number"
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return "must be a finite number"
        if not self.low <= value <= self.high:
            return f"must be in {self.range_text()}"
        return None

    def clamp(self, value: Any) -> int | float:
        """``value`` (a number or its text: sliders send floats, API clients anything) cast to this
        option's type and clamped into its range. NaN, infinities and non-numbers raise ValueError."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{self.name} must be a finite number, got {value!r}")
        number = self.type(number)  # int() truncates, as the sliders' old int(...) did
        return self.type(min(max(number, self.low), self.high))


def _option(default: Any, label: str, help: str, low: int | float | None = None, high: int | float | None = None,
            step: int | float | None = None, **more: Any) -> Any:
    """A :class:`DecodeOptions` field with its :class:`OptionSpec` (less name, type, default) as metadata."""
    return field(default=default, metadata={"option": dict(label=label, help=help, low=low, high=high, step=step,
                                                           **more)})


@dataclass
class DecodeOptions:
    """How to decode a reply. Each field carries its default, limits and labels (:data:`OPTIONS`);
    construction checks every field against them, so a bad value fails here, by name."""

    strategy: str = _option("greedy", "전략 strategy", "decoding strategy", choices=STRATEGIES)
    max_len: int = _option(40, "최대 길이 max length", "reply pieces at most, </s> excluded", 1, 80, 1)
    min_len: int = _option(1, "최소 길이 min length", "</s> is banned before this many pieces", 1, 80, 1)
    beam_size: int = _option(5, "빔 크기 beam size", "beams kept", 1, 10, 1, strategies=("beam",))
    length_penalty: float = _option(1.0, "길이 보정 length penalty",
                                    "GNMT alpha: score / ((5 + len) / 6) ** alpha", 0.0, 2.0, 0.1,
                                    strategies=("beam",))
    n_best: int = _option(1, "후보 수 n-best", "hypotheses returned, at most the beam size", 1, 10, 1,
                          strategies=("beam",))
    temperature: float = _option(1.0, "온도 temperature", "divides the logits before sampling", 0.05, 2.0, 0.05,
                                 strategies=("sample",))
    top_k: int = _option(0, "top-k (0 = 전체 all)", "sample among the k most likely pieces; 0 = all", 0, 50, 1,
                         strategies=("sample",))
    top_p: float = _option(1.0, "top-p (nucleus)", "sample from the smallest set with this much probability",
                           0.05, 1.0, 0.05, strategies=("sample",))
    no_repeat_ngram: int = _option(0, "n-gram 반복 금지 no-repeat",
                                   "never repeat an n-gram of this size within a reply; 0 = off", 0, 5, 1)
    repetition_penalty: float = _option(1.0, "반복 벌점 repetition penalty",
                                        "above 1 discourages pieces already in the reply, as in CTRL", 1.0, 2.0, 0.05)
    inspect_k: int = _option(5, "후보 살펴보기 inspect top-k", "next-piece candidates kept per step", 1, 20, 1)
    seed: int | None = _option(None, "시드 seed", "random seed; none: nondeterministic", 0, 2**32 - 1,
                               strategies=("sample",), optional=True)

    def __post_init__(self) -> None:
        for name, spec in OPTIONS.items():
            value = getattr(self, name)
            problem = spec.problem(value)
            if problem:
                raise ValueError(f"{name} {problem}, got {value!r}")
        if self.n_best > self.beam_size:
            raise ValueError(f"n_best must be at most beam_size ({self.beam_size}), got {self.n_best}")


def _specs() -> dict[str, OptionSpec]:
    types = get_type_hints(DecodeOptions)
    specs = {}
    for f in fields(DecodeOptions):
        kind = next(t for t in (get_args(types[f.name]) or (types[f.name],)) if t is not type(None))
        specs[f.name] = OptionSpec(f.name, kind, f.default, **f.metadata["option"])
    return specs


OPTIONS: dict[str, OptionSpec] = _specs()  # field name -> spec, in field order


@dataclass
class Hypothesis:
    tokens: list[int]  # reply ids, </s> excluded
    score: float  # total log-probability, </s> included (a </s> forced at max_len adds 0)
    norm_score: float  # score after the length penalty (beam); = score otherwise
    attention: np.ndarray | None  # (len(tokens), S) or None for the no-attention model
    topk_ids: np.ndarray  # (len(tokens), k) candidates the decoder chose from at each step
    topk_probs: np.ndarray  # (len(tokens), k) their probabilities
    finished: bool  # ended with </s> of its own (False: cut at max_len, where decoding forces </s>)
    gate: np.ndarray | None = None  # (len(tokens),) recall models: share of each piece's probability generated


@dataclass
class Step:
    """One decoding step for a batch (what streaming yields)."""

    tokens: Tensor  # (B,) chosen pieces
    attention: Tensor | None  # (B, S) where each decoder looked
    topk_ids: Tensor  # (B, k)
    topk_probs: Tensor  # (B, k)
    logprob: Tensor  # (B,) log-probability of the chosen piece
    done: Tensor  # (B,) bool: this sequence had already finished before this step
    gate: Tensor | None = None  # (B,) recall models: the copy gate g (1 = generate, 0 = copy)


# ---------------------------------------------------------------- score rewriting
def ban_special(logits: Tensor, step: int, min_len: int) -> Tensor:
    """Never generate <pad>, <s> or <unk>; no </s> before ``min_len`` pieces."""
    logits[:, : max(PAD_ID, UNK_ID, BOS_ID) + 1] = float("-inf")  # ids 0..2: a slice, no index tensor per step
    if step < min_len:
        logits[:, EOS_ID] = float("-inf")
    return logits


def repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al., 2019): divide positive / multiply negative logits of seen pieces."""
    if penalty == 1.0 or history.size(1) == 0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def block_ngrams(logits: Tensor, history: Tensor, n: int) -> Tensor:
    """Ban each piece that would complete an n-gram already present in that row's history.

    logits (B, V), history (B, t) -> logits with banned pieces at -inf.
    """
    if n <= 0 or history.size(1) < n:
        return logits
    windows = history.unfold(1, n, 1)  # (B, t-n+1, n)
    prefix = history[:, history.size(1) - (n - 1):] if n > 1 else history[:, :0]
    match = (windows[:, :, : n - 1] == prefix.unsqueeze(1)).all(-1)  # (B, W)
    banned = windows[:, :, n - 1].masked_fill(~match, PAD_ID)  # (B, W); PAD is banned anyway
    return logits.scatter(1, banned, float("-inf"))


def rewrite_scores(logits: Tensor, history: Tensor, step: int, opts: DecodeOptions) -> Tensor:
    logits = ban_special(logits.float(), step, opts.min_len)
    logits = repetition_penalty(logits, history, opts.repetition_penalty)
    return block_ngrams(logits, history, opts.no_repeat_ngram)


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Keep the ``top_k`` most likely pieces and the smallest nucleus of mass ``top_p``."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this piece already >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


# ---------------------------------------------------------------- greedy and sampling
@torch.inference_mode()
def decode_steps(model: Seq2Seq, memory: Memory, opts: DecodeOptions,
                 generator: torch.Generator | None = None) -> Iterator[Step]:
    """Greedy or sampled decoding of a batch, one :class:`Step` per generated position.

    Stops when every sequence has produced </s> or after ``opts.max_len`` pieces.
    """
    B = memory.values.size(0)
    device = memory.values.device
    prev = torch.full((B,), BOS_ID, dtype=torch.long, device=device)
    history = torch.empty((B, 0), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    state = memory.state
    sampling = opts.strategy == "sample"
    keep_history = opts.no_repeat_ngram > 0 or opts.repetition_penalty != 1.0  # only score rewriting reads it
    for t in range(opts.max_len + 1):  # the last step may only end the reply
        logits, attn, state, gate = model.step(prev, state, memory)
        logits = rewrite_scores(logits, history, t, opts)
        if t == opts.max_len:
            logits = torch.full_like(logits, float("-inf")).index_fill_(1, torch.tensor([EOS_ID], device=device), 0.0)
        if sampling:
            logits = logits / opts.temperature
        probs = logits.softmax(-1)  # (B, V)
        topk_probs, topk_ids = probs.topk(opts.inspect_k, dim=-1)
        if sampling:
            filtered = filter_top_k_top_p(logits, opts.top_k, opts.top_p).softmax(-1)
            token = torch.multinomial(filtered, 1, generator=generator).squeeze(1)
            token = token.masked_fill(done, PAD_ID)
            logprob = probs.gather(1, token.unsqueeze(1)).squeeze(1).log()
        else:  # the top candidate is the greedy choice
            token = topk_ids[:, 0].masked_fill(done, PAD_ID)
            logprob = topk_probs[:, 0].log()
        yield Step(token, attn, topk_ids, topk_probs, logprob, done, gate)
        done = done | (token == EOS_ID)  # a new tensor: the yielded one stays as it was
        if bool(done.all()):
            return
        if keep_history:
            history = torch.cat([history, token.unsqueeze(1)], dim=1)
        prev = token.masked_fill(done, EOS_ID)


def _collect(steps: Iterator[Step], mask: Tensor, has_attention: bool, max_len: int) -> list[Hypothesis]:
    """Turn a batch's steps into one :class:`Hypothesis` per source (one host copy per field); each
    attention row keeps the memory's real positions (``mask`` (B, S): padding cut). A </s> at step
    ``max_len`` was forced (:func:`decode_steps`): that reply did not finish by itself."""
    all_steps = list(steps)
    tokens = torch.stack([s.tokens for s in all_steps], 1).cpu().numpy()  # (B, T)
    done = torch.stack([s.done for s in all_steps], 1).cpu().numpy()  # (B, T)
    logprob = torch.stack([s.logprob for s in all_steps], 1).double().cpu().numpy()  # (B, T)
    topk_ids = torch.stack([s.topk_ids for s in all_steps], 1).cpu().numpy()  # (B, T, k)
    topk_probs = torch.stack([s.topk_probs for s in all_steps], 1).float().cpu().numpy()  # (B, T, k)
    attention = (torch.stack([s.attention for s in all_steps], 1).float().cpu().numpy()  # (B, T, S)
                 if has_attention else None)
    gates = (torch.stack([s.gate for s in all_steps], 1).float().cpu().numpy()  # (B, T)
             if all_steps and all_steps[0].gate is not None else None)
    real = mask.cpu().numpy()
    hyps = []
    for b in range(real.shape[0]):
        live = np.flatnonzero(~done[b])  # steps this sequence took (a finished one stops at its </s>)
        ended = live.size > 0 and int(tokens[b, live[-1]]) == EOS_ID
        body = live[:-1] if ended else live  # the </s> step adds to the score, not to the reply
        score = float(logprob[b, live].sum())
        hyps.append(Hypothesis(
            tokens=tokens[b, body].tolist(), score=score, norm_score=score,
            attention=attention[b, body][:, real[b]] if attention is not None else None,
            topk_ids=topk_ids[b, body], topk_probs=topk_probs[b, body], finished=bool(ended and live[-1] < max_len),
            gate=gates[b, body] if gates is not None else None))
    return hyps


@torch.inference_mode()
def greedy(model: Seq2Seq, src: Tensor, src_len: Tensor, opts: DecodeOptions | None = None,
           topic: Tensor | None = None, recall: RecallInput | None = None) -> list[Hypothesis]:
    """Batched greedy decoding: one hypothesis per source. src (B, S), src_len (B,)."""
    opts = opts or DecodeOptions()
    memory = model.encode(src, src_len, topic, recall)
    return _collect(decode_steps(model, memory, opts), memory.mask, model.attention is not None, opts.max_len)


@torch.inference_mode()
def sample(model: Seq2Seq, src: Tensor, src_len: Tensor, opts: DecodeOptions,
           topic: Tensor | None = None, recall: RecallInput | None = None) -> list[Hypothesis]:
    """Batched sampling with temperature, top-k and top-p: one hypothesis per source."""
    memory = model.encode(src, src_len, topic, recall)
    gen = None
    if opts.seed is not None:
        gen = torch.Generator(device=src.device).manual_seed(opts.seed)
    return _collect(decode_steps(model, memory, opts, gen), memory.mask, model.attention is not None, opts.max_len)


# ---------------------------------------------------------------- beam search
def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al., 2016): lp(Y) = ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.inference_mode()
def beam_search(model: Seq2Seq, src: Tensor, src_len: Tensor, opts: DecodeOptions,
                topic: Tensor | None = None, recall: RecallInput | None = None) -> list[Hypothesis]:
    """Beam search for one source (src (1, S)); the beams run as one batch.

    Returns up to ``opts.n_best`` hypotheses, best first by length-normalised score, each with
    the attention rows and top-k candidates of its own beam history.
    """
    if src.size(0) != 1:
        raise ValueError("beam_search decodes one source at a time (its beams are the batch)")
    K, k_insp, device = opts.beam_size, opts.inspect_k, src.device
    memory = model.encode(src, src_len, topic, recall)
    real = memory.mask[0].cpu()  # the memory's real positions (recall slots are padded)
    memory = memory.select(torch.zeros(K, dtype=torch.long, device=device))
    S = memory.values.size(1)
    state = memory.state
    prev = torch.full((K,), BOS_ID, dtype=torch.long, device=device)
    scores = torch.full((K,), float("-inf"), device=device)
    scores[0] = 0.0  # all beams start identical: expand only the first
    history = torch.empty((K, 0), dtype=torch.long, device=device)
    att_hist = torch.empty((K, 0, S), device=device)
    tk_ids_hist = torch.empty((K, 0, k_insp), dtype=torch.long, device=device)
    tk_probs_hist = torch.empty((K, 0, k_insp), device=device)
    gate_hist = torch.empty((K, 0), device=device)
    finished: list[Hypothesis] = []
    has_attention = model.attention is not None

    def make(i_origin: int, score: float, done: bool, by_itself: bool) -> Hypothesis:
        n = history.size(1)
        return Hypothesis(
            tokens=history[i_origin].tolist(), score=score,
            norm_score=score / length_penalty(n + int(done), opts.length_penalty),
            attention=att_hist[i_origin][:, real].cpu().numpy() if has_attention else None,
            topk_ids=tk_ids_hist[i_origin].cpu().numpy(), topk_probs=tk_probs_hist[i_origin].cpu().numpy(),
            finished=done and by_itself, gate=gate_hist[i_origin].cpu().numpy() if model.copies else None)

    for t in range(opts.max_len + 1):
        logits, attn, state, gate = model.step(prev, state, memory)
        logits = rewrite_scores(logits, history, t, opts)
        if t == opts.max_len:  # out of room: every beam must end now
            logits = torch.full_like(logits, float("-inf"))
            logits[:, EOS_ID] = 0.0
        logp = logits.log_softmax(-1)  # (K, V)
        V = logp.size(-1)
        step_probs, step_ids = logp.exp().topk(k_insp, dim=-1)  # (K, k)
        cand = (scores.unsqueeze(1) + logp).view(-1)  # (K·V,)
        top_scores, top_idx = cand.topk(min(2 * K, cand.numel()))
        origin, token = top_idx // V, top_idx % V
        for rank in range(min(K, top_idx.numel())):
            if token[rank] == EOS_ID and torch.isfinite(top_scores[rank]):
                finished.append(make(int(origin[rank]), float(top_scores[rank]), True, t < opts.max_len))
        alive = ((token != EOS_ID) & torch.isfinite(top_scores)).nonzero().squeeze(1)[:K]
        if len(finished) >= K or alive.numel() == 0:
            break
        o = origin[alive]
        history = torch.cat([history[o], token[alive].unsqueeze(1)], dim=1)
        if has_attention:
            att_hist = torch.cat([att_hist[o], attn[o].float().unsqueeze(1)], dim=1)
        tk_ids_hist = torch.cat([tk_ids_hist[o], step_ids[o].unsqueeze(1)], dim=1)
        tk_probs_hist = torch.cat([tk_probs_hist[o], step_probs[o].unsqueeze(1)], dim=1)
        if gate is not None:
            gate_hist = torch.cat([gate_hist[o], gate[o].float().unsqueeze(1)], dim=1)
        scores = top_scores[alive]
        if alive.numel() < K:  # pad with dead beams so the batch keeps its size
            pad = K - alive.numel()
            o = torch.cat([o, o[:1].expand(pad)])
            history = torch.cat([history, history[:1].expand(pad, -1)])
            att_hist = torch.cat([att_hist, att_hist[:1].expand(pad, -1, -1)])
            tk_ids_hist = torch.cat([tk_ids_hist, tk_ids_hist[:1].expand(pad, -1, -1)])
            tk_probs_hist = torch.cat([tk_probs_hist, tk_probs_hist[:1].expand(pad, -1, -1)])
            gate_hist = torch.cat([gate_hist, gate_hist[:1].expand(pad, -1)]) if gate is not None else gate_hist
            scores = torch.cat([scores, scores.new_full((pad,), float("-inf"))])
        state = select_state(state, o)
        prev = history[:, -1]
    finished.sort(key=lambda h: h.norm_score, reverse=True)
    return finished[: opts.n_best]


def decode(model: Seq2Seq, src: Tensor, src_len: Tensor, opts: DecodeOptions,
           topic: Tensor | None = None, recall: RecallInput | None = None) -> list[list[Hypothesis]]:
    """Any strategy, any batch: a list (per source) of hypothesis lists (n-best for beam, else one)."""
    if opts.strategy == "beam":
        return [beam_search(model, src[i: i + 1, : int(src_len[i])], src_len[i: i + 1], opts,
                            None if topic is None else topic[i: i + 1],
                            None if recall is None else recall.select(i)) for i in range(src.size(0))]
    fn = greedy if opts.strategy == "greedy" else sample
    return [[h] for h in fn(model, src, src_len, opts, topic, recall)]
