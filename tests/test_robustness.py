"""Hostile files and arbitrary messages: nothing is unpickled, nothing raises, time stays bounded."""
from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatbot.checkpoint import CheckpointError, load_checkpoint
from chatbot.text import normalize
from conftest import ROOT


class Payload:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_every_torch_load_passes_weights_only_true():
    calls = []
    for path in (ROOT / "chatbot").rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text(encoding="utf-8")):
            calls.append((path.name, m.group(1)))
    assert calls, "expected the resume code to use torch.load"
    for name, args in calls:
        assert "weights_only=True" in args, f"{name}: torch.load({args})"


def test_pickled_weights_are_never_executed(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, bad)
    with open(bad / "model.safetensors", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert not marker.exists()


def test_pickled_training_state_is_never_executed(tiny_corpus_csv, tmp_path):
    from conftest import train_tiny
    run = tmp_path / "run"
    train_tiny(tiny_corpus_csv, run, **{"train.epochs": "1"})
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, run / "last" / "train_state.pt")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    p = subprocess.run([sys.executable, "-m", "chatbot", "train", "--config", "configs/tiny.yaml", "--data",
                        str(tiny_corpus_csv), "--out", str(run), "--resume"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert not marker.exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_reply_never_raises_on_arbitrary_unicode(tiny_bot, message):
    t0 = time.perf_counter()
    r = tiny_bot.reply(message, max_len=20)
    assert isinstance(r.text, str) and len(r.text) <= 20 * 16
    assert time.perf_counter() - t0 < 5.0
    if normalize(message):
        assert r.generated


@settings(max_examples=2000)
@given(st.text())
def test_normalize_is_idempotent_and_nfc_invariant(text):
    import unicodedata
    once = normalize(text)
    assert normalize(once) == once
    assert normalize(unicodedata.normalize("NFD", text)) == normalize(unicodedata.normalize("NFC", text))


def test_ten_thousand_characters_are_handled_in_bounded_time(tiny_bot):
    t0 = time.perf_counter()
    r = tiny_bot.reply("가나다라마바사 " * 1500)
    assert time.perf_counter() - t0 < 2.0
    assert r.truncated and len(r.source_tokens) <= tiny_bot.max_source_len


def many_characters_corpus(path, rows: int = 300, chars: int = 500):
    """A corpus using ``chars`` distinct Hangul syllables, more than the tiny recipe's 400 pieces."""
    import csv
    import random

    syllables = [chr(0xAC00 + 7 * i) for i in range(chars)]
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Q", "A", "label"])
        for i in range(rows):
            pick = syllables[(i * 5) % chars: (i * 5) % chars + 5] + rng.sample(syllables, 3)
            w.writerow(["".join(pick[:4]) + " " + "".join(pick[4:]), "".join(rng.sample(syllables, 6)), i % 3])
    return path


def test_the_tokenizer_grows_its_vocabulary_to_the_characters_it_must_cover(caplog):
    from chatbot.config import TokenizerConfig
    from chatbot.text import Tokenizer

    syllables = [chr(0xAC00 + 7 * i) for i in range(500)]
    texts = ["".join(syllables[i: i + 8]) + " " + "".join(syllables[i + 8: i + 12]) for i in range(0, 500, 4)]
    for model_type in ("unigram", "bpe"):
        with caplog.at_level("WARNING", logger="chatbot.text"):
            tok = Tokenizer.train(texts, TokenizerConfig(model_type=model_type, vocab_size=400))
        assert tok.vocab_size >= 504  # 500 characters and the four special pieces
        assert all(1 not in tok.encode(t) for t in texts)  # every character has a piece: no <unk>
        # 501: the syllables and sentencepiece's word-boundary mark "▁"
        assert "not the 400 requested: its 501 distinct characters" in caplog.text, caplog.text
        caplog.clear()


def test_the_tiny_recipe_trains_on_a_corpus_with_more_characters_than_its_vocabulary(tmp_path):
    from conftest import train_tiny
    from chatbot.checkpoint import load_checkpoint

    corpus = many_characters_corpus(tmp_path / "wide.csv")
    best = train_tiny(corpus, tmp_path / "run", **{"train.epochs": "1", "train.max_steps": "2"})
    ck = load_checkpoint(best)
    assert ck.tokenizer.vocab_size == ck.config.model.vocab_size > 400
