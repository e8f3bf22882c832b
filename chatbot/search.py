"""Decoding as plain functions, separate from the model: greedy, sampling and beam search.

Every function returns, for each hypothesis, the attention matrix that produced it
(``(reply_len, source_len)``) and, per step, the top-k next-token probabilities the decoder
chose from. Beam search keeps them for every beam and reorders them with the beams'
back-pointers, so each of the n-best hypotheses carries its own attention.

Score rewriting (special-token bans, minimum length, repetition penalty, n-gram blocking)
is done by small functions on the logits before the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from .model import Memory, Seq2Seq, select_state

STRATEGIES = ("greedy", "beam", "sample")


@dataclass
class DecodeOptions:
    strategy: str = "greedy"  # greedy | beam | sample
    max_len: int = 40  # reply pieces at most, </s> excluded
    min_len: int = 1  # </s> is banned before this many pieces
    beam_size: int = 5  # beams (strategy=beam)
    length_penalty: float = 1.0  # GNMT alpha: score / ((5 + len) / 6) ** alpha (beam)
    n_best: int = 1  # hypotheses returned by beam search
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # sample among the k most likely pieces (0 = all)
    top_p: float = 1.0  # nucleus sampling: smallest set with this much probability
    no_repeat_ngram: int = 0  # >0: never repeat an n-gram of this size within a reply
    repetition_penalty: float = 1.0  # >1: discourage pieces already in the reply (CTRL)
    inspect_k: int = 5  # how many next-token candidates to keep per step
    seed: int | None = None  # sampling seed (None = nondeterministic)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_len < 1 or self.beam_size < 1 or self.n_best < 1:
            raise ValueError("max_len, beam_size and n_best must be at least 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class Hypothesis:
    tokens: list[int]  # reply ids, </s> excluded
    score: float  # total log-probability (of </s> too when finished)
    norm_score: float  # score after the length penalty (beam); = score otherwise
    attention: np.ndarray | None  # (len(tokens), S) or None for the no-attention model
    topk_ids: np.ndarray  # (len(tokens), k) candidates the decoder chose from at each step
    topk_probs: np.ndarray  # (len(tokens), k) their probabilities
    finished: bool  # ended with </s> (False: cut at max_len)


@dataclass
class Step:
    """One decoding step for a batch (what streaming yields)."""

    tokens: Tensor  # (B,) chosen pieces
    attention: Tensor | None  # (B, S) where each decoder looked
    topk_ids: Tensor  # (B, k)
    topk_probs: Tensor  # (B, k)
    logprob: Tensor  # (B,) log-probability of the chosen piece
    done: Tensor  # (B,) bool: this sequence had already finished before this step


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
        logits, attn, state = model.step(prev, state, memory)
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
        yield Step(token, attn, topk_ids, topk_probs, logprob, done)
        done = done | (token == EOS_ID)  # a new tensor: the yielded one stays as it was
        if bool(done.all()):
            return
        if keep_history:
            history = torch.cat([history, token.unsqueeze(1)], dim=1)
        prev = token.masked_fill(done, EOS_ID)


def _collect(steps: Iterator[Step], src_len: Tensor, has_attention: bool) -> list[Hypothesis]:
    """Turn a batch's steps into one :class:`Hypothesis` per source (one host copy per field)."""
    all_steps = list(steps)
    tokens = torch.stack([s.tokens for s in all_steps], 1).cpu().numpy()  # (B, T)
    done = torch.stack([s.done for s in all_steps], 1).cpu().numpy()  # (B, T)
    logprob = torch.stack([s.logprob for s in all_steps], 1).double().cpu().numpy()  # (B, T)
    topk_ids = torch.stack([s.topk_ids for s in all_steps], 1).cpu().numpy()  # (B, T, k)
    topk_probs = torch.stack([s.topk_probs for s in all_steps], 1).float().cpu().numpy()  # (B, T, k)
    attention = (torch.stack([s.attention for s in all_steps], 1).float().cpu().numpy()  # (B, T, S)
                 if has_attention else None)
    hyps = []
    for b in range(src_len.size(0)):
        live = np.flatnonzero(~done[b])  # steps this sequence took (a finished one stops at its </s>)
        finished = live.size > 0 and int(tokens[b, live[-1]]) == EOS_ID
        body = live[:-1] if finished else live  # the </s> step adds to the score, not to the reply
        S = int(src_len[b])
        score = float(logprob[b, live].sum())
        hyps.append(Hypothesis(
            tokens=tokens[b, body].tolist(), score=score, norm_score=score,
            attention=attention[b, body, :S] if attention is not None else None,
            topk_ids=topk_ids[b, body], topk_probs=topk_probs[b, body], finished=finished))
    return hyps


@torch.inference_mode()
def greedy(model: Seq2Seq, src: Tensor, src_len: Tensor, opts: DecodeOptions | None = None,
           label: Tensor | None = None) -> list[Hypothesis]:
    """Batched greedy decoding: one hypothesis per source. src (B, S), src_len (B,)."""
    opts = opts or DecodeOptions()
    memory = model.encode(src, src_len, label)
    return _collect(decode_steps(model, memory, opts), src_len, model.attention is not None)


@torch.inference_mode()
def sample(model: Seq2Seq, src: Tensor, src_len: Tensor, opts: DecodeOptions,
           label: Tensor | None = None) -> list[Hypothesis]:
    """Batched sampling with temperature, top-k and top-p: one hypothesis per source."""
    memory = model.encode(src, src_len, label)
    gen = None
    if opts.seed is not None:
        gen = torch.Generator(device=src.device).manual_seed(opts.seed)
    return _collect(decode_steps(model, memory, opts, gen), src_len, model.attention is not None)


# ---------------------------------------------------------------- beam search
def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al., 2016): lp(Y) = ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.inference_mode()
def beam_search(model: Seq2Seq, src: Tensor, src_len: Tensor, opts: DecodeOptions,
                label: Tensor | None = None) -> list[Hypothesis]:
    """Beam search for one source (src (1, S)); the beams run as one batch.

    Returns up to ``opts.n_best`` hypotheses, best first by length-normalised score, each with
    the attention rows and top-k candidates of its own beam history.
    """
    if src.size(0) != 1:
        raise ValueError("beam_search decodes one source at a time (its beams are the batch)")
    K, k_insp, device = opts.beam_size, opts.inspect_k, src.device
    memory = model.encode(src, src_len, label)
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
    finished: list[Hypothesis] = []
    has_attention = model.attention is not None

    def make(i_origin: int, score: float, done: bool) -> Hypothesis:
        n = history.size(1)
        return Hypothesis(
            tokens=history[i_origin].tolist(), score=score,
            norm_score=score / length_penalty(n + int(done), opts.length_penalty),
            attention=att_hist[i_origin, :, : int(src_len[0])].cpu().numpy() if has_attention else None,
            topk_ids=tk_ids_hist[i_origin].cpu().numpy(), topk_probs=tk_probs_hist[i_origin].cpu().numpy(),
            finished=done)

    for t in range(opts.max_len + 1):
        logits, attn, state = model.step(prev, state, memory)
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
                finished.append(make(int(origin[rank]), float(top_scores[rank]), True))
        alive = ((token != EOS_ID) & torch.isfinite(top_scores)).nonzero().squeeze(1)[:K]
        if len(finished) >= K or alive.numel() == 0:
            break
        o = origin[alive]
        history = torch.cat([history[o], token[alive].unsqueeze(1)], dim=1)
        if has_attention:
            att_hist = torch.cat([att_hist[o], attn[o].float().unsqueeze(1)], dim=1)
        tk_ids_hist = torch.cat([tk_ids_hist[o], step_ids[o].unsqueeze(1)], dim=1)
        tk_probs_hist = torch.cat([tk_probs_hist[o], step_probs[o].unsqueeze(1)], dim=1)
        scores = top_scores[alive]
        if alive.numel() < K:  # pad with dead beams so the batch keeps its size
            pad = K - alive.numel()
            o = torch.cat([o, o[:1].expand(pad)])
            history = torch.cat([history, history[:1].expand(pad, -1)])
            att_hist = torch.cat([att_hist, att_hist[:1].expand(pad, -1, -1)])
            tk_ids_hist = torch.cat([tk_ids_hist, tk_ids_hist[:1].expand(pad, -1, -1)])
            tk_probs_hist = torch.cat([tk_probs_hist, tk_probs_hist[:1].expand(pad, -1, -1)])
            scores = torch.cat([scores, scores.new_full((pad,), float("-inf"))])
        state = select_state(state, o)
        prev = history[:, -1]
    finished.sort(key=lambda h: h.norm_score, reverse=True)
    return finished[: opts.n_best]


def decode(model: Seq2Seq, src: Tensor, src_len: Tensor, opts: DecodeOptions,
           label: Tensor | None = None) -> list[list[Hypothesis]]:
    """Any strategy, any batch: a list (per source) of hypothesis lists (n-best for beam, else one)."""
    if opts.strategy == "beam":
        return [beam_search(model, src[i: i + 1, : int(src_len[i])], src_len[i: i + 1], opts,
                            None if label is None else label[i: i + 1]) for i in range(src.size(0))]
    fn = greedy if opts.strategy == "greedy" else sample
    return [[h] for h in fn(model, src, src_len, opts, label)]
