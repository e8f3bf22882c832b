"""Benchmark: ``python -m chatbot bench [--quick] [--json PATH] [--checkpoint DIR] [--threads N]``.

Everything is measured in one run, on the same data and model size, so the figures are
ratios that survive a noisy or shared machine:

* training throughput (target tokens/s, forward + backward + AdamW step) of
  :func:`chatbot.train.train_step` on length-bucketed batches, and of the naive tutorial
  reference (``chatbot/naive_seq2seq.py``) on the same batches -> ``train_speedup_vs_naive``;
* model FLOP utilisation: analytic matmul FLOPs of our step (real tokens only, backward = 2x
  forward) per second ÷ this machine's matmul FLOP/s for the compute dtype, measured here;
* reply latency p50 / p95 for greedy and beam 5 at batch size 1, and batched replies/s;
* the app: a fresh process's time from start to first reply, and its peak RSS.

Data: synthetic token ids with ChatbotData-like lengths (question ~8 pieces, answer ~10 with
</s>), so no corpus is needed. Model: ``--checkpoint`` (default: the shipped
``checkpoints/default`` if present), else a freshly initialised model of the
``configs/default.yaml`` size with a tokenizer trained on a generated corpus. The last line
printed is one JSON object.
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .batching import Batch, EncodedPairs, batch_order, collate
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ModelConfig, TokenizerConfig
from .inference import default_checkpoint
from .model import build_model, count_parameters
from .search import DecodeOptions
from .text import Tokenizer
from .train import autocast_dtype, keep_freed_memory, make_optimizer, pick_device, set_threads, train_step

IMPORT_PATH = str(Path(__file__).resolve().parent.parent)  # where this package is imported from (for the app probe)
TYPICAL_MESSAGES = ["안녕", "오늘 너무 힘들었어", "점심 뭐 먹지", "헤어진 지 한 달 됐어", "좋아하는 사람이 생겼어",
                    "주말에 뭐 하지", "잠이 안 와", "시험 망쳤어", "여행 가고 싶다", "고백할까"]


@dataclass
class Plan:
    """How much of each measurement to do."""

    train_steps: int  # timed steps of our training step (all rounds together)
    naive_steps: int  # timed steps of the naive reference (all rounds together)
    rounds: int  # ours and naive take turns this many times, so a slow spell of a shared host hits both
    reply_reps: int  # replies timed per strategy
    batched: int  # messages per batched call
    pairs: int  # synthetic training pairs
    peak_reps: int  # repetitions of the peak-matmul probe


PLANS = {
    "full": Plan(train_steps=60, naive_steps=12, rounds=6, reply_reps=60, batched=64, pairs=4096, peak_reps=10),
    "quick": Plan(train_steps=24, naive_steps=6, rounds=3, reply_reps=20, batched=32, pairs=1024, peak_reps=4),
    "smoke": Plan(train_steps=2, naive_steps=1, rounds=1, reply_reps=2, batched=4, pairs=64, peak_reps=1),
}


# ---------------------------------------------------------------- data and model
def synthetic_pairs(n: int, vocab_size: int, seed: int = 0, max_len: int = 48) -> EncodedPairs:
    """``n`` pairs of random ids with ChatbotData-like lengths: question ~8, answer ~10 (</s> included)."""
    rng = np.random.default_rng(seed)
    src_len = np.clip(1 + rng.poisson(7, n), 1, max_len)
    tgt_len = np.clip(2 + rng.poisson(8, n), 2, max_len)
    src = [rng.integers(4, vocab_size, k).tolist() for k in src_len]
    tgt = [rng.integers(4, vocab_size, k - 1).tolist() + [3] for k in tgt_len]
    return EncodedPairs(src, tgt, [0] * n)


def generated_corpus(lines: int = 30000, syllables: int = 600, words: int = 40000, seed: int = 0) -> list[str]:
    """Korean-looking text (Zipf-distributed words of 2-4 random syllables), rich enough for 8000 pieces."""
    rng = np.random.default_rng(seed)
    chars = np.array([chr(0xAC00 + int(i)) for i in rng.choice(11172, syllables, replace=False)])
    p = 1 / np.arange(1, syllables + 1) ** 1.1
    word_syl = rng.choice(syllables, (words, 4), p=p / p.sum())
    word_len = rng.integers(2, 5, words)
    vocab = ["".join(chars[word_syl[i, : word_len[i]]]) for i in range(words)]
    wp = 1 / np.arange(1, words + 1)
    line_words = rng.choice(words, (lines, 7), p=wp / wp.sum())
    line_len = rng.integers(2, 8, lines)
    return [" ".join(vocab[j] for j in line_words[i, : line_len[i]]) for i in range(lines)]


def fresh_checkpoint(cfg: Config, folder: Path, small: bool = False) -> Path:
    """A freshly initialised model of ``cfg.model``'s size + a tokenizer on a generated corpus, saved
    like the shipped checkpoint (fp16 weights)."""
    corpus = generated_corpus(2000, 60, 2000) if small else generated_corpus()
    tokenizer = Tokenizer.train(corpus, cfg.tokenizer, num_threads=1)
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return save_checkpoint(folder, model, tokenizer, cfg, meta={"note": "untrained (benchmark)"},
                           dtype=torch.float16)


# ---------------------------------------------------------------- FLOPs and peak
def training_flops(cfg: ModelConfig, b: Batch) -> float:
    """Matmul FLOPs of one training step on ``b``, real (non-pad) tokens only: 3x the forward pass."""
    E, H, V = cfg.emb_dim, cfg.hidden_dim, cfg.vocab_size
    gates = 3 if cfg.rnn == "gru" else 4
    src_len = b.src_len.double()
    tgt_len = (b.tgt_out != 0).sum(1).double()
    src_tok, tgt_tok, B = float(src_len.sum()), float(tgt_len.sum()), b.src.size(0)

    def rnn(layers: int, first_in: int, hid: int, dirs: int) -> float:
        ins = [first_in] + [hid * dirs] * (layers - 1)
        return sum(dirs * gates * hid * (i + hid) * 2 for i in ins)

    fwd = src_tok * rnn(cfg.enc_layers, E, H // 2, 2)
    fwd += B * H * cfg.dec_layers * H * 2  # bridge
    dec_in = E + H if cfg.attention == "additive" else E
    fwd += tgt_tok * rnn(cfg.dec_layers, dec_in, H, 1)
    if cfg.attention != "none":
        if cfg.attention in ("general", "additive"):
            fwd += src_tok * H * H * 2  # keys, once per source
        if cfg.attention == "additive":
            fwd += tgt_tok * H * H * 2 + float((tgt_len * src_len).sum()) * H * 2
        fwd += float((tgt_len * src_len).sum()) * H * 2 * 2  # scores + context
        fwd += tgt_tok * 2 * H * E * 2  # combine
    else:
        fwd += tgt_tok * H * E * 2
    fwd += tgt_tok * E * V * 2  # output layer
    return 3.0 * fwd


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, reps: int, n: int = 1024) -> float:
    """Best achieved FLOP/s of an (n x n) @ (n x n) matmul in ``dtype`` (the machine's ceiling here)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(max(1, reps)):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- training
def _timed(fn: Callable[[], Any], reps: int, device: torch.device, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def bench_training(cfg: Config, plan: Plan, device: torch.device) -> dict[str, Any]:
    """Our training step and the naive reference on the same batches, in ``plan.rounds`` alternating
    turns (step i of either one trains on batch i), so both see the same data and the same host."""
    from .naive_seq2seq import NaiveSeq2Seq, naive_train_step

    m_cfg = cfg.model
    pairs = synthetic_pairs(plan.pairs, m_cfg.vocab_size, max_len=cfg.data.max_target_len)
    order = batch_order(pairs, cfg.train.batch_size, seed=0, epoch=0)
    batches = [collate(pairs, idx) for idx in order if len(idx) == cfg.train.batch_size]
    dev_batches = [b.to(device) for b in batches]
    amp = autocast_dtype(cfg.train.amp, device)

    torch.manual_seed(0)
    model = build_model(m_cfg).to(device).train()
    optimizer = make_optimizer(model, 1e-4, cfg.train.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    torch.manual_seed(0)  # the tutorial reference, fp32 as the tutorials run it
    naive = NaiveSeq2Seq(m_cfg.vocab_size, m_cfg.emb_dim, m_cfg.hidden_dim, m_cfg.dropout,
                         cfg.data.max_target_len).to(device)
    naive_opt = torch.optim.Adam(naive.parameters(), lr=1e-4)

    def ours(i: int) -> None:
        train_step(model, dev_batches[i % len(dev_batches)], optimizer, scaler, amp=amp,
                   label_smoothing=cfg.train.label_smoothing, grad_clip=cfg.train.grad_clip)

    def tutorial(i: int) -> None:
        b = dev_batches[i % len(dev_batches)]
        naive_train_step(naive, naive_opt, b.src, b.tgt_out)

    ours(0), ours(1), tutorial(0)  # warm-up
    stats = {"ours_s": 0.0, "ours_tokens": 0, "ours_flops": 0.0, "naive_s": 0.0, "naive_tokens": 0}
    steps = {"ours": 2, "naive": 1}
    for r in range(plan.rounds):
        for name, fn, total in (("ours", ours, plan.train_steps), ("naive", tutorial, plan.naive_steps)):
            n = total // plan.rounds + (1 if r < total % plan.rounds else 0)
            for _ in range(n):
                i, b = steps[name], batches[steps[name] % len(batches)]
                _sync(device)
                t = time.perf_counter()
                fn(i)
                _sync(device)
                stats[f"{name}_s"] += time.perf_counter() - t
                stats[f"{name}_tokens"] += b.num_target_tokens
                if name == "ours":
                    stats["ours_flops"] += training_flops(m_cfg, b)
                steps[name] += 1
    return {**stats, "batch_size": cfg.train.batch_size, "amp": str(amp), "rounds": plan.rounds}


# ---------------------------------------------------------------- replies and app
def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def bench_replies(ck: Checkpoint, plan: Plan, device: torch.device, max_len: int) -> dict[str, Any]:
    """Reply latency as served: fp32 first, then (on the CPU) with the int8 dynamic quantization
    that ``ChatBot.from_checkpoint`` applies by default there. Unsuffixed keys = as served."""
    from .inference import ChatBot, quantize_int8

    variants = [("_fp32", False)] + ([("", True)] if device.type == "cpu" else [])
    out: dict[str, Any] = {}
    for suffix, quantize in variants:
        bot = ChatBot(ck, device)
        if quantize:
            out["served_int8"] = quantize_int8(bot.model)  # in place: the last variant measured
        out.update({k + suffix: v for k, v in _reply_figures(bot, plan, device, max_len).items()})
    if device.type != "cpu":  # served unquantized on a GPU
        out.update({k[: -len("_fp32")]: v for k, v in list(out.items()) if k.endswith("_fp32")})
        out["served_int8"] = False
    return out


def _reply_figures(bot, plan: Plan, device: torch.device, max_len: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, opts in (("greedy", {"strategy": "greedy"}), ("beam5", {"strategy": "beam", "beam_size": 5})):
        opts = {**opts, "max_len": max_len}
        bot.reply(TYPICAL_MESSAGES[0], **opts)  # warm-up
        times, lengths = [], []
        for i in range(plan.reply_reps):
            msg = TYPICAL_MESSAGES[i % len(TYPICAL_MESSAGES)]
            _sync(device)
            t = time.perf_counter()
            r = bot.reply(msg, **opts)
            _sync(device)
            times.append(time.perf_counter() - t)
            lengths.append(len(r.reply_tokens))
        out[f"reply_ms_p50_{name}"] = 1000 * _percentile(times, 50)
        out[f"reply_ms_p95_{name}"] = 1000 * _percentile(times, 95)
        out[f"reply_len_mean_{name}"] = float(np.mean(lengths))
    msgs = [TYPICAL_MESSAGES[i % len(TYPICAL_MESSAGES)] for i in range(plan.batched)]
    bot.reply_batch(msgs, max_len=max_len)
    reps = max(1, plan.reply_reps // 10)
    t = _timed(lambda: bot.reply_batch(msgs, max_len=max_len), reps, device, warmup=0)
    out["replies_per_s_batched"] = plan.batched * reps / sum(t)
    out["batched_size"] = plan.batched
    return out


_APP_PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[2]))
from chatbot.inference import ChatBot
t1 = time.perf_counter()
bot = ChatBot.from_checkpoint(sys.argv[1], device=sys.argv[3])
t2 = time.perf_counter()
bot.reply("오늘 너무 힘들었어", max_len=int(sys.argv[4]))
t3 = time.perf_counter()
try:  # VmHWM is this process's own peak (ru_maxrss can carry the parent's over fork + exec)
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    rss_mb = int(hwm.split()[1]) / 1024
except (OSError, IndexError):
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_reply_s": t3 - t2, "rss_mb": rss_mb}))
"""


def bench_app(path: Path, device: torch.device, max_len: int) -> dict[str, Any]:
    """A fresh process: start -> imports -> load checkpoint -> first reply; its peak RSS."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([IMPORT_PATH, os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _APP_PROBE, str(path), str(torch.get_num_threads()),
                           str(device), str(max_len)], capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"app probe failed: {proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"app_start_to_first_reply_s": wall, "app_load_checkpoint_s": r["load_s"],
            "app_first_reply_ms": 1000 * r["first_reply_s"], "app_import_s": r["import_s"],
            "app_peak_rss_mb": r["rss_mb"]}


# ---------------------------------------------------------------- the run
def bench_config(mode: str) -> Config:
    """The shipped recipe (``Config()``); for ``smoke``, tiny sizes that run in seconds."""
    cfg = Config()
    if mode == "smoke":
        cfg.data.max_source_len = cfg.data.max_target_len = 24
        cfg.model = ModelConfig(emb_dim=32, hidden_dim=64, dropout=0.1)
        cfg.train.batch_size, cfg.train.amp = 8, "off"
        cfg.tokenizer = TokenizerConfig(vocab_size=300)
    return cfg


def bench_recall(path: Path, plan: Plan, device: torch.device, max_len: int) -> dict[str, Any]:
    """A recall model's reply latency as served (its TF-IDF lookup included), greedy and beam 5."""
    from .inference import ChatBot

    figures = _reply_figures(ChatBot.from_checkpoint(path, device=device), plan, device, max_len)
    return {f"{k}_recall": v for k, v in figures.items() if k.startswith(("reply_ms", "reply_len"))}


def run_bench(mode: str = "full", checkpoint: str | Path | None = None, threads: int = 0,
              device_name: str = "auto", log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
              recall_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Every figure of one benchmark run. ``recall_checkpoint`` (default: checkpoints/recall where it
    exists, but for ``smoke``) adds a recall model's reply latency, as a ratio to the pure model's."""
    plan = PLANS[mode]
    set_threads(threads)
    device = pick_device(device_name)
    if device.type == "cpu":
        keep_freed_memory()  # as training does; both the naive reference and ours run under it
    cfg = bench_config(mode)
    default_ck = default_checkpoint()
    path = Path(checkpoint) if checkpoint else (default_ck if default_ck.exists() and mode != "smoke" else None)
    tmp = tempfile.TemporaryDirectory(prefix="chatbot-bench-")
    if path is None:
        log("no checkpoint: a freshly initialised model of the recipe's size, tokenizer on a generated corpus")
        path = fresh_checkpoint(cfg, Path(tmp.name) / "fresh", small=mode == "smoke")
    ck = load_checkpoint(path, device)
    cfg.model = ck.config.model  # the checkpoint's size (and vocabulary) for every figure
    trained = "untrained" not in str(ck.meta.get("note", ""))
    # An untrained model almost never says </s>; cut its replies at a typical answer length (10 pieces).
    max_len = DecodeOptions().max_len if trained else 10
    log(f"model: {count_parameters(ck.model):,} parameters (emb {cfg.model.emb_dim}, hidden {cfg.model.hidden_dim}, "
        f"vocab {cfg.model.vocab_size}) from {path}; device {device}, threads {torch.get_num_threads()}, mode {mode}")

    t0 = time.time()
    amp = autocast_dtype(cfg.train.amp, device)
    compute_dtype = amp or torch.float32
    peak = matmul_peak_flops(compute_dtype, device, plan.peak_reps)
    peak_fp32 = peak if compute_dtype == torch.float32 else matmul_peak_flops(torch.float32, device, plan.peak_reps)
    peak_bf16 = peak if compute_dtype == torch.bfloat16 else matmul_peak_flops(
        torch.bfloat16, device, plan.peak_reps, n=256 if device.type == "cpu" else 1024)
    tr = bench_training(cfg, plan, device)
    rep = bench_replies(ck, plan, device, max_len)
    recall_path = Path(recall_checkpoint) if recall_checkpoint else default_checkpoint().with_name("recall")
    rec = bench_recall(recall_path, plan, device, max_len) if recall_checkpoint or (
        mode != "smoke" and recall_path.exists()) else {}
    if rec:
        rec.update(recall_checkpoint=str(recall_path),
                   recall_reply_p50_ratio=rec["reply_ms_p50_greedy_recall"] / rep["reply_ms_p50_greedy"])
    app = bench_app(path, device, max_len)
    ours_tps, naive_tps = tr["ours_tokens"] / tr["ours_s"], tr["naive_tokens"] / tr["naive_s"]
    achieved = tr["ours_flops"] / tr["ours_s"]
    result = {
        "train_speedup_vs_naive": ours_tps / naive_tps,
        "mfu": achieved / peak,
        "reply_ms_p50_greedy": rep["reply_ms_p50_greedy"],
        "reply_ms_p50_beam5": rep["reply_ms_p50_beam5"],
        "reply_ms_p95_greedy": rep["reply_ms_p95_greedy"],
        "reply_ms_p95_beam5": rep["reply_ms_p95_beam5"],
        **rec,
        "replies_per_s_batched": rep["replies_per_s_batched"],
        "served_int8": rep["served_int8"],
        **{k: v for k, v in rep.items() if k.endswith("_fp32")},
        "train_tokens_per_s": ours_tps,
        "naive_train_tokens_per_s": naive_tps,
        "achieved_gflops": achieved / 1e9,
        "peak_gflops": peak / 1e9,
        "peak_gflops_fp32": peak_fp32 / 1e9,
        "peak_gflops_bf16": peak_bf16 / 1e9,
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        **{k: v for k, v in app.items()},
        "bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reply_len_mean_greedy": rep["reply_len_mean_greedy"],
        "reply_len_mean_beam5": rep["reply_len_mean_beam5"],
        "reply_max_len": max_len,
        "batched_size": rep["batched_size"],
        "batch_size": tr["batch_size"],
        "train_rounds": tr["rounds"],
        "naive_max_len": cfg.data.max_target_len,
        "model": {"emb_dim": cfg.model.emb_dim, "hidden_dim": cfg.model.hidden_dim,
                  "vocab_size": cfg.model.vocab_size, "attention": cfg.model.attention, "rnn": cfg.model.rnn},
        "checkpoint": str(path) if trained else "fresh (untrained)",
        "device": str(device), "threads": torch.get_num_threads(), "mode": mode,
        "torch": torch.__version__, "seconds": time.time() - t0,
    }
    tmp.cleanup()
    return result


def table(r: dict[str, Any]) -> str:
    rows = [
        ("training, ours", f"{r['train_tokens_per_s']:,.0f} target tok/s"),
        ("training, naive tutorial", f"{r['naive_train_tokens_per_s']:,.0f} target tok/s "
                                     f"(loop to max_len {r['naive_max_len']})"),
        ("speed-up vs naive", f"{r['train_speedup_vs_naive']:.1f}x"),
        ("achieved / peak matmul", f"{r['achieved_gflops']:.1f} / {r['peak_gflops']:.1f} GFLOP/s "
                                   f"({r['compute_dtype']}; bf16 peak {r['peak_gflops_bf16']:.1f})"),
        ("MFU", f"{100 * r['mfu']:.1f}%"),
        ("reply greedy p50 / p95", f"{r['reply_ms_p50_greedy']:.1f} / {r['reply_ms_p95_greedy']:.1f} ms "
                                   f"({r['reply_len_mean_greedy']:.1f} pieces)"),
        ("reply beam 5 p50 / p95", f"{r['reply_ms_p50_beam5']:.1f} / {r['reply_ms_p95_beam5']:.1f} ms "
                                   f"({r['reply_len_mean_beam5']:.1f} pieces)"),
        *([("recall model greedy p50 / p95", f"{r['reply_ms_p50_greedy_recall']:.1f} / "
            f"{r['reply_ms_p95_greedy_recall']:.1f} ms ({r['reply_len_mean_greedy_recall']:.1f} pieces; "
            f"{r['recall_reply_p50_ratio']:.2f}x the pure model, lookup included)"),
           ("recall model beam 5 p50", f"{r['reply_ms_p50_beam5_recall']:.1f} ms")]
          if "reply_ms_p50_greedy_recall" in r else []),
        (f"batched greedy ({r['batched_size']})", f"{r['replies_per_s_batched']:,.0f} replies/s"),
        ("replies served as", "int8 dynamic quantization" if r["served_int8"] else "fp32"),
        ("fp32 greedy / beam 5 p50", f"{r['reply_ms_p50_greedy_fp32']:.1f} / {r['reply_ms_p50_beam5_fp32']:.1f} ms"),
        ("app start -> first reply", f"{r['app_start_to_first_reply_s']:.2f} s (import {r['app_import_s']:.2f}, "
                                     f"load {r['app_load_checkpoint_s']:.2f}, reply {r['app_first_reply_ms']:.0f} ms)"),
        ("app peak RSS", f"{r['app_peak_rss_mb']:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    head = (f"chatbot bench ({r['mode']}): {r['device']}, {r['threads']} thread(s), torch {r['torch']}, "
            f"model {r['model']}, {r['checkpoint']}")
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])
