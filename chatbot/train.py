"""Training: ``python -m chatbot train --config configs/<recipe>.yaml [--section.key value ...]``.

Writes to ``train.out_dir``::

    metrics.jsonl   one JSON object per logged step / epoch (the demo plots it)
    best/           checkpoint with the lowest validation loss (fp16 weights; what you serve)
    last/           latest checkpoint + train_state.pt (optimiser, scheduler, RNG, data position)

``--resume`` continues from ``last/`` exactly where it stopped (same data order and RNG).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import sacrebleu
import sentencepiece as spm
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .batching import Batch, EncodedPairs, batch_order, collate, encode_pairs, encode_source, pad
from .checkpoint import MANIFEST, load_checkpoint, read_config, resolve, save_checkpoint, sha256
from .config import EOS_ID, PAD_ID, UNK_ID, Config, default_data_path
from .data import load_corpus, split_corpus
from .losses import corpus_cross_entropy, linear_cross_entropy
from .model import Seq2Seq, build_model, count_parameters
from .search import DecodeOptions, greedy
from .text import Tokenizer
from .topic import fit_on_splits

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
               grad_clip: float = 1.0, teacher_forcing: float = 1.0) -> tuple[float, int]:
    """Forward, loss, backward, clip, step on one batch (its tensors already on the model's device).

    The output layer and the loss see only real (non-pad) target positions. The loss is the
    token sum divided by the *global* token count (all-reduced under DDP, times world size
    because DDP averages gradients), so N ranks x batch b == one process with batch N·b.
    Returns (mean loss per target token over the global batch, global target tokens).
    Raises NonFiniteLoss on every rank if any rank's loss is not finite (before any update).
    """
    positions = b.tgt_out != PAD_ID  # (B, T)
    device_type = b.src.device.type
    with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
        x, _ = model(b.src, b.src_len, b.tgt_in, b.label, teacher_forcing=teacher_forcing,
                     positions=positions, features=True)  # (N, E)
    out = (model.module if isinstance(model, DistributedDataParallel) else model).out
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


# ---------------------------------------------------------------- evaluation during training
def sample_replies(model: Seq2Seq, tokenizer: Tokenizer, questions: list[str], max_source_len: int,
                   device: torch.device, labels: list[int] | None = None) -> list[tuple[str, str]]:
    """Greedy replies; ``labels`` (one per question) are read by a model with a label embedding."""
    if not questions:
        return []
    model.eval()
    src = [tokenizer.encode(q)[:max_source_len] or [EOS_ID] for q in questions]
    label = None if labels is None else torch.tensor(labels, dtype=torch.long, device=device)
    hyps = greedy(model, pad(src).to(device), torch.tensor([len(s) for s in src]).to(device),
                  DecodeOptions(max_len=40), label)
    return [(q, tokenizer.decode(h.tokens)) for q, h in zip(questions, hyps)]


def validation_chrf(model: Seq2Seq, tokenizer: Tokenizer, questions: list[str], answers: list[str],
                    max_source_len: int, device: torch.device, batch_size: int = 128,
                    labels: list[int] | None = None) -> float:
    """chrF of greedy replies to the validation questions (the figure ``evaluate`` reports on test)."""
    replies = [r for i in range(0, len(questions), batch_size)
               for _, r in sample_replies(model, tokenizer, questions[i: i + batch_size], max_source_len, device,
                                          None if labels is None else labels[i: i + batch_size])]
    return sacrebleu.corpus_chrf(replies, [answers]).score


def resample_sources(pairs: EncodedPairs, tokenizer: Tokenizer, questions: list[str], alpha: float,
                     max_source_len: int, seed: int) -> EncodedPairs:
    """``pairs`` with every question re-segmented by sentencepiece sampling, deterministic in ``seed``."""
    spm.set_random_generator_seed(seed)
    src = [encode_source(tokenizer, q, max_source_len, alpha) or [EOS_ID] for q in questions]
    return EncodedPairs(src, pairs.tgt, pairs.labels)


def drop_topics(label: Tensor, p: float, unknown: int) -> Tensor:
    """Replace a share ``p`` of the topic labels by the "unknown topic" index (global torch RNG)."""
    return label.masked_fill(torch.rand(label.shape, device=label.device) < p, unknown)


def drop_words(src: Tensor, p: float, keep_first: bool = False) -> Tensor:
    """Replace a share ``p`` of the real (non-pad) pieces of ``src`` by ``<unk>`` (global torch RNG);
    ``keep_first``: never the first column (the decoder's ``<s>``)."""
    hit = (torch.rand(src.shape, device=src.device) < p) & (src != PAD_ID)
    if keep_first:
        hit[:, 0] = False
    return src.masked_fill(hit, UNK_ID)


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


# ---------------------------------------------------------------- the loop
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
    t_cfg = cfg.train
    out = Path(t_cfg.out_dir)
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
    set_threads(t_cfg.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    seed_everything(t_cfg.seed)
    device = pick_device(t_cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if ddp.enabled and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    amp = autocast_dtype(t_cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    data_path = cfg.data.path or default_data_path()
    corpus = load_corpus(data_path, verbose=True)
    splits = split_corpus(corpus.pairs, cfg.data.val_fraction, cfg.data.test_fraction)
    train_df, val_df = splits["train"], splits["val"]
    log(f"corpus {data_path}: train {len(train_df)}, val {len(val_df)}, test {len(splits['test'])} pairs")

    last_dir, best_dir, metrics_path = out / "last", out / "best", out / "metrics.jsonl"
    saved_state = None
    if resume:
        last_dir = resolve(last_dir)  # last.old if a save was cut between its two renames
        if not (last_dir / TRAIN_STATE).exists():
            raise TrainingError(f"--resume: no resumable state in {last_dir} (train without --resume first)")
        saved_state = _read_state(last_dir)  # fail fast, before the tokenizer and model are built
        saved_cfg, _ = read_config(last_dir)
        # What may change on resume: how long to go on (and so continue a run that early stopping ended).
        saved_cfg.train.max_steps, saved_cfg.train.epochs = t_cfg.max_steps, t_cfg.epochs
        saved_cfg.train.patience = t_cfg.patience
        cfg = saved_cfg
        t_cfg = cfg.train
        ck = load_checkpoint(last_dir, device)
        model, tokenizer = ck.model, ck.tokenizer
        log(f"resuming from {last_dir}")
    else:
        t0 = time.time()
        if ddp.main:
            tokenizer = Tokenizer.train(list(train_df["Q"]) + list(train_df["A"]), cfg.tokenizer)
        if ddp.enabled:  # one tokenizer for every rank: rank 0 trains it, the others receive its bytes
            proto = [tokenizer.to_bytes() if ddp.main else None]
            dist.broadcast_object_list(proto, src=0)
            tokenizer = Tokenizer.from_bytes(proto[0], morphemes=cfg.tokenizer.morphemes)
        log(f"tokenizer: {tokenizer.vocab_size} pieces in {time.time() - t0:.1f} s")
        cfg.model.vocab_size = tokenizer.vocab_size
        if cfg.model.num_labels:
            cfg.model.num_labels = max(cfg.model.num_labels, int(corpus.pairs["label"].max()) + 1)
            cfg.model.unknown_topic = cfg.model.unknown_topic or t_cfg.topic_dropout > 0
        elif t_cfg.topic_dropout > 0:
            raise TrainingError("train.topic_dropout needs a model that reads a topic (model.num_labels > 0)")
        seed_everything(t_cfg.seed)
        model = build_model(cfg.model, tokenizer).to(device)
        if ddp.main:
            metrics_path.unlink(missing_ok=True)
    if ddp.enabled:
        if not ddp.main:  # DDP broadcasts rank 0's weights; each rank draws its own dropout masks
            torch.manual_seed(t_cfg.seed + 1_000_003 * ddp.rank)
        # No buffer broadcasts: the only buffer is the character table (int16, which gloo and nccl cannot
        # send), built by every rank from the same tokenizer.
        train_model: torch.nn.Module = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    else:
        train_model = model

    topic, topic_acc = None, None
    if cfg.model.num_labels and ddp.main:  # deterministic and ~2 s: fitted afresh on resume too
        topic, topic_acc = fit_on_splits(splits, cfg.model.num_labels)
        log(f"topic classifier: the corpus label of {topic_acc['val']:.1%} of validation questions "
            f"({topic_acc['train']:.1%} of training questions)")

    enc = lambda df: encode_pairs(tokenizer, df["Q"], df["A"], df["label"],  # noqa: E731
                                  cfg.data.max_source_len, cfg.data.max_target_len)
    train_pairs, val_pairs = enc(train_df), enc(val_df)
    n_params = count_parameters(model)
    log(f"model: {n_params:,} parameters, attention={cfg.model.attention}, device={device}, "
        f"autocast={amp}, threads={torch.get_num_threads()}"
        + (f", {ddp.world_size} processes (DDP)" if ddp.enabled else ""))

    shard = {"rank": ddp.rank, "world_size": ddp.world_size}
    batches_per_epoch = len(batch_order(train_pairs, t_cfg.batch_size, t_cfg.seed, 0, **shard))
    total_steps = t_cfg.epochs * batches_per_epoch  # max_steps only stops early: same schedule either way
    optimizer = make_optimizer(model, t_cfg.lr, t_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t_cfg.warmup_steps, total_steps, t_cfg.min_lr_ratio))
    progress = _load_state(last_dir, optimizer, scheduler, saved_state) if resume else Progress()
    if resume and ddp.enabled and not ddp.main:  # train_state.pt holds rank 0's RNG only
        torch.manual_seed(t_cfg.seed + 1_000_003 * ddp.rank + progress.step)

    meta = lambda: {"parameters": n_params, "steps": progress.step, "epoch": progress.epoch,  # noqa: E731
                    "best_val_loss": progress.best_loss, "best_epoch": progress.best_epoch,
                    "selected_by": t_cfg.select,
                    **({"best_val_chrf": progress.best_chrf} if t_cfg.select == "chrf" else {}),
                    "train_seconds": progress.train_seconds, "device": str(device),
                    "autocast": str(amp), "command": command or "",
                    **({"world_size": ddp.world_size} if ddp.enabled else {}),
                    **({"topic_accuracy": topic_acc} if topic_acc else {})}

    def save_last() -> None:
        # The resume state goes inside the atomic checkpoint save (and its manifest), so last/ always
        # holds weights and train_state.pt from the same step, whatever interrupts the save.
        if ddp.main:
            state_file = out / (TRAIN_STATE + ".tmp")
            _save_state(state_file, optimizer, scheduler, progress)
            save_checkpoint(out / "last", model, tokenizer, cfg, meta=meta(), metrics_path=metrics_path,
                            extra_files={TRAIN_STATE: state_file}, warn_size=False, topic=topic)
            state_file.unlink(missing_ok=True)

    def write_metrics(row: dict[str, Any]) -> None:
        if ddp.main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    val_questions = list(val_df["Q"][: t_cfg.samples])
    train_questions = list(train_df["Q"])
    val_all = (list(val_df["Q"]), list(val_df["A"]))  # validation_chrf's questions and references
    val_labels = [int(x) for x in val_df["label"]] if cfg.model.num_labels else None  # the model reads them
    stop = False
    try:
        while progress.epoch < t_cfg.epochs and not stop:
            epoch_pairs = train_pairs
            if t_cfg.subword_alpha > 0:  # same seed on every rank and on resume: the same segmentations
                epoch_pairs = resample_sources(train_pairs, tokenizer, train_questions, t_cfg.subword_alpha,
                                               cfg.data.max_source_len, t_cfg.seed * 100_003 + progress.epoch)
            order = batch_order(epoch_pairs, t_cfg.batch_size, t_cfg.seed, progress.epoch, **shard)
            model.train()
            bar = tqdm(total=len(order), initial=progress.batch, desc=f"epoch {progress.epoch + 1}/{t_cfg.epochs}",
                       dynamic_ncols=True, disable=None if ddp.main else True, file=sys.stderr)
            t_epoch, tok_epoch, loss_sum, loss_n = time.time(), 0, 0.0, 0
            while progress.batch < len(order):
                t_step = time.time()
                b = collate(epoch_pairs, order[progress.batch])
                b = (b.pin_memory() if device.type == "cuda" else b).to(device, non_blocking=True)
                if t_cfg.word_dropout > 0:
                    b = replace(b, src=drop_words(b.src, t_cfg.word_dropout))
                if t_cfg.answer_word_dropout > 0:  # the decoder reads fewer of the reference's pieces (Bowman
                    # et al., 2016): it must lean on the question, not on the answer so far; targets unchanged
                    b = replace(b, tgt_in=drop_words(b.tgt_in, t_cfg.answer_word_dropout, keep_first=True))
                if t_cfg.topic_dropout > 0:  # then cfg.model.unknown_topic is set (checked at the start)
                    b = replace(b, label=drop_topics(b.label, t_cfg.topic_dropout, cfg.model.num_labels))
                try:
                    loss_val, n_tok = train_step(train_model, b, optimizer, scaler, amp=amp,
                                                 label_smoothing=t_cfg.label_smoothing, grad_clip=t_cfg.grad_clip,
                                                 teacher_forcing=t_cfg.teacher_forcing)
                except NonFiniteLoss as e:
                    raise TrainingError(
                        f"loss became {e.args[0]} at step {progress.step + 1} (epoch {progress.epoch + 1}); "
                        f"stopped without saving: the last good checkpoint in {last_dir} is intact. "
                        "Try a lower train.lr or train.amp=off.") from None
                scheduler.step()
                progress.step += 1
                progress.batch += 1
                tok_epoch += n_tok  # global: every rank's tokens
                loss_sum += loss_val * n_tok
                loss_n += n_tok
                progress.train_seconds += time.time() - t_step
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_epoch / max(1e-9, time.time() - t_epoch):,.0f}")
                if progress.step % 50 == 0:
                    write_metrics({"step": progress.step, "epoch": progress.epoch + 1, "train_loss": loss_val,
                                   "lr": scheduler.get_last_lr()[0]})
                if t_cfg.save_every and progress.step % t_cfg.save_every == 0:
                    save_last()
                if t_cfg.max_steps and progress.step >= t_cfg.max_steps:
                    stop = True
                    break
            bar.close()
            epoch_done = progress.batch >= len(order)
            val_loss = corpus_cross_entropy(model, val_pairs, device, t_cfg.batch_size * 2, amp)
            row = {"epoch": progress.epoch + 1, "step": progress.step, "train_loss": loss_sum / max(1, loss_n),
                   "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                   "tokens_per_s": tok_epoch / max(1e-9, time.time() - t_epoch),
                   "lr": scheduler.get_last_lr()[0], "elapsed_s": progress.train_seconds}
            if t_cfg.select == "chrf":
                chrf = [validation_chrf(model, tokenizer, *val_all, cfg.data.max_source_len, device,
                                        labels=val_labels) if ddp.main else 0.0]
                if ddp.enabled:  # every rank must take the same early-stopping decision
                    dist.broadcast_object_list(chrf, src=0)
                row["val_chrf"] = chrf[0]
            samples = sample_replies(model, tokenizer, val_questions if ddp.main else [],
                                     cfg.data.max_source_len, device,
                                     val_labels[: len(val_questions)] if val_labels else None)
            row["samples"] = [{"q": q, "reply": r} for q, r in samples]
            log(f"epoch {progress.epoch + 1}: train {row['train_loss']:.3f}  val {val_loss:.3f} "
                f"(ppl {row['val_ppl']:.1f})" + (f"  chrF {row['val_chrf']:.1f}" if "val_chrf" in row else "")
                + f"  {row['tokens_per_s']:,.0f} tok/s")
            for q, r in samples:
                log(f"    Q: {q}\n    A: {r}")
            improved = progress.record(val_loss, row.get("val_chrf"), t_cfg.select)
            if epoch_done:
                progress.epoch += 1
                progress.batch = 0
            write_metrics(row)
            if improved and ddp.main:
                save_checkpoint(best_dir, model, tokenizer, cfg, meta=meta(), metrics_path=metrics_path,
                                dtype=torch.float16, topic=topic)
            save_last()
            if progress.bad_epochs >= t_cfg.patience:
                log(f"early stopping: no validation improvement for {t_cfg.patience} epochs")
                break
            model.train()
    except KeyboardInterrupt:
        log(f"\ninterrupted at step {progress.step}: saving {out / 'last'} (Ctrl-C again is ignored until done)")
        with _sigint_ignored():
            save_last()
        log(f"saved {out / 'last'}; continue with --resume")
        raise
    if ddp.enabled:
        hashes: list[Any] = [None] * ddp.world_size
        dist.all_gather_object(hashes, parameter_hash(model))
        if len(set(hashes)) != 1:
            raise TrainingError(f"DDP replicas diverged: parameter hashes {hashes}")
        log(f"{ddp.world_size} replicas hold identical weights (sha256 {hashes[0][:16]}...)")
        if not ddp.main:
            dist.barrier()  # wait for rank 0's final writes before the group goes away
            return best_dir
    if not best_dir.exists():
        save_checkpoint(best_dir, model, tokenizer, cfg, meta=meta(), metrics_path=metrics_path, dtype=torch.float16,
                        topic=topic)
    else:  # keep the best weights, refresh the metrics log beside them
        ck = load_checkpoint(best_dir)
        save_checkpoint(best_dir, ck.model, ck.tokenizer, ck.config, meta={**ck.meta, **{
            k: v for k, v in meta().items() if k.startswith("best_") or k == "selected_by"}},
            metrics_path=metrics_path, dtype=torch.float16, topic=topic)
    log(f"best checkpoint: {best_dir} (val loss {progress.best_loss:.4f}"
        + (f", val chrF {progress.best_chrf:.1f}" if t_cfg.select == "chrf" else "")
        + f", epoch {progress.best_epoch})")
    if ddp.enabled:
        dist.barrier()
    return best_dir
