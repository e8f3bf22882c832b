"""Where one reply of a recall model spends its time (issue 14: the recall model's reply cost).

    python benchmarks/recall_reply.py [--checkpoint checkpoints/recall] [--against checkpoints/default]
                                      [--threads 1] [--reps 40] [--strategy greedy|beam]

Loads both checkpoints as served (``ChatBot.from_checkpoint``: int8 on the CPU) and replies to the
bench's typical messages (``chatbot.bench.TYPICAL_MESSAGES``), taking turns: a plain reply of the
recall model, one of the ``--against`` model (the ratio issue 14 asks about: ≤ 2x), and one of the
recall model with ``time.perf_counter`` wrappers around the functions a reply passes through. The
split: the TF-IDF lookup (``RecallIndex.search``), the slots and heatmap columns (the rest of
``ChatBot.recall``), the encoder (message + K slots, keys), the decoder step up to the output layer,
the copy mixture (output layer included), the decoding loop around them (score rewriting, softmax,
top-k), ``_collect`` and ``_to_reply``. Each part's time is exclusive (its callees' removed), the
median per reply over the messages; the wrappers add a little, so the parts add up to a bit more
than the plain p50. The host is shared: rerun, and compare only figures of one run.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatbot import inference, model, recall, search  # noqa: E402
from chatbot.bench import TYPICAL_MESSAGES  # noqa: E402


class Split:
    """Exclusive perf_counter time per label, for functions and generators wrapped in place."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list[float]] = []  # per open region: [callees' time]
        self.undo: list[Callable[[], None]] = []

    def _region(self, label: str, fn: Callable[[], Any]) -> Any:
        self.stack.append([0.0])
        t = time.perf_counter()
        try:
            return fn()
        finally:
            inclusive = time.perf_counter() - t
            callees = self.stack.pop()[0]
            self.totals[label] += inclusive - callees
            if self.stack:
                self.stack[-1][0] += inclusive

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = owner.__dict__[name]
        fn = original.__func__ if isinstance(original, staticmethod) else original
        if inspect.isgeneratorfunction(getattr(fn, "__wrapped__", fn)):
            def wrapper(*args, **kwargs):
                it = fn(*args, **kwargs)
                while True:
                    try:
                        yield self._region(label, lambda: next(it))
                    except StopIteration:
                        return
        else:
            def wrapper(*args, **kwargs):
                return self._region(label, lambda: fn(*args, **kwargs))
        setattr(owner, name, staticmethod(wrapper) if isinstance(original, staticmethod) else wrapper)
        self.undo.append(lambda: setattr(owner, name, original))

    def unwrap(self) -> None:
        while self.undo:
            self.undo.pop()()


PARTS = [  # (owner, attribute, label), outermost first
    (inference.ChatBot, "reply_batch", "the rest (read, tensors, glue)"),
    (inference.ChatBot, "recall", "recall: slots + columns"),
    (recall.RecallIndex, "search", "recall: TF-IDF lookup"),
    (model.Seq2Seq, "encode", "encode message + slots"),
    (search, "decode_steps", "decode loop (rewrite, softmax, top-k)"),
    (search, "beam_search", "decode loop (rewrite, softmax, top-k)"),
    (model.Seq2Seq, "_step_features", "step: GRU + attention + combine"),
    (model.Seq2Seq, "_mixture", "step: output layer + copy mixture"),
    (search, "_collect", "_collect"),
    (inference.ChatBot, "_to_reply", "_to_reply (pieces, candidates)"),
]


def timed_reply(bot: inference.ChatBot, message: str, opts: dict[str, Any]) -> float:
    t = time.perf_counter()
    bot.reply(message, **opts)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/recall")
    ap.add_argument("--against", default="checkpoints/default", help="a model without recall ('' for none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--strategy", default="greedy", choices=["greedy", "beam"])
    ap.add_argument("--max-len", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bot = inference.ChatBot.from_checkpoint(args.checkpoint, device="cpu")
    pure = inference.ChatBot.from_checkpoint(args.against, device="cpu") if args.against else None
    opts = {"strategy": args.strategy, "max_len": args.max_len}
    opts.update({"beam_size": 5} if args.strategy == "beam" else {})
    for m in TYPICAL_MESSAGES:  # warm-up: every slot the messages recall is tokenised once
        bot.reply(m, **opts)
        if pure is not None:
            pure.reply(m, **opts)
    split, plain, against, per_part = Split(), [], [], defaultdict(list)
    for i in range(args.reps):
        msg = TYPICAL_MESSAGES[i % len(TYPICAL_MESSAGES)]
        plain.append(timed_reply(bot, msg, opts))
        if pure is not None:
            against.append(timed_reply(pure, msg, opts))
        for owner, name, label in PARTS:
            split.wrap(owner, name, label)
        split.totals.clear()
        bot.reply(msg, **opts)
        split.unwrap()
        for _, _, label in PARTS:
            per_part[label].append(split.totals.get(label, 0.0))
    parts = {label: 1000 * statistics.median(v) for label, v in per_part.items()}
    total, p50 = sum(parts.values()), 1000 * statistics.median(plain)
    print(f"{args.checkpoint}, {args.strategy}, {args.threads} thread(s), {args.reps} replies: reply p50 {p50:.2f} ms"
          + (f"; {args.against} {1000 * statistics.median(against):.2f} ms, ratio "
             f"{statistics.median(plain) / statistics.median(against):.2f}x" if against else ""))
    for label, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {label:40s} {ms:7.3f} ms  {100 * ms / total:5.1f} %")
    print(f"  {'sum of parts (wrapped)':40s} {total:7.3f} ms")

if __name__ == "__main__":
    main()
