"""Training: ``python -m chatbot train --config configs/<recipe>.yaml [--section.key value ...]``.

Writes to ``train.out_dir``::

    metrics.jsonl   one JSON object per logged step / epoch (the demo plots it)
    best/           checkpoint of the best epoch by ``train.select`` (fp16 weights; what you serve):
                    ``loss`` = lowest validation loss, ``chrf`` = highest chrF of greedy replies to
                    the validation questions (the default; configs/default.yaml uses chrf)
    last/           latest checkpoint + train_state.pt (optimiser, scheduler, RNG, data position)

``--resume`` continues from ``last/`` exactly where it stopped (same data order and RNG).

The run, in :func:`train`: :func:`_prepare` (corpus, tokenizer or resume, model, DDP wrapper,
optimiser, scheduler, progress) -> :meth:`_Run.fit` (per epoch: :meth:`_Run.run_epoch`, the batch
loop, then :meth:`_Run.validate`) -> :meth:`_Run.finish` (DDP replica check, best/ refresh).

Multi-process (DistributedDataParallel): ``torchrun --nproc_per_node=N -m chatbot train ...``
(nccl on GPUs, gloo on the CPU). Each rank takes every N-th batch of the same global order;
the loss is weighted by the global token count so the update equals one process on the union
of the ranks' batches. Only rank 0 writes checkpoints, logs and metrics.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import sacrebleu
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .batching import (RECALL_ANSWER_PIECES, Batch, EncodedPairs, RecallSlots, batch_order, collate, encode_pairs,
                       encode_source, pad, with_recall)
from .checkpoint import MANIFEST, PROBE_KEY, Checkpoint, load_checkpoint, read_config, resolve, save_checkpoint, sha256
from .config import EOS_ID, PAD_ID, UNK_ID, Config, TrainConfig, default_data_path
from .data import load_corpus, split_corpus
from .inference import ChatBot
from .losses import corpus_cross_entropy, linear_cross_entropy
from .model import RecallInput, Seq2Seq, build_model, count_parameters
from .recall import RecallIndex
from .search import DecodeOptions, greedy
from .text import Tokenizer
from .topic import TopicClassifier, fit_on_splits

if TYPE_CHECKING:
    import pandas as pd

TRAIN_STATE = "train_state.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad resume state)."""


# ---------------------------------------------------------------- devices and precision
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None = full fp32)."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    Measured on 2-core AMD EPYC VMs, torch 2.13: with AVX512-BF16, bf16 matmuls run ~4.5x and a
    GRU forward + backward ~2.6x faster than fp32; on a VM exposing only AVX2, oneDNN falls back
    to a reference kernel and bf16 is 4-90x *slower*. So ``amp: auto`` uses bf16 only on the first.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


def set_threads(n: int, processes: int = 1) -> None:
    """Set torch's CPU threads once per process (0 = the cores shared among ``processes``).

    Never more threads than cores: OpenMP threads that share a core spin at every barrier
    (measured on this 2-core box: a training step went from 0.33 s to 4.5 s when a second
    2-thread process ran beside it).
    """
    n = n or max(1, (os.cpu_count() or 1) // max(1, processes))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse instead of returning them to the OS.

    A training step frees and re-allocates tensors of ~25 MB (the (tokens, vocabulary) logits and their
    gradients); by default glibc maps and unmaps them every step, and every fresh page costs a page
    fault on first touch. Measured on the 2-core EPYC, 1 thread: page faults per step 12,000 -> 5,600,
    step time -13 % (bf16) and -9 % (fp32). Returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------- distributed (torchrun)
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> Distributed:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1 (nccl with CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a :class:`DistributedDataParallel` wrapper (``model`` itself if not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def parameter_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes (replicas must agree bit for bit)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- loss and schedule
def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step instead of a loop of small ops: 37 -> 7 ms per step for the 4.8M-parameter
    # default model on one CPU core (the same update, up to floating-point rounding).
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


# ---------------------------------------------------------------- one optimiser step
class NonFiniteLoss(RuntimeError):
    pass


def train_step(model: torch.nn.Module, b: Batch, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, *, amp: torch.dtype | None = None, label_smoothing: float = 0.0,
               grad_clip: float = 1.0, teacher_forcing: float = 1.0, copy_alignment: float = 0.0) -> tuple[float, int]:
    """Forward, loss, backward, clip, step on one batch (its tensors already on the model's device).

    The output layer and the loss see only real (non-pad) target positions. The loss is the
    token sum divided by the *global* token count (all-reduced under DDP, times world size
    because DDP averages gradients), so N ranks x batch b == one process with batch N·b.
    Returns (mean loss per target token over the global batch, global target tokens).
    Raises NonFiniteLoss on every rank if any rank's loss is not finite (before any update).
    """
    positions = b.tgt_out != PAD_ID  # (B, T)
    device_type = b.src.device.type
    copies = unwrap(model).copies  # a recall model returns the mixture's log p, not features
    with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
        x, weights = model(b.src, b.src_len, b.tgt_in, b.topic, teacher_forcing=teacher_forcing,
                           positions=positions, features=True, recall=b.recall)  # (N, E), or (N, V) and (N,)
    if copies:
        logp, mean_log_vocab = x
        nll = F.nll_loss(logp, b.tgt_out[positions], reduction="none")  # (N,)
        loss_sum = ((1 - label_smoothing) * nll - label_smoothing * mean_log_vocab).sum()
        if copy_alignment > 0:
            loss_sum = loss_sum + copy_alignment * alignment_nll(weights, b)
    else:
        out = unwrap(model).out
        loss_sum = linear_cross_entropy(x, out.weight, out.bias, b.tgt_out[positions], label_smoothing,
                                        dtype=amp or torch.float32)
    stats = torch.stack([loss_sum.detach().double(), positions.sum().double()])  # (2,)
    world = 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        dist.all_reduce(stats)
    total, tokens = stats.tolist()  # one host sync per step
    if not math.isfinite(total):
        raise NonFiniteLoss(total)
    loss = loss_sum * (world / max(1.0, tokens))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return total / max(1.0, tokens), int(tokens)


def alignment_nll(weights: Tensor, b: Batch) -> Tensor:
    """Guided alignment for a recall model: where a recall slot's answer is the whole target answer
    (as far as the slot keeps it), -log of the attention that step t of the reply pays to that answer's
    t-th piece, summed over those steps (0 where no slot holds the answer). weights (B, T, S)."""
    ids = b.recall.ids  # (B, K, L)
    B, K, L = ids.shape
    T = b.tgt_out.size(1)
    sep = (ids == EOS_ID).float().argmax(-1)  # (B, K) the </s> after the question
    answer_len = b.recall.lengths - sep - 1  # (B, K) answer pieces in the slot
    t = torch.arange(T, device=ids.device)
    pos = (sep.unsqueeze(-1) + 1 + t).clamp_max(L - 1)  # (B, K, T) where piece t of the slot's answer is
    pieces = ids.gather(2, pos)  # (B, K, T)
    target = b.tgt_out.unsqueeze(1)  # (B, 1, T)
    target_len = (b.tgt_out != PAD_ID).sum(-1, keepdim=True) - 1  # (B, 1) answer pieces, </s> excluded
    inside = t < answer_len.unsqueeze(-1)  # (B, K, T)
    kept = target_len.clamp_max(RECALL_ANSWER_PIECES)  # (B, 1) what a slot keeps of such an answer
    whole = ((pieces == target) | ~inside).all(-1) & (answer_len == kept) & (answer_len > 0)  # (B, K)
    slot = torch.where(whole, torch.arange(K, device=ids.device), K).min(-1).values  # (B,) first such slot, K: none
    has = slot < K
    if not has.any():
        return weights.new_zeros((), dtype=torch.float32)
    k = slot.clamp_max(K - 1)
    memory_pos = b.src.size(1) + k.unsqueeze(-1) * L + pos[torch.arange(B), k]  # (B, T)
    steps = has.unsqueeze(-1) & inside[torch.arange(B), k]  # (B, T)
    a = weights.gather(2, memory_pos.unsqueeze(-1)).squeeze(-1).float()  # (B, T)
    return -(a.clamp_min(1e-6).log() * steps).sum()


# ---------------------------------------------------------------- evaluation during training
@dataclass
class Recalls:
    """The recalled pairs of a list of questions: each one's index rows and scores, and the slots
    that turn rows into a model's input."""
    slots: RecallSlots
    rows: list[list[int]]  # (N, K)
    scores: list[list[float]]  # (N, K)

    def batch(self, start: int, end: int) -> RecallInput:
        return self.slots.batch(self.rows[start:end], self.scores[start:end])


def sample_replies(model: Seq2Seq, tokenizer: Tokenizer, questions: list[str], max_source_len: int,
                   device: torch.device, topics: list[int] | None = None,
                   recall: RecallInput | None = None) -> list[tuple[str, str]]:
    """Greedy replies; ``topics`` (one per question) are read by a model with ``model.num_topics``,
    ``recall`` (the questions' recalled pairs) by a model with ``model.recall_k``."""
    if not questions:
        return []
    model.eval()
    src = [tokenizer.encode(q)[:max_source_len] or [EOS_ID] for q in questions]
    topic = None if topics is None else torch.tensor(topics, dtype=torch.long, device=device)
    hyps = greedy(model, pad(src).to(device), torch.tensor([len(s) for s in src]).to(device),
                  DecodeOptions(), topic, None if recall is None else recall.to(device))
    return [(q, tokenizer.decode(h.tokens)) for q, h in zip(questions, hyps)]


def validation_chrf(model: Seq2Seq, tokenizer: Tokenizer, questions: list[str], answers: list[str],
                    max_source_len: int, device: torch.device, batch_size: int = 128,
                    topics: list[int] | None = None, recalls: Recalls | None = None) -> float:
    """chrF of greedy replies to the validation questions (the figure ``evaluate`` reports on test)."""
    replies = [r for i in range(0, len(questions), batch_size)
               for _, r in sample_replies(model, tokenizer, questions[i: i + batch_size], max_source_len, device,
                                          None if topics is None else topics[i: i + batch_size],
                                          None if recalls is None else recalls.batch(i, i + batch_size))]
    return sacrebleu.corpus_chrf(replies, [answers]).score


# A few fixed everyday messages answered after every validation, their attention kept in that epoch's
# metrics.jsonl row under PROBE_KEY: the demo's About tab shows the alignment forming over the epochs.
ATTENTION_PROBES = ("오늘 너무 피곤해", "헤어진 지 한 달 됐어", "좋아하는 사람이 생겼어")


def attention_probe(model: Seq2Seq, tokenizer: Tokenizer, cfg: Config, device: torch.device,
                    topic: TopicClassifier | None = None, recall: RecallIndex | None = None,
                    messages: tuple[str, ...] = ATTENTION_PROBES) -> list[dict[str, Any]] | None:
    """Greedy replies to ``messages`` with the attention behind them, JSON-ready, one entry per message:
    ``message``, ``source`` (the heatmap's columns: the message's pieces, then each recall slot's),
    ``reply`` (its pieces), ``attention`` (reply x source, 3 decimals); for a model that reads a topic the
    ``topic`` its classifier chose, for a recall model the column ``groups`` and the copy ``gate``.
    None for a model without attention. Through the demo's own reply path (:class:`ChatBot`, greedy
    decoding), so the pieces and columns are those the demo shows; deterministic, no random draw."""
    if model.attention is None:
        return None
    bot = ChatBot(Checkpoint(model, tokenizer, cfg, topic_classifier=topic, recall_index=recall), device)
    entries = []
    for message, r in zip(messages, bot.reply_batch(list(messages))):
        att = np.asarray(r.attention, dtype=np.float64)  # (len(reply), len(source))
        entry = {"message": message, "source": r.source_tokens, "reply": r.reply_tokens,
                 "attention": att.round(3).tolist()}
        if r.topic is not None:
            entry["topic"] = r.topic.label
        if r.groups:
            entry["groups"] = [dict(vars(g)) for g in r.groups]
            entry["gate"] = np.asarray(r.gate, dtype=np.float64).round(3).tolist()
        entries.append(entry)
    return entries


def resample_sources(pairs: EncodedPairs, tokenizer: Tokenizer, questions: list[str], alpha: float,
                     max_source_len: int, seed: int) -> EncodedPairs:
    """``pairs`` with every question re-segmented by subword sampling, deterministic in ``seed`` in every
    process (each DDP rank, and a run resumed with --resume, draw the same segmentations)."""
    rng = np.random.default_rng(seed)
    src = [encode_source(tokenizer, q, max_source_len, alpha, rng) or [EOS_ID] for q in questions]
    return replace(pairs, src=src)


def noisy_recalls(pairs: EncodedPairs, p: float, num_rows: int, seed: int) -> EncodedPairs:
    """``pairs`` with a share ``p`` of the questions reading random index rows instead of their recalls
    (scores kept: the model must learn that a high score can still recall the wrong pair, instead of
    copying its top recall whole); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    rows = [list(map(int, rng.integers(0, num_rows, len(r)))) if rng.random() < p else r
            for r in pairs.recall_rows]
    return replace(pairs, recall_rows=rows)


def drop_words(src: Tensor, p: float) -> Tensor:
    """Replace a share ``p`` of the real (non-pad) pieces of ``src`` by ``<unk>`` (global torch RNG)."""
    hit = (torch.rand(src.shape, device=src.device) < p) & (src != PAD_ID)
    return src.masked_fill(hit, UNK_ID)


BatchTransform = Callable[[Batch], Batch]


def batch_transforms(t_cfg: TrainConfig) -> list[BatchTransform]:
    """The per-batch regularisers of ``t_cfg``, applied in this order to every training batch on the
    device (each may draw from the global torch RNG, so the order is part of exact resume).

    ``train.subword_alpha`` is not one of them: it re-segments the questions once per epoch
    (:func:`resample_sources`).
    """
    transforms: list[BatchTransform] = []
    if t_cfg.word_dropout > 0:
        p = t_cfg.word_dropout
        transforms.append(lambda b: replace(b, src=drop_words(b.src, p)))
    return transforms


# ---------------------------------------------------------------- state for exact resume
@dataclass
class Progress:
    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of this epoch already done
    best_val: float = float("inf")  # selection score of the best epoch, lower is better (val loss or -chrF)
    best_epoch: int = -1
    best_loss: float = float("inf")  # validation loss of the best epoch
    best_chrf: float = -1.0  # validation chrF of the best epoch (train.select = chrf)
    bad_epochs: int = 0  # epochs in a row that improved neither the selection score nor the val loss
    min_loss: float = float("inf")  # lowest validation loss so far (any epoch)
    train_seconds: float = 0.0

    def record(self, val_loss: float, val_chrf: float | None, select: str) -> bool:
        """Book this epoch's validation figures; True if it is the new best (by ``select``).

        Early stopping (``bad_epochs``) waits while either figure improves: the chrF of greedy
        replies is noisy in the first epochs, and a lucky early peak must not stop a run whose
        loss is still falling (nor a flat loss stop a run whose replies still improve).
        """
        score = -float(val_chrf) if select == "chrf" else val_loss
        improved = score < self.best_val
        if improved:
            self.best_val, self.best_epoch = score, self.epoch + 1
            self.best_loss, self.best_chrf = val_loss, -1.0 if val_chrf is None else float(val_chrf)
        self.bad_epochs = 0 if improved or val_loss < self.min_loss else self.bad_epochs + 1
        self.min_loss = min(self.min_loss, val_loss)
        return improved


def _save_state(path: Path, optimizer, scheduler, progress: Progress) -> None:
    """Write the resume state to ``path`` (the caller puts it inside the atomic checkpoint save)."""
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": json.dumps(progress.__dict__),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(np.random.get_state()[1].tolist()),
        "python_rng": json.dumps(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, path)


def _read_state(dirpath: Path) -> dict[str, Any]:
    """``dirpath/train_state.pt``, checked against the manifest and loaded without unpickling.

    Raises :class:`TrainingError` naming the file (one line, no traceback at the CLI).
    """
    f = dirpath / TRAIN_STATE
    fix = (f"start again without --resume (this overwrites {dirpath.parent}), "
           f"or restore {dirpath} from a backup")
    try:
        entry = json.loads((dirpath / MANIFEST).read_text(encoding="utf-8")).get(TRAIN_STATE)
    except (OSError, ValueError, AttributeError):
        entry = None  # load_checkpoint reports a bad manifest itself
    if entry and sha256(f) != entry.get("sha256"):
        raise TrainingError(f"{f} does not match its SHA-256 in {dirpath / MANIFEST} (corrupt or modified); {fix}")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip errors: what matters is which file and what to do
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise TrainingError(f"{f} is not a readable training state ({type(e).__name__}: {reason}); {fix}") from None
    required = {"optimizer", "scheduler", "progress", "torch_rng", "numpy_rng", "python_rng"}
    if not isinstance(state, dict) or not required <= set(state):
        raise TrainingError(f"{f} is not a training state written by this program (missing keys); {fix}")
    return state


def _load_state(dirpath: Path, optimizer, scheduler, state: dict[str, Any] | None = None) -> Progress:
    """Restore optimiser, scheduler and RNGs from ``state`` (read from ``dirpath`` if not given)."""
    state = _read_state(dirpath) if state is None else state
    try:
        fused = optimizer.defaults.get("fused")
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a state saved by an unfused optimizer would switch fusing off
            group["fused"] = fused
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        np.random.set_state(("MT19937", np.array(json.loads(state["numpy_rng"]), dtype=np.uint32), 624, 0, 0.0))
        random.setstate((3, tuple(json.loads(state["python_rng"])), None))
        return Progress(**json.loads(state["progress"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainingError(f"{dirpath / TRAIN_STATE} does not fit this model and recipe ({type(e).__name__}: "
                            f"{str(e)[:160]}); start again without --resume, or restore it from a backup") from None


class _CtrlC:
    """Ctrl-C held until the training loop stands on a consistent state.

    Inside :meth:`deferred`, SIGINT only sets ``pending``; the loop calls :meth:`check` between
    batches and around validation, which raises KeyboardInterrupt there. So the signal never lands
    between an optimiser update (or an RNG draw for a batch) and the counters that record it: a
    state saved one update ahead would apply that batch twice on --resume.
    """

    def __init__(self) -> None:
        self.pending = False

    @contextmanager
    def deferred(self, log: Callable[[str], None]):
        """SIGINT sets ``pending`` (logged once) instead of raising. Only the main thread may set handlers;
        a process started with SIGINT ignored keeps ignoring it."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
            yield
            return

        def hold(signum, frame) -> None:
            if not self.pending:
                log("\nCtrl-C: stopping once this step (or validation) is done")
            self.pending = True

        previous = signal.signal(signal.SIGINT, hold)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def check(self) -> None:
        """Raise the KeyboardInterrupt a Ctrl-C asked for, here, at a boundary."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


@contextmanager
def _sigint_ignored():
    """Ignore Ctrl-C while the interrupt handler saves (a second Ctrl-C must not cut the save short).

    Saves are atomic anyway; this also spares the user a lost step. Only the main thread may set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- the run
def train(cfg: Config, *, resume: bool = False, command: str | None = None,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    """Train per ``cfg``; returns the best checkpoint's folder."""
    ddp = init_distributed(cfg.train.device)
    try:
        return _train(cfg, ddp, resume=resume, command=command, log=log if ddp.main else lambda s: None)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()


def _train(cfg: Config, ddp: Distributed, *, resume: bool, command: str | None,
           log: Callable[[str], None]) -> Path:
    run = _prepare(cfg, ddp, resume=resume, command=command, log=log)
    run.fit()
    return run.finish()


# ---------------------------------------------------------------- preparing a run
@dataclass
class _Start:
    """Where a run starts: a new model, or ``last_dir`` of an earlier run (``state``: its train_state.pt)."""
    cfg: Config
    model: Seq2Seq
    tokenizer: Tokenizer
    last_dir: Path  # last/, or last.old if a save was cut between its two renames
    state: dict[str, Any] | None = None


def _setup_process(t_cfg: TrainConfig, ddp: Distributed) -> tuple[torch.device, torch.dtype | None]:
    """Threads, seeds, device and autocast dtype of this process."""
    set_threads(t_cfg.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    seed_everything(t_cfg.seed)
    device = pick_device(t_cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if ddp.enabled and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    return device, autocast_dtype(t_cfg.amp, device)


def _resume_start(cfg: Config, last_dir: Path, device: torch.device, log: Callable[[str], None]) -> _Start:
    """The run saved in ``last_dir``: its recipe (with this run's length), weights, tokenizer and state."""
    last_dir = resolve(last_dir)  # last.old if a save was cut between its two renames
    if not (last_dir / TRAIN_STATE).exists():
        raise TrainingError(f"--resume: no resumable state in {last_dir} (train without --resume first)")
    state = _read_state(last_dir)  # fail fast, before the tokenizer and model are built
    saved_cfg, _ = read_config(last_dir)
    # What may change on resume: how long to go on (and so continue a run that early stopping ended).
    saved_cfg.train.max_steps, saved_cfg.train.epochs = cfg.train.max_steps, cfg.train.epochs
    saved_cfg.train.patience = cfg.train.patience
    ck = load_checkpoint(last_dir, device)
    log(f"resuming from {last_dir}")
    return _Start(saved_cfg, ck.model, ck.tokenizer, last_dir, state)


def _fresh_start(cfg: Config, corpus_pairs: pd.DataFrame, train_df: pd.DataFrame, ddp: Distributed,
                 device: torch.device, out: Path, log: Callable[[str], None]) -> _Start:
    """A tokenizer trained on the training split (by rank 0, sent to the others) and a new model."""
    t0 = time.time()
    if ddp.main:
        tokenizer = Tokenizer.train(list(train_df["Q"]) + list(train_df["A"]), cfg.tokenizer)
    if ddp.enabled:  # one tokenizer for every rank: rank 0 trains it, the others receive its bytes
        proto = [tokenizer.to_bytes() if ddp.main else None]
        dist.broadcast_object_list(proto, src=0)
        tokenizer = Tokenizer.from_bytes(proto[0], morphemes=cfg.tokenizer.morphemes)
    log(f"tokenizer: {tokenizer.vocab_size} pieces in {time.time() - t0:.1f} s")
    cfg.model.vocab_size = tokenizer.vocab_size
    if cfg.model.num_topics:
        cfg.model.num_topics = max(cfg.model.num_topics, int(corpus_pairs["label"].max()) + 1)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    if ddp.main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    return _Start(cfg, model, tokenizer, out / "last")


def _wrap_ddp(model: Seq2Seq, ddp: Distributed, device: torch.device, seed: int) -> torch.nn.Module:
    """``model`` in a DistributedDataParallel wrapper under torchrun, else ``model`` itself."""
    if not ddp.enabled:
        return model
    if not ddp.main:  # DDP broadcasts rank 0's weights; each rank draws its own dropout masks
        torch.manual_seed(seed + 1_000_003 * ddp.rank)
    # No buffers to broadcast: the model has parameters only.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def _prepare(cfg: Config, ddp: Distributed, *, resume: bool, command: str | None,
             log: Callable[[str], None]) -> _Run:
    """Everything before the first batch: corpus, tokenizer and model (new, or from last/ on resume),
    DDP wrapper, topic classifier, encoded splits, optimiser, scheduler and progress.

    The order matters: several of these steps seed or draw from the global RNGs, and
    :func:`_load_state` restores them last, so a resumed run goes on bit for bit.
    """
    out = Path(cfg.train.out_dir)
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
    device, amp = _setup_process(cfg.train, ddp)
    data_path = cfg.data.path or default_data_path()
    corpus = load_corpus(data_path, verbose=True)
    splits = split_corpus(corpus.pairs, cfg.data.val_fraction, cfg.data.test_fraction)
    log(f"corpus {data_path}: train {len(splits['train'])}, val {len(splits['val'])}, "
        f"test {len(splits['test'])} pairs")

    start = (_resume_start(cfg, out / "last", device, log) if resume
             else _fresh_start(cfg, corpus.pairs, splits["train"], ddp, device, out, log))
    cfg, t_cfg, model = start.cfg, start.cfg.train, start.model
    train_model = _wrap_ddp(model, ddp, device, t_cfg.seed)
    topic, topic_acc = None, None
    if cfg.model.num_topics and ddp.main:  # deterministic and ~2 s: fitted afresh on resume too
        topic, topic_acc = fit_on_splits(splits, cfg.model.num_topics)
        log(f"topic classifier: the corpus label of {topic_acc['val']:.1%} of validation questions "
            f"({topic_acc['train']:.1%} of training questions)")
    train_pairs, val_pairs = (encode_pairs(start.tokenizer, df["Q"], df["A"], df["label"], cfg.data.max_source_len,
                                           cfg.data.max_target_len) for df in (splits["train"], splits["val"]))
    index = slots = None
    if cfg.model.recall_k:
        index, slots, train_pairs, val_pairs = _recall_for(cfg.model.recall_k, start.tokenizer, splits,
                                                           train_pairs, val_pairs, log)
    n_params = count_parameters(model)
    log(f"model: {n_params:,} parameters, attention={cfg.model.attention}, device={device}, "
        f"autocast={amp}, threads={torch.get_num_threads()}"
        + (f", {ddp.world_size} processes (DDP)" if ddp.enabled else ""))

    batches_per_epoch = len(batch_order(train_pairs, t_cfg.batch_size, t_cfg.seed, 0,
                                        rank=ddp.rank, world_size=ddp.world_size))
    total_steps = t_cfg.epochs * batches_per_epoch  # max_steps only stops early: same schedule either way
    optimizer = make_optimizer(model, t_cfg.lr, t_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t_cfg.warmup_steps, total_steps, t_cfg.min_lr_ratio))
    progress = Progress()
    if start.state is not None:
        progress = _load_state(start.last_dir, optimizer, scheduler, start.state)
        if ddp.enabled and not ddp.main:  # train_state.pt holds rank 0's RNG only
            torch.manual_seed(t_cfg.seed + 1_000_003 * ddp.rank + progress.step)
    return _Run(cfg=cfg, ddp=ddp, log=log, command=command, out=out, last_dir=start.last_dir, device=device,
                amp=amp, scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                tokenizer=start.tokenizer, model=model, train_model=train_model, topic=topic,
                topic_acc=topic_acc, n_params=n_params, splits=splits, train_pairs=train_pairs,
                val_pairs=val_pairs, optimizer=optimizer, scheduler=scheduler, progress=progress,
                transforms=batch_transforms(t_cfg), recall_index=index, slots=slots)


def _recall_for(k: int, tokenizer: Tokenizer, splits: dict[str, pd.DataFrame], train_pairs: EncodedPairs,
                val_pairs: EncodedPairs, log: Callable[[str], None]
                ) -> tuple[RecallIndex, RecallSlots, EncodedPairs, EncodedPairs]:
    """The recall index over the training split (deterministic: rebuilt on resume too), each training
    question's top-``k`` leave-one-out recalls, each validation question's top ``k``."""
    t0 = time.time()
    train_df, val_df = splits["train"], splits["val"]
    index = RecallIndex(list(train_df["Q"]), list(train_df["A"]))
    train_pairs = with_recall(train_pairs, *index.search(list(train_df["Q"]), k, exclude_self=True))
    val_pairs = with_recall(val_pairs, *index.search(list(val_df["Q"]), k))
    log(f"recall: top {k} of {len(index)} training pairs for every question in {time.time() - t0:.1f} s")
    return index, RecallSlots(tokenizer, index.questions, index.answers), train_pairs, val_pairs


# ---------------------------------------------------------------- running it
@dataclass
class _EpochStats:
    """What :meth:`_Run.run_epoch` saw of one epoch (global: every rank's tokens)."""
    started: float  # time.time() before the first batch
    tokens: int = 0  # target tokens trained on
    loss_sum: float = 0.0  # token-weighted sum of the step losses
    done: bool = False  # the epoch's last batch is done (False: stopped at train.max_steps within it)
    stop: bool = False  # train.max_steps reached: validate, save and end the run

    def add(self, loss: float, tokens: int) -> None:
        self.tokens += tokens
        self.loss_sum += loss * tokens

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(1, self.tokens)

    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.time() - self.started)


@dataclass
class _Run:
    """One training run: what the batch loop, validation and the checkpoint saves share.

    ``model`` is the bare model (evaluation, checkpoints); ``train_model`` is what the optimiser
    steps go through (the DDP wrapper under torchrun, else ``model`` itself).
    """
    cfg: Config
    ddp: Distributed
    log: Callable[[str], None]
    command: str | None
    out: Path  # train.out_dir (as given now, also on resume)
    last_dir: Path  # the last/ this run started from (named when the loss blows up)
    device: torch.device
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler
    tokenizer: Tokenizer
    model: Seq2Seq
    train_model: torch.nn.Module
    topic: TopicClassifier | None  # fitted on rank 0 for a model with model.num_topics, saved beside it
    topic_acc: dict[str, float] | None
    n_params: int
    splits: dict[str, pd.DataFrame]
    train_pairs: EncodedPairs
    val_pairs: EncodedPairs
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    progress: Progress
    transforms: list[BatchTransform]  # per-batch regularisers, in order
    recall_index: RecallIndex | None = None  # recall models: the training pairs, saved with the checkpoint
    slots: RecallSlots | None = None  # ... each as the model reads it
    ctrl_c: _CtrlC = field(default_factory=_CtrlC)  # Ctrl-C, held until a batch boundary

    def __post_init__(self) -> None:
        train_df, val_df = self.splits["train"], self.splits["val"]
        self.train_questions = list(train_df["Q"])  # re-segmented each epoch with train.subword_alpha
        self.val_questions, self.val_answers = list(val_df["Q"]), list(val_df["A"])  # for validation_chrf
        self.val_topics = [int(x) for x in val_df["label"]] if self.cfg.model.num_topics else None  # the model reads them
        self.sample_questions = self.val_questions[: self.cfg.train.samples]  # replies logged per epoch
        self.val_recalls = None if self.slots is None else Recalls(
            self.slots, self.val_pairs.recall_rows, self.val_pairs.recall_scores)

    @property
    def best_dir(self) -> Path:
        return self.out / "best"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    # ------------------------------------------------------------ epochs
    def fit(self) -> None:
        """Epochs until train.epochs, train.max_steps or early stopping.

        Ctrl-C takes effect between batches, or before or after an epoch's validation, never inside
        a step (:class:`_CtrlC`); then last/ is saved (a second Ctrl-C is ignored until the save is
        done) and KeyboardInterrupt re-raised.
        """
        stop = False
        try:
            with self.ctrl_c.deferred(self.log):
                while self.progress.epoch < self.cfg.train.epochs and not stop:
                    stats = self.run_epoch()
                    stop = stats.stop
                    self.ctrl_c.check()
                    if not self.validate(stats):
                        break
                    self.ctrl_c.check()
                    self.model.train()
                self.ctrl_c.check()
        except KeyboardInterrupt:
            last = self.out / "last"
            self.log(f"\ninterrupted at step {self.progress.step}: saving {last} (Ctrl-C again is ignored until done)")
            with _sigint_ignored():
                self.save_last()
            self.log(f"saved {last}; continue with --resume")
            raise

    def epoch_pairs(self) -> EncodedPairs:
        """The training pairs of this epoch: questions re-segmented when train.subword_alpha > 0."""
        t = self.cfg.train
        pairs = self.train_pairs
        if t.subword_alpha > 0:  # same seed on every rank and on resume: the same segmentations
            pairs = resample_sources(pairs, self.tokenizer, self.train_questions, t.subword_alpha,
                                     self.cfg.data.max_source_len, t.seed * 100_003 + self.progress.epoch)
        if t.recall_noise > 0 and self.recall_index is not None:
            pairs = noisy_recalls(pairs, t.recall_noise, len(self.recall_index), t.seed * 100_019 + self.progress.epoch)
        return pairs

    def run_epoch(self) -> _EpochStats:
        """Train on the current epoch's batches from ``progress.batch`` on (this rank's shard)."""
        t, p = self.cfg.train, self.progress
        pairs = self.epoch_pairs()
        order = batch_order(pairs, t.batch_size, t.seed, p.epoch, rank=self.ddp.rank, world_size=self.ddp.world_size)
        self.model.train()
        bar = tqdm(total=len(order), initial=p.batch, desc=f"epoch {p.epoch + 1}/{t.epochs}",
                   dynamic_ncols=True, disable=None if self.ddp.main else True, file=sys.stderr)
        stats = _EpochStats(started=time.time())
        while p.batch < len(order):
            self.ctrl_c.check()  # the one place a Ctrl-C stops the batch loop: after the last step's counters
            t_step = time.time()
            loss_val, n_tok = self.step(self.batch(pairs, order[p.batch]))
            self.scheduler.step()
            p.step += 1
            p.batch += 1
            stats.add(loss_val, n_tok)
            p.train_seconds += time.time() - t_step
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{stats.tokens_per_s():,.0f}")
            if p.step % 50 == 0:
                self.write_metrics({"step": p.step, "epoch": p.epoch + 1, "train_loss": loss_val,
                                    "lr": self.scheduler.get_last_lr()[0]})
            if t.save_every and p.step % t.save_every == 0:
                self.save_last()
            if t.max_steps and p.step >= t.max_steps:
                stats.stop = True
                break
        bar.close()
        stats.done = p.batch >= len(order)
        return stats

    def batch(self, pairs: EncodedPairs, indices: list[int]) -> Batch:
        """Pairs ``indices`` as a batch on the device, through the per-batch regularisers."""
        b = collate(pairs, indices, self.slots)
        b = (b.pin_memory() if self.device.type == "cuda" else b).to(self.device, non_blocking=True)
        for transform in self.transforms:
            b = transform(b)
        return b

    def step(self, b: Batch) -> tuple[float, int]:
        """One optimiser step (:func:`train_step`); a non-finite loss ends the run without saving."""
        t = self.cfg.train
        try:
            return train_step(self.train_model, b, self.optimizer, self.scaler, amp=self.amp,
                              label_smoothing=t.label_smoothing, grad_clip=t.grad_clip,
                              teacher_forcing=t.teacher_forcing, copy_alignment=t.copy_alignment)
        except NonFiniteLoss as e:
            raise TrainingError(
                f"loss became {e.args[0]} at step {self.progress.step + 1} (epoch {self.progress.epoch + 1}); "
                f"stopped without saving: the last good checkpoint in {self.last_dir} is intact. "
                "Try a lower train.lr or train.amp=off.") from None

    # ------------------------------------------------------------ validation
    def validate(self, stats: _EpochStats) -> bool:
        """Validate after an epoch (or at train.max_steps), log, save best/ and last/.

        Returns False when early stopping ends the run.
        """
        t, p = self.cfg.train, self.progress
        row = self.validation_row(stats)
        improved = p.record(row["val_loss"], row.get("val_chrf"), t.select)
        if stats.done:
            p.epoch += 1
            p.batch = 0
        self.write_metrics(row)
        if improved:
            self.save_best()
        self.save_last()
        if p.bad_epochs >= t.patience:
            self.log(f"early stopping: no validation improvement for {t.patience} epochs")
            return False
        return True

    def validation_row(self, stats: _EpochStats) -> dict[str, Any]:
        """The epoch's metrics row (validation loss, chrF under train.select = chrf, sample replies), logged."""
        t, p, max_src = self.cfg.train, self.progress, self.cfg.data.max_source_len
        val_loss = corpus_cross_entropy(self.model, self.val_pairs, self.device, t.batch_size * 2, self.amp,
                                        self.slots)
        row = {"epoch": p.epoch + 1, "step": p.step, "train_loss": stats.train_loss,
               "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
               "tokens_per_s": stats.tokens_per_s(), "lr": self.scheduler.get_last_lr()[0],
               "elapsed_s": p.train_seconds}
        if t.select == "chrf":
            chrf = [validation_chrf(self.model, self.tokenizer, self.val_questions, self.val_answers, max_src,
                                    self.device, topics=self.val_topics, recalls=self.val_recalls)
                    if self.ddp.main else 0.0]
            if self.ddp.enabled:  # every rank must take the same early-stopping decision
                dist.broadcast_object_list(chrf, src=0)
            row["val_chrf"] = chrf[0]
        samples = sample_replies(self.model, self.tokenizer, self.sample_questions if self.ddp.main else [],
                                 max_src, self.device,
                                 self.val_topics[: len(self.sample_questions)] if self.val_topics else None,
                                 self.val_recalls.batch(0, len(self.sample_questions)) if self.val_recalls else None)
        row["samples"] = [{"q": q, "reply": r} for q, r in samples]
        if self.ddp.main and self.model.attention is not None:  # the demo's "attention forming over training"
            row[PROBE_KEY] = attention_probe(self.model, self.tokenizer, self.cfg, self.device, self.topic,
                                             self.recall_index)
        self.log(f"epoch {p.epoch + 1}: train {row['train_loss']:.3f}  val {val_loss:.3f} "
                 f"(ppl {row['val_ppl']:.1f})" + (f"  chrF {row['val_chrf']:.1f}" if "val_chrf" in row else "")
                 + f"  {row['tokens_per_s']:,.0f} tok/s")
        for q, r in samples:
            self.log(f"    Q: {q}\n    A: {r}")
        return row

    # ------------------------------------------------------------ output (rank 0 only)
    def meta(self) -> dict[str, Any]:
        """The run's summary written into every checkpoint's config.json."""
        t, p, ddp = self.cfg.train, self.progress, self.ddp
        return {"parameters": self.n_params, "steps": p.step, "epoch": p.epoch,
                "best_val_loss": p.best_loss, "best_epoch": p.best_epoch, "selected_by": t.select,
                **({"best_val_chrf": p.best_chrf} if t.select == "chrf" else {}),
                "train_seconds": p.train_seconds, "device": str(self.device),
                "autocast": str(self.amp), "command": self.command or "",
                **({"world_size": ddp.world_size} if ddp.enabled else {}),
                **({"topic_accuracy": self.topic_acc} if self.topic_acc else {})}

    def write_metrics(self, row: dict[str, Any]) -> None:
        if self.ddp.main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def save_last(self) -> None:
        """last/: weights and train_state.pt of this step."""
        # The resume state goes inside the atomic checkpoint save (and its manifest), so last/ always
        # holds weights and train_state.pt from the same step, whatever interrupts the save.
        if self.ddp.main:
            state_file = self.out / (TRAIN_STATE + ".tmp")
            _save_state(state_file, self.optimizer, self.scheduler, self.progress)
            save_checkpoint(self.out / "last", self.model, self.tokenizer, self.cfg, meta=self.meta(),
                            metrics_path=self.metrics_path, extra_files={TRAIN_STATE: state_file},
                            warn_size=False, topic=self.topic, recall=self.recall_index)
            state_file.unlink(missing_ok=True)

    def save_best(self) -> None:
        """best/: the current weights in fp16."""
        if self.ddp.main:
            save_checkpoint(self.best_dir, self.model, self.tokenizer, self.cfg, meta=self.meta(),
                            metrics_path=self.metrics_path, dtype=torch.float16, topic=self.topic,
                            recall=self.recall_index)

    # ------------------------------------------------------------ the end
    def finish(self) -> Path:
        """Check the DDP replicas agree, refresh best/ (rank 0), log it; returns best/."""
        ddp, p = self.ddp, self.progress
        if ddp.enabled:
            hashes: list[Any] = [None] * ddp.world_size
            dist.all_gather_object(hashes, parameter_hash(self.model))
            if len(set(hashes)) != 1:
                raise TrainingError(f"DDP replicas diverged: parameter hashes {hashes}")
            self.log(f"{ddp.world_size} replicas hold identical weights (sha256 {hashes[0][:16]}...)")
            if not ddp.main:
                dist.barrier()  # wait for rank 0's final writes before the group goes away
                return self.best_dir
        if not self.best_dir.exists():
            self.save_best()
        else:  # keep the best weights, refresh the metrics log beside them
            ck = load_checkpoint(self.best_dir)
            best_meta = {k: v for k, v in self.meta().items() if k.startswith("best_") or k == "selected_by"}
            save_checkpoint(self.best_dir, ck.model, ck.tokenizer, ck.config, meta={**ck.meta, **best_meta},
                            metrics_path=self.metrics_path, dtype=torch.float16, topic=self.topic,
                            recall=self.recall_index)
        self.log(f"best checkpoint: {self.best_dir} (val loss {p.best_loss:.4f}"
                 + (f", val chrF {p.best_chrf:.1f}" if self.cfg.train.select == "chrf" else "")
                 + f", epoch {p.best_epoch})")
        if ddp.enabled:
            dist.barrier()
        return self.best_dir
