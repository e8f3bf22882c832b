"""Evaluation on a split: the model's figures beside a TF-IDF retrieval baseline's.

Metrics (every one computed for the model and for the baseline on the same questions):

* ``perplexity``: exp of the mean per-token cross-entropy of the reference answers (model only);
* ``bleu`` and ``chrf``: sacrebleu corpus scores, ``tokenize="char"`` for BLEU (Korean has no
  reliable word tokenisation); chrF on characters by definition;
* ``distinct_1`` / ``distinct_2``: distinct word unigrams / bigrams over all replies ÷ their count;
* ``unique_reply_rate``: distinct replies ÷ questions; ``exact_match``: replies equal to the reference.

The baseline answers each question with the answer of the nearest training question
(cosine similarity of character 1–3-gram TF-IDF vectors): what a user would pick instead.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import pandas as pd
import sacrebleu
import torch
import torch.nn.functional as F

from .batching import encode_pairs, with_recall
from .data import load_corpus, split_corpus
from .inference import ChatBot, Reply
from .losses import corpus_cross_entropy
from .recall import RecallIndex


class RetrievalBaseline:
    """Answer with the reply of the most similar training question: the top-1 of a :class:`RecallIndex`
    (cosine of character 1–3-gram tf-idf), the same search a recall model reads."""

    def __init__(self, questions: Sequence[str], answers: Sequence[str]):
        self.index = RecallIndex(questions, answers)

    def reply(self, questions: Sequence[str]) -> list[str]:
        return [recalled[0].answer for recalled in self.index.recall(questions, 1)]


def oracle_chrf(candidates: Sequence[Sequence[str]], references: Sequence[str],
                ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """The headroom of a model that reads recalled answers: for each k in ``ks``, the corpus chrF when
    each question's reply is the best (by sentence chrF against its reference; the earlier on a tie)
    of its first k ``candidates`` (one list of answer texts per question, best recalled first)."""
    chrf = sacrebleu.CHRF()
    refs = list(references)
    sentence = [[chrf.sentence_score(c, [r]).score for c in cs] for cs, r in zip(candidates, refs)]
    out = {}
    for k in ks:
        best = [cs[max(range(min(k, len(cs))), key=lambda i: (ss[i], -i))] if cs else ""
                for cs, ss in zip(candidates, sentence)]
        out[f"top{k}"] = round(sacrebleu.corpus_chrf(best, [refs]).score, 4)
    return out


@torch.inference_mode()
def encoder_keys(bot: ChatBot, questions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Each question as the model's encoder sees it, (N, 2H): its decoder's first state and the mean of
    its encoder outputs, each scaled to unit length (no topic read, for a topic model)."""
    keys = []
    for i in range(0, len(questions), batch_size):  # each question cut and padded as a reply would see it
        memory = bot.encode(list(questions[i: i + batch_size]))
        state = memory.state[0] if isinstance(memory.state, tuple) else memory.state
        mask = memory.mask.unsqueeze(-1).to(memory.values.dtype)
        mean = (memory.values * mask).sum(1) / mask.sum(1)
        keys.append(torch.cat([F.normalize(state[-1].float(), dim=-1), F.normalize(mean.float(), dim=-1)], -1))
    return torch.cat(keys).cpu()


def encoder_neighbour_answers(bot: ChatBot, train_questions: Sequence[str], train_answers: Sequence[str],
                              questions: Sequence[str]) -> list[str]:
    """A probe, never a reply: the training answer whose question lies nearest each question in the
    model's encoder space (cosine of :func:`encoder_keys`). Scored like retrieval, it tells whether a
    miss is the encoder's (it does not place a paraphrase near its training twin) or the decoder's
    (it does, and the reply still differs)."""
    train, test = encoder_keys(bot, train_questions), encoder_keys(bot, questions)
    best = [int(i) for j in range(0, len(test), 1024) for i in (test[j: j + 1024] @ train.T).argmax(1)]
    return [train_answers[i] for i in best]


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    hyps, refs = list(hypotheses), list(references)
    words = [h.split() for h in hyps]
    uni = [w for ws in words for w in ws]
    bi = [tuple(ws[i: i + 2]) for ws in words for i in range(len(ws) - 1)]
    return {
        "bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "distinct_1": len(set(uni)) / max(1, len(uni)),
        "distinct_2": len(set(bi)) / max(1, len(bi)),
        "unique_reply_rate": len(set(hyps)) / max(1, len(hyps)),
        "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)])) if hyps else 0.0,
    }


TOPIC_MODES = ("predicted", "corpus")
LENGTH_BUCKETS = ((1, 3), (4, 5), (6, 7), (8, 9), (10, 10_000))  # question length in source pieces


def chrf_by_length(lengths: Sequence[int], hypotheses: Sequence[str], references: Sequence[str],
                   buckets: Sequence[tuple[int, int]] = LENGTH_BUCKETS) -> list[dict[str, Any]]:
    """chrF of the replies to questions of each length bucket (the textbook case for attention)."""
    rows = []
    for lo, hi in buckets:
        idx = [i for i, n in enumerate(lengths) if lo <= n <= hi]
        label = f"{lo}-{hi}" if hi < 10_000 else f"{lo}+"
        chrf = sacrebleu.corpus_chrf([hypotheses[i] for i in idx], [[references[i] for i in idx]]).score if idx else None
        rows.append({"bucket": label, "pairs": len(idx), "chrf": None if chrf is None else round(chrf, 3)})
    return rows


def chrf_by_answer_seen(answers: Sequence[str], train_answers: set[str],
                        **replies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """chrF of each set of ``replies`` (name -> replies) where the reference is also a training answer and
    where it is new. Many answers recur across questions: a lookup can return the first kind verbatim,
    nobody can return the second; scoring them apart shows where chrF comes from."""
    out = {}
    for name, keep in (("answer_in_train", True), ("answer_new", False)):
        idx = [i for i, a in enumerate(answers) if (a in train_answers) == keep]
        refs = [[answers[i] for i in idx]]
        out[name] = {"pairs": len(idx), **{
            f"{who}_chrf": round(sacrebleu.corpus_chrf([hyps[i] for i in idx], refs).score, 3) if idx else None
            for who, hyps in replies.items()}}
    return out


def bot_replies(bot: ChatBot, questions: Sequence[str], topic_of: Sequence[int | None], batch_size: int = 64,
                **decoding: Any) -> list[Reply]:
    """``bot``'s reply to each question, batched (one at a time for beam search); ``topic_of``: the topic
    each question is answered under (None: the bot's own choice)."""
    replies: list[Reply] = [None] * len(questions)  # type: ignore[list-item]
    step = 1 if decoding.get("strategy") == "beam" else batch_size
    groups: dict[int | None, list[int]] = {}
    for i, topic in enumerate(topic_of):
        groups.setdefault(topic, []).append(i)
    for topic, idx in groups.items():
        for j in range(0, len(idx), step):
            chunk = idx[j: j + step]
            for i, r in zip(chunk, bot.reply_batch([questions[i] for i in chunk], topic=topic, **decoding)):
                replies[i] = r
    return replies


def recall_figures(replies: Sequence[Reply]) -> dict[str, float]:
    """How a recall model used its recalls: the mean copy gate over every generated piece (1 = all
    generated), and the share of replies that spell out, piece by piece, their first recalled answer
    or any of their recalled answers."""
    gates = np.concatenate([r.gate for r in replies if r.gate is not None and len(r.gate)] or [np.zeros(0)])
    recalled = [[g.answer for g in r.groups[1:]] for r in replies]
    return {"gate_mean": round(float(gates.mean()), 4) if gates.size else None,
            "reply_is_recall_1": round(float(np.mean([bool(a) and r.text == a[0] for r, a in zip(replies, recalled)])), 4),
            "reply_is_a_recall": round(float(np.mean([r.text in a for r, a in zip(replies, recalled)])), 4)}


def evaluate(bot: ChatBot, data_path: str, split: str = "test", limit: int = 0,
             batch_size: int = 64, topics: str = "predicted", probe: bool = False, **decoding: Any) -> dict[str, Any]:
    """Evaluate ``bot`` on ``split`` of the corpus at ``data_path`` (the split the bot was trained with).

    ``topics``, for a model that reads a topic: ``"predicted"`` by its topic classifier from each
    question, as the demo serves it, or ``"corpus"``: each question's own label (what a user who
    picks the right topic gets). A checkpoint without a classifier is evaluated with the corpus's.
    ``probe``: also score the encoder-neighbour probe (:func:`encoder_neighbour_answers`).
    """
    if topics not in TOPIC_MODES:
        raise ValueError(f"topics must be one of {TOPIC_MODES}, got {topics!r}")
    cfg = bot.config.data
    splits = split_corpus(load_corpus(data_path, verbose=False).pairs, cfg.val_fraction, cfg.test_fraction)
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}")
    df: pd.DataFrame = splits[split].iloc[: limit or None]
    questions, answers, labels = list(df["Q"]), list(df["A"]), list(df["label"])
    train_q, train_a = list(splits["train"]["Q"]), list(splits["train"]["A"])

    pairs = encode_pairs(bot.tokenizer, questions, answers, labels, cfg.max_source_len, cfg.max_target_len)
    if bot.recall_index is not None:  # a recall model reads each question's recalls, as when it replies
        pairs = with_recall(pairs, *bot.recall_index.search([bot.read(q).text for q in questions],
                                                            bot.config.model.recall_k))
    ce = corpus_cross_entropy(bot.model, pairs, bot.device, slots=bot.slots)
    # The topic read: the classifier's (None: ChatBot predicts per question) or each question's corpus label.
    topics_used = None if not bot.reads_topic else (
        "predicted" if topics == "predicted" and bot.topic_classifier is not None else "corpus")
    t0 = time.time()
    full = bot_replies(bot, questions, [int(x) for x in labels] if topics_used == "corpus" else [None] * len(df),
                       batch_size, **decoding)
    seconds, replies = time.time() - t0, [r.text for r in full]
    recalled = RecallIndex(train_q, train_a).recall(questions, 5)  # the lookup (top 1) and the oracle's top 5
    base_replies = [rs[0].answer for rs in recalled]
    lengths = [len(bot.read(q).ids) for q in questions]
    figures = lambda hyps: {k: round(v, 4) for k, v in text_metrics(hyps, answers).items()}  # noqa: E731
    return {
        "checkpoint": str(bot.path), "attention": bot.config.model.attention, "int8": bot.quantized,
        "reads_topic": bot.reads_topic, "topics": topics_used,
        **({"topic_accuracy": round(bot.topic_classifier.accuracy(questions, labels), 4)}
           if topics_used and bot.topic_classifier else {}),
        "data": str(data_path), "split": split, "pairs": len(questions),
        "decoding": decoding or {"strategy": "greedy"}, "decode_seconds": round(seconds, 2),
        "model": {"perplexity": round(math.exp(min(ce, 50)), 4), **figures(replies)},
        "retrieval_baseline": figures(base_replies),
        "references": {k: v for k, v in figures(answers).items() if k in ("distinct_1", "distinct_2", "unique_reply_rate")},
        # a probe, not a reply: the answer of the training question nearest in the encoder's space
        **({"encoder_neighbour": {k: v for k, v in figures(encoder_neighbour_answers(bot, train_q, train_a, questions))
                                  .items() if k in ("chrf", "exact_match")}} if probe else {}),
        "chrf_by_answer_seen": chrf_by_answer_seen(answers, set(train_a), model=replies, retrieval=base_replies),
        "chrf_by_source_length": {"model": chrf_by_length(lengths, replies, answers),
                                  "retrieval_baseline": chrf_by_length(lengths, base_replies, answers)},
        "examples": [{"q": q, "reference": a, "model": r, "retrieval": b}
                     for q, a, r, b in list(zip(questions, answers, replies, base_replies))[:10]],
        # headroom for a recall model: chrF if the best of each question's top-k recalled answers were chosen
        "recall_oracle_chrf": oracle_chrf([[x.answer for x in rs] for rs in recalled], answers),
        **({"recall": recall_figures(full)} if bot.recall_index is not None else {}),
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The model's figures beside the baseline's, as a Markdown table."""
    keys = ["perplexity", "bleu", "chrf", "distinct_1", "distinct_2", "unique_reply_rate", "exact_match"]
    lines = ["| metric | model | retrieval baseline | references |", "|---|---:|---:|---:|"]
    for k in keys:
        cell = lambda d: f"{d[k]:.3f}" if k in d else "–"  # noqa: E731
        lines.append(f"| {k} | {cell(result['model'])} | {cell(result['retrieval_baseline'])} | "
                     f"{cell(result['references'])} |")
    return "\n".join(lines)


def series_name(result: dict[str, Any]) -> str:
    """A checkpoint's name in the plot's legend: its folder and what sets it apart ("recall: recall + copy")."""
    kind = ("recall + copy" if result.get("recall") else "no attention" if result["attention"] == "none"
            else f"{result['attention']} attention")
    return f"{result['checkpoint'].rstrip('/').split('/')[-1]}: {kind}"


def plot_chrf_by_length(results: Sequence[dict[str, Any]], path: str) -> None:
    """Bar chart of chrF per question-length bucket, one bar group per evaluated model (+ retrieval)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    if any("Nanum" in f.name for f in font_manager.fontManager.ttflist):
        plt.rcParams["font.family"] = "NanumGothic"  # Hangul labels need a Korean font
    series = [(series_name(r), r["chrf_by_source_length"]["model"]) for r in results]
    series.append(("retrieval (TF-IDF)", results[0]["chrf_by_source_length"]["retrieval_baseline"]))
    buckets = [row["bucket"] for row in series[0][1]]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6, 4.6), dpi=120)  # narrow and tall: the About tab shows it on phones too
    for i, (name, rows) in enumerate(series):
        xs = [j + i * width for j in range(len(buckets))]
        ax.bar(xs, [row["chrf"] or 0 for row in rows], width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(buckets))])
    ax.set_xticklabels([f"{b}\n(n={row['pairs']})" for b, row in zip(buckets, series[0][1])], fontsize=11)
    ax.set_xlabel("질문 길이 (source pieces) / question length", fontsize=11)
    ax.set_ylabel("chrF", fontsize=11)
    ax.set_title("질문 길이별 chrF: attention vs. 고정 context vector")
    ax.legend(fontsize=10, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)  # under the bars
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
