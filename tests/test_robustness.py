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
