from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `from corpus import ...` in any import mode

from corpus import write_tiny_corpus  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus_csv(tmp_path_factory) -> Path:
    """A 200-row Korean Q,A,label CSV written once per test session."""
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "tiny.csv", n=200)


ROOT = Path(__file__).resolve().parent.parent


def train_tiny(corpus: Path, out: Path, **overrides: str) -> Path:
    """Train the tiny recipe on ``corpus`` into ``out``; returns the best checkpoint folder."""
    from chatbot.config import load_config
    from chatbot.train import train

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      {"data.path": str(corpus), "train.out_dir": str(out), **overrides})
    return train(cfg, log=lambda s: None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_corpus_csv, tmp_path_factory) -> Path:
    """A tiny Luong-attention checkpoint trained once per test session (seconds on the CPU)."""
    return train_tiny(tiny_corpus_csv, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def tiny_topic_checkpoint(tiny_corpus_csv, tmp_path_factory) -> Path:
    """A tiny model that reads the corpus label as a topic (model.num_topics 3), with the topic
    classifier that training fits and writes beside it."""
    return train_tiny(tiny_corpus_csv, tmp_path_factory.mktemp("topic_run"),
                      **{"model.num_topics": "3", "train.select": "chrf", "train.epochs": "3"})


@pytest.fixture(scope="session")
def tiny_bot(tiny_checkpoint):
    from chatbot.inference import ChatBot

    return ChatBot.from_checkpoint(tiny_checkpoint, device="cpu")
