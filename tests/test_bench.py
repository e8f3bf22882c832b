"""The benchmark runs end to end in its smallest form and reports every figure (no timing assertions)."""
from __future__ import annotations

import json

from chatbot.bench import synthetic_pairs, training_flops
from chatbot.batching import collate
from chatbot.cli import main
from chatbot.config import ModelConfig

KEYS = ["train_speedup_vs_naive", "mfu", "reply_ms_p50_greedy", "reply_ms_p50_beam5", "reply_ms_p95_greedy",
        "reply_ms_p95_beam5", "replies_per_s_batched", "train_tokens_per_s", "naive_train_tokens_per_s",
        "peak_gflops", "app_start_to_first_reply_s", "app_peak_rss_mb"]


def test_bench_smoke_prints_a_table_and_a_json_last_line(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--threads", "1", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert "speed-up vs naive" in "\n".join(lines[:-1])
    for key in KEYS:
        assert result[key] > 0 and result[key] == result[key], key  # positive, not NaN
    assert json.loads(out.read_text()) == result
    assert "reply_ms_p50_greedy_recall" not in result  # no recall model asked for, none timed


def test_bench_times_a_recall_model_beside_the_pure_one(tiny_corpus_csv, tmp_path):
    from chatbot.bench import run_bench, table
    from conftest import train_tiny

    recall = train_tiny(tiny_corpus_csv, tmp_path / "recall", **{"model.recall_k": "2", "train.epochs": "1"})
    result = run_bench("smoke", threads=1, log=lambda s: None, recall_checkpoint=recall)
    assert result["reply_ms_p50_greedy_recall"] > 0 and result["reply_ms_p50_beam5_recall"] > 0
    assert result["recall_reply_p50_ratio"] == result["reply_ms_p50_greedy_recall"] / result["reply_ms_p50_greedy"]
    assert "recall model greedy p50" in table(result)


def test_synthetic_lengths_and_flop_count():
    pairs = synthetic_pairs(2000, 8000, seed=0)
    assert 6 < sum(map(len, pairs.src)) / len(pairs) < 10 and 8 < sum(map(len, pairs.tgt)) / len(pairs) < 12
    assert all(t[-1] == 3 and min(t[:-1] or [4]) >= 4 for t in pairs.tgt)
    b = collate(pairs, list(range(4)))
    cfg = ModelConfig(vocab_size=8000)
    flops = training_flops(cfg, b)
    # the output layer alone: 3 x 2·E·V per target token
    assert flops > 3 * 2 * 256 * 8000 * b.num_target_tokens
    assert training_flops(ModelConfig(vocab_size=16000), b) > flops
