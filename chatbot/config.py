"""Typed configuration: one dataclass per concern, loaded from a YAML recipe.

A recipe (``configs/*.yaml``) has the sections ``data``, ``tokenizer``, ``model`` and
``train``; every key is optional and falls back to the defaults below. Command-line
overrides use dotted keys: ``--train.epochs 3 --model.attention additive``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Special token ids, fixed for every tokenizer and model.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")

ATTENTION_TYPES = ("none", "dot", "general", "additive")
SELECT_BY = ("loss", "chrf")
RNN_TYPES = ("gru", "lstm")

DEFAULT_DATA = "data/ChatbotData.csv"


def default_data_path() -> str:
    """The corpus path: ``$CHATBOT_DATA`` if set, else ``data/ChatbotData.csv``."""
    return os.environ.get("CHATBOT_DATA", DEFAULT_DATA)


@dataclass
class DataConfig:
    path: str = ""  # CSV with columns Q, A, label; empty = $CHATBOT_DATA or data/ChatbotData.csv
    val_fraction: float = 0.05  # share of unique questions held out for validation
    test_fraction: float = 0.05  # share of unique questions held out for testing
    max_source_len: int = 48  # tokens kept from a question (longer ones are cut)
    max_target_len: int = 48  # tokens kept from an answer, </s> included


@dataclass
class TokenizerConfig:
    model_type: str = "unigram"  # sentencepiece algorithm: unigram | bpe
    vocab_size: int = 8000  # pieces, the four special ones included
    morphemes: bool = False  # pre-segment with konlpy Okt morphemes (needs Java)
    character_coverage: float = 0.9999  # share of characters covered; the rest -> <unk>


@dataclass
class ModelConfig:
    vocab_size: int = 8000  # set from the trained tokenizer
    emb_dim: int = 256  # token embedding size (shared by encoder and decoder)
    hidden_dim: int = 512  # decoder state size; each encoder direction gets half
    enc_layers: int = 1  # encoder RNN layers
    dec_layers: int = 1  # decoder RNN layers
    rnn: str = "gru"  # gru | lstm
    attention: str = "general"  # none | dot | general (Luong) | additive (Bahdanau)
    dropout: float = 0.3  # dropout on embeddings and RNN outputs
    tie_embeddings: bool = True  # output layer shares the decoder embedding matrix
    num_topics: int = 0  # >0: the question's topic (the corpus label column) is one more encoder input vector
    recall_k: int = 0  # >0: the decoder also attends over (and may copy from) this many recalled training pairs

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"model.attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        if self.rnn not in RNN_TYPES:
            raise ValueError(f"model.rnn must be one of {RNN_TYPES}, got {self.rnn!r}")
        if self.recall_k < 0 or (self.recall_k and self.attention not in ("dot", "general")):
            raise ValueError("model.recall_k must be >= 0, and a model with recall needs Luong attention "
                             f"(dot or general), got recall_k={self.recall_k}, attention={self.attention!r}")
        if self.hidden_dim % 2:
            raise ValueError("model.hidden_dim must be even (the bidirectional encoder splits it)")


@dataclass
class TrainConfig:
    epochs: int = 50  # maximum number of passes over the training split
    batch_size: int = 64  # pairs per batch
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 200  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05  # floor of the cosine decay
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    grad_clip: float = 1.0  # max global gradient norm
    teacher_forcing: float = 1.0  # <1: scheduled sampling (uses the step loop)
    patience: int = 50  # early stopping: epochs improving neither val loss nor the selection metric (= epochs: off)
    seed: int = 42  # seeds data order, init and dropout
    threads: int = 0  # torch CPU threads; 0 = all cores
    amp: str = "auto"  # auto | bf16 | fp16 | off: autocast dtype (auto: bf16 where supported)
    device: str = "auto"  # auto | cpu | cuda
    out_dir: str = "runs/default"  # where checkpoints and logs go
    samples: int = 3  # sample replies printed after each epoch
    max_steps: int = 0  # >0: stop after this many optimiser steps (tests, benchmarks)
    save_every: int = 0  # >0: also save the resumable state every N steps
    subword_alpha: float = 0.1  # >0: questions re-segmented every epoch by sentencepiece sampling (this smoothing)
    word_dropout: float = 0.1  # share of question pieces replaced by <unk> in training
    recall_noise: float = 0.0  # recall models: share of training questions that read random pairs instead of their recalls (each epoch)
    select: str = "chrf"  # loss | chrf: what picks best/ and drives early stopping (chrf: greedy on validation)
    copy_alignment: float = 0.0  # recall models: weight of the guided-alignment loss where a recall holds the whole answer

    def __post_init__(self) -> None:
        if self.select not in SELECT_BY:
            raise ValueError(f"train.select must be one of {SELECT_BY}, got {self.select!r}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"train.word_dropout must be in [0, 1), got {self.word_dropout}")
        if not 0.0 <= self.recall_noise <= 1.0:
            raise ValueError(f"train.recall_noise must be in [0, 1], got {self.recall_noise}")
        if self.copy_alignment < 0:
            raise ValueError(f"train.copy_alignment must be >= 0, got {self.copy_alignment}")
        if self.subword_alpha < 0:
            raise ValueError(f"train.subword_alpha must be >= 0, got {self.subword_alpha}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.subword_alpha > 0 and self.tokenizer.model_type != "unigram":
            raise ValueError("train.subword_alpha > 0 samples segmentations of a unigram tokenizer: set tokenizer."
                             f"model_type: unigram or train.subword_alpha: 0 (got {self.tokenizer.model_type})")
        if self.model.recall_k and self.train.teacher_forcing < 1.0:  # refused here, not at the first step
            raise ValueError("a recall model (model.recall_k > 0) trains teacher-forced: train.teacher_forcing "
                             f"must be 1, got {self.train.teacher_forcing}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s): {sorted(unknown)}; expected {sorted(sections)}")
        kwargs = {}
        for name, sub in ((f.name, f.default_factory) for f in dataclasses.fields(cls)):
            kwargs[name] = _build(sub().__class__, d.get(name) or {}, name)
        return cls(**kwargs)


# Keys of earlier versions: experiment options measured and dropped (docs/experiments.md says which commit
# still has them), and ``model.num_labels``, renamed. A config that sets one gets this line, not a traceback.
REMOVED_KEYS = {
    "data.use_label": "was removed (no model read it); delete it",
    "model.memory_noise": "was removed (an experiment that did not help); delete it",
    "model.char_dim": "was removed (an experiment that did not help); delete it",
    "model.char_vocab_size": "was removed (an experiment that did not help); delete it",
    "model.max_piece_chars": "was removed (an experiment that did not help); delete it",
    "model.unknown_topic": "was removed (an experiment that did not help); delete it",
    "train.answer_word_dropout": "was removed (an experiment that did not help); delete it",
    "train.topic_dropout": "was removed (an experiment that did not help); delete it",
    "model.num_labels": "is now model.num_topics; rename it",
}


def _build(klass, values: dict[str, Any], section: str):
    names = {f.name: f for f in dataclasses.fields(klass)}
    unknown = set(values) - set(names)
    removed = sorted(f"{section}.{k}" for k in unknown if f"{section}.{k}" in REMOVED_KEYS)
    if removed:
        raise ValueError(f"config key {removed[0]} {REMOVED_KEYS[removed[0]]} in the recipe or the "
                         "checkpoint's config.json (docs/experiments.md names the last commit that reads it)")
    if unknown:
        raise ValueError(f"unknown key(s) in [{section}]: {sorted(unknown)}; known: {sorted(names)}")
    return klass(**values)


def _coerce(value: str, like: Any) -> Any:
    """Turn a command-line string into the type of the default it replaces."""
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults) and apply dotted ``section.key`` overrides."""
    raw: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    cfg = Config.from_dict(raw)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        sub = getattr(cfg, section, None)
        if sub is None or not name or not hasattr(sub, name):
            raise ValueError(f"unknown config key {key!r} (use section.key, e.g. train.epochs)")
        setattr(sub, name, _coerce(value, getattr(sub, name)))
    # Re-run validation after overrides.
    return Config.from_dict(cfg.to_dict())


def save_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
