"""Checkpoint folders: everything needed to rebuild the model, and nothing that unpickles.

A checkpoint is a folder::

    model.safetensors   weights (fp16 or fp32)
    config.json         the full recipe (data / tokenizer / model / train) and metadata
    tokenizer.model     the sentencepiece model
    metrics.jsonl       the training log (one JSON object per line), if any
    README.md           a short model card
    topic.safetensors   the topic classifier, for models that read a topic (model.num_topics > 0)
    recall.safetensors  the recall index (training pairs), for models that read recalls (model.recall_k > 0)
    manifest.json       SHA-256 and size of every file above, verified at load

Saving is atomic: the folder is written under a temporary name and swapped in, so a crash
mid-save, or several in a row, leave the previous checkpoint whole (see ``_swap_in``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import SPECIAL_PIECES, Config
from .model import Seq2Seq, build_model
from .text import Tokenizer
from .recall import RECALL_FILE, RecallIndex
from .topic import TOPIC_FILE, TopicClassifier

WEIGHTS, CONFIG, TOKENIZER, METRICS, CARD, MANIFEST = (
    "model.safetensors", "config.json", "tokenizer.model", "metrics.jsonl", "README.md", "manifest.json")
PROBE_KEY = "attention_probe"  # a metrics.jsonl row's greedy replies to a few fixed messages, with their attention
REQUIRED = (WEIGHTS, CONFIG, TOKENIZER)
SPACES_FILE_LIMIT = 10_000_000  # bytes; Spaces refuse larger files without Git LFS
# Model sizes a config.json may ask for, checked before anything is allocated (the shipped models use
# 256 / 512 / 8000; hidden_dim 1e7 would ask for terabytes).
SIZE_LIMITS = {"vocab_size": (len(SPECIAL_PIECES), 1_000_000), "emb_dim": (1, 8192), "hidden_dim": (2, 8192),
               "enc_layers": (1, 16), "dec_layers": (1, 16), "num_topics": (0, 1000), "recall_k": (0, 100)}
_SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


@dataclass
class Checkpoint:
    model: Seq2Seq
    tokenizer: Tokenizer
    config: Config
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    topic_classifier: TopicClassifier | None = None  # predicts the topic of a message (model.num_topics > 0)
    recall_index: RecallIndex | None = None  # the training pairs a recall model reads (model.recall_k > 0)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_state(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """state_dict without tied aliases (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen[t.data_ptr()] = name
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def save_checkpoint(path: str | Path, model: Seq2Seq, tokenizer: Tokenizer, config: Config, *,
                    meta: dict[str, Any] | None = None, metrics_path: str | Path | None = None,
                    extra_files: dict[str, Path] | None = None, dtype: torch.dtype | None = None,
                    card: str | None = None, warn_size: bool = True, topic: TopicClassifier | None = None,
                    recall: RecallIndex | None = None) -> Path:
    """Write a checkpoint folder atomically. ``dtype=torch.float16`` halves the weights file.

    ``warn_size``: log files over the 10 MB Spaces limit (off for training's resume state, never shipped)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = dict(meta or {})
    save_file(_unique_state(model, dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps({"config": config.to_dict(), "meta": meta}, ensure_ascii=False, indent=2),
                              encoding="utf-8")
    (tmp / TOKENIZER).write_bytes(tokenizer.to_bytes())
    if metrics_path and Path(metrics_path).exists():
        shutil.copyfile(metrics_path, tmp / METRICS)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    if topic is not None:
        topic.save(tmp / TOPIC_FILE)
    if recall is not None:
        recall.save(tmp / RECALL_FILE)
    (tmp / CARD).write_text(card or model_card(config, meta), encoding="utf-8")
    manifest = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    _fsync_dir(tmp)
    for p in tmp.iterdir():
        if warn_size and p.stat().st_size > SPACES_FILE_LIMIT:
            log.warning("%s is %.1f MB: Hugging Face Spaces refuse files over 10 MB without Git LFS "
                        "(shrink the model or keep dtype=float16)", path / p.name, p.stat().st_size / 1e6)
    _swap_in(tmp, path)
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``path``, keeping a whole checkpoint at ``path`` or
    ``<path>.old`` (where :func:`resolve` looks) at every instant, whatever crashes came before.

    A crash between the two renames leaves only ``.old``: it is moved back first, so the ``.old`` that
    is deleted next is never the one whole copy. Every rename is atomic; deleting ``.old`` may be cut
    half-way, but only while a whole ``path`` exists.
    """
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)  # the previous save died between its renames
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():  # a half-deleted .old must not take path's place below
        raise CheckpointError(f"cannot remove {old} (left by an earlier save); delete it by hand and save again")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    for p in d.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def resolve(path: str | Path) -> Path:
    """The folder to load; falls back to ``<path>.old`` left by a save that crashed mid-swap.

    :func:`_swap_in` keeps one of the two whole through any sequence of crashes: ``path`` whenever
    it exists, else ``.old``."""
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        return path.with_name(path.name + ".old")
    return path


def verify(path: str | Path) -> dict[str, Any]:
    """Check the folder against its manifest; raise :class:`CheckpointError` naming the bad file.

    The manifest is a JSON object that lists exactly the folder's entries but itself, each by its
    bare name (no path separator: nothing outside the folder is ever looked at) with
    ``{"sha256": <64 hex digits>, "bytes": <size>}``; every size, then every hash, must match.
    """
    path = resolve(path)
    fix = "re-download or re-train it (python -m chatbot train ...), or pass another --checkpoint"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; {fix}")
    for name in REQUIRED:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; {fix}")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} to verify its files against; {fix}")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_file} is not valid JSON ({e}); {fix}") from None
    _check_manifest_shape(manifest, manifest_file, fix)
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    unlisted = sorted(present - set(manifest))
    if unlisted:
        raise CheckpointError(f"{path} holds {_shown(unlisted)}, which {MANIFEST} does not list (added after the "
                              f"save?); {fix}")
    for name, entry in manifest.items():
        f = path / name
        if name not in present:
            raise CheckpointError(f"{f} is listed in the manifest but missing; {fix}")
        if not f.is_file():
            raise CheckpointError(f"{f} is not a regular file; {fix}")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{f} has {size} bytes, the manifest says {entry['bytes']} "
                                  f"(truncated or replaced?); {fix}")
    for name, entry in manifest.items():
        if sha256(path / name) != entry["sha256"]:
            raise CheckpointError(f"{path / name} does not match its SHA-256 in the manifest (corrupt or modified); "
                                  f"{fix}")
    return manifest


def _shown(value: Any, limit: int = 80) -> str:
    """``value`` quoted for a one-line message: repr (control characters escaped), cut at ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_manifest_shape(manifest: Any, manifest_file: Path, fix: str) -> None:
    """A JSON object of bare file names (never manifest.json) to ``{"sha256": hex, "bytes": int}``."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_file} is not a JSON object of file names (found {type(manifest).__name__}); "
                              f"{fix}")
    for name, entry in manifest.items():
        if (not name or name in (".", "..", MANIFEST) or any(c in name for c in "/\\\0")
                or Path(name).name != name):
            raise CheckpointError(f"{manifest_file} lists {_shown(name)}, which is not the bare name of one of the "
                                  f"checkpoint's files; {fix}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and _SHA256.fullmatch(entry["sha256"]) and type(entry.get("bytes")) is int and entry["bytes"] >= 0):
            raise CheckpointError(f"{manifest_file}: the entry of {_shown(name)} is {_shown(entry)}, not "
                                  f'{{"sha256": <64 hex digits>, "bytes": <size>}}; {fix}')


def read_config(path: str | Path) -> tuple[Config, dict[str, Any]]:
    f = resolve(path) / CONFIG
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
        return Config.from_dict(raw["config"]), raw.get("meta", {})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not a valid checkpoint config ({e})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Verify, then rebuild model and tokenizer. Nothing is unpickled."""
    path = resolve(path)
    verify(path)
    config, meta = read_config(path)
    _check_sizes(config, path / CONFIG)
    try:
        tokenizer = Tokenizer.from_bytes((path / TOKENIZER).read_bytes(), morphemes=config.tokenizer.morphemes)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
        raise CheckpointError(f"{path / TOKENIZER} is not a valid sentencepiece model ({e})") from None
    if tokenizer.vocab_size != config.model.vocab_size:
        raise CheckpointError(f"{path / TOKENIZER} has {tokenizer.vocab_size} pieces but {path / CONFIG} "
                              f"says vocab_size={config.model.vocab_size}: the files come from different runs")
    state = _read_weights(path, config)
    model = build_model(config.model)
    expected = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v.to(expected[k].dtype))
    model.to(device).eval()
    topic = None
    if (path / TOPIC_FILE).is_file():
        try:
            topic = TopicClassifier.load(path / TOPIC_FILE)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / TOPIC_FILE} is not a readable topic classifier ({e})") from None
        if topic.num_topics != config.model.num_topics:
            raise CheckpointError(f"{path / TOPIC_FILE} predicts {topic.num_topics} topics but {path / CONFIG} "
                                  f"says model.num_topics={config.model.num_topics}: the files come from different runs")
    return Checkpoint(model, tokenizer, config, meta, path, topic, _load_recall(path, config))


def _load_recall(path: Path, config: Config) -> RecallIndex | None:
    """The recall index a model with ``model.recall_k`` needs (a clear error where it is missing)."""
    if not config.model.recall_k:
        return None
    if not (path / RECALL_FILE).is_file():
        raise CheckpointError(f"{path} reads {config.model.recall_k} recalled pairs (model.recall_k) but has no "
                              f"{RECALL_FILE}; re-train it or pass another --checkpoint")
    try:
        return RecallIndex.load(path / RECALL_FILE)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / RECALL_FILE} is not a readable recall index ({e})") from None


def _check_sizes(config: Config, f: Path) -> None:
    """Refuse model sizes outside :data:`SIZE_LIMITS` before anything is allocated."""
    for key, (low, high) in SIZE_LIMITS.items():
        value = getattr(config.model, key)
        if type(value) is not int or not low <= value <= high:
            raise CheckpointError(f"{f}: model.{key} = {_shown(value, 40)} is not a whole number in {low}-{high}; "
                                  "the file is damaged or was not written by this program")


def _read_weights(path: Path, config: Config) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, checked against the model ``config`` describes before it is
    built: the same names and shapes (compared on the meta device, which allocates nothing), floating
    point and finite."""
    f = path / WEIGHTS
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None
    try:
        with torch.device("meta"):
            expected = build_model(config.model).state_dict(keep_vars=True)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{path / CONFIG} describes a model that cannot be built "
                              f"({type(e).__name__}: {str(e)[:160]})") from None
    if "continuation_all" in expected and "continuation_all" not in state and "continuation.weight" in state:
        # A recall model saved before the shared continuation weight c existed (eighth session): c = 0
        # gives exactly its bias u[y], so it replies as it did.
        state["continuation_all"] = torch.zeros((), dtype=state["continuation.weight"].dtype)
    missing = [k for k in expected if k not in state and not _is_alias(expected, k, state)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(v.shape)} vs config {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{f} does not match the model described by {path / CONFIG}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    not_float = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{f} holds {', '.join(not_float[:3])} where the model has floating-point weights "
                              "(checkpoints store fp32 or fp16; int8 quantization happens at load time)")
    non_finite = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if non_finite:
        raise CheckpointError(f"{f} holds non-finite values (NaN or infinity) in {non_finite[:3]}: the weights are "
                              "damaged, or come from a run whose loss blew up; use an earlier checkpoint")
    return state


def _is_alias(sd: dict[str, torch.Tensor], key: str, state: dict[str, torch.Tensor]) -> bool:
    """True when ``sd[key]`` (a ``state_dict(keep_vars=True)``) is the same parameter as a tensor that is in
    ``state`` (tied weights)."""
    return any(sd[k] is sd[key] for k in state if k in sd)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    f = resolve(path) / METRICS if Path(path).is_dir() else Path(path)
    if not f.exists():
        return []
    rows = []
    for line in f.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    return rows


def _resave(path: str | Path, meta: dict[str, Any] | None = None, topic: TopicClassifier | None = None) -> Path:
    """Re-save a checkpoint in place with new metadata and/or topic classifier; weights unchanged."""
    path = resolve(path)
    ck = load_checkpoint(path)
    dtype = {t.dtype for t in load_file(str(path / WEIGHTS)).values() if t.is_floating_point()}
    return save_checkpoint(path, ck.model, ck.tokenizer, ck.config, meta={**ck.meta, **(meta or {})},
                           metrics_path=path / METRICS, dtype=torch.float16 if dtype == {torch.float16} else None,
                           topic=topic or ck.topic_classifier, recall=ck.recall_index)


def rewrite_card(path: str | Path, evaluation: str) -> Path:
    """Re-save a checkpoint with ``evaluation`` (Markdown) in its model card; weights unchanged."""
    return _resave(path, {"evaluation": evaluation})


def add_topic_classifier(path: str | Path, topic: TopicClassifier, accuracy: dict[str, float] | None = None,
                         command: str | None = None) -> Path:
    """Add (or replace) the topic classifier of a checkpoint whose model reads a topic."""
    config, _ = read_config(path)
    if config.model.num_topics != topic.num_topics:
        raise CheckpointError(f"{path}: the model reads {config.model.num_topics} topics (model.num_topics), "
                              f"the classifier predicts {topic.num_topics}")
    meta = {**({"topic_accuracy": accuracy} if accuracy else {}), **({"topic_command": command} if command else {})}
    return _resave(path, meta, topic)


def model_card(config: Config, meta: dict[str, Any]) -> str:
    m = config.model
    lines = [
        "# Korean attention seq2seq chatbot",
        "",
        f"- Architecture: embedding {m.emb_dim}"
        f" -> bidirectional {m.rnn.upper()} encoder "
        f"({m.enc_layers} layer(s), {m.hidden_dim // 2} per direction) -> {m.rnn.upper()} decoder "
        f"({m.dec_layers} layer(s), {m.hidden_dim}) with `{m.attention}` attention"
        f"{', tied output embedding' if m.tie_embeddings else ''}.",
        f"- Parameters: {meta.get('parameters', '?'):,}" if isinstance(meta.get("parameters"), int)
        else "- Parameters: ?",
        *([f"- Reads the question's topic (the corpus label, {m.num_topics} topics) as one more input vector; "
           f"without one, a character n-gram classifier (`topic.safetensors`) predicts it from the message"
           + (f" (agrees with the corpus label on {acc.get('val', 0):.1%} of validation questions)"
              if isinstance(acc := meta.get('topic_accuracy'), dict) else "") + "."] if m.num_topics else []),
        *([f"- Reads the {m.recall_k} training pairs whose questions are most like the message (TF-IDF over "
           "character 1-3-grams, `recall.safetensors`), each as question </s> answer through the same "
           "encoder with its rank and score; one softmax over message and recalls, and a copy gate: "
           "p(y) = g * softmax(W h~)[y] + (1 - g) * (attention on the positions holding y) (See et al., 2017); "
           "each position that follows the piece just written gets a learned score bonus c + u[piece] (continuation)."]
          if m.recall_k else []),
        f"- Tokenizer: sentencepiece {config.tokenizer.model_type}, {m.vocab_size} pieces"
        f"{', konlpy Okt morphemes first' if config.tokenizer.morphemes else ''}; NFC normalisation.",
        "- Corpus: ChatbotData (songys/Chatbot_data, MIT licence), split by unique question.",
    ]
    if "best_val_loss" in meta:
        chrf = f" (chrF {meta['best_val_chrf']:.1f}, the selection metric)" if "best_val_chrf" in meta else ""
        autocast = meta.get("autocast")
        precision = f" with {autocast.replace('torch.', '')} autocast" if autocast not in (None, "None") else ""
        lines.append(f"- Best epoch {meta.get('best_epoch')}: validation loss {meta['best_val_loss']:.4f}{chrf}; "
                     f"trained {meta.get('steps')} steps in {meta.get('train_seconds', 0):.0f} s on "
                     f"{meta.get('device')}{precision}.")
    commands = [meta[k] for k in ("command", "topic_command") if meta.get(k)]
    if commands:
        lines += ["", "Made with:", "", *(f"    {c}" for c in commands)]
    if meta.get("evaluation"):
        lines += ["", "## Evaluation", "", meta["evaluation"]]
    return "\n".join(lines) + "\n"
