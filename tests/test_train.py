"""Training end to end on the tiny corpus: checkpoints, metrics, exact resume, failure handling."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chatbot.checkpoint import load_checkpoint, read_metrics
from chatbot.config import Config, TrainConfig, load_config
from chatbot.train import TrainingError, train
from conftest import ROOT, train_tiny


def test_training_writes_a_complete_small_checkpoint(tiny_checkpoint):
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.model", "metrics.jsonl", "README.md",
            "manifest.json"} <= files
    assert all(p.stat().st_size < 10_000_000 for p in tiny_checkpoint.iterdir())
    rows = read_metrics(tiny_checkpoint)
    epochs = [r for r in rows if "val_loss" in r]
    assert len(epochs) >= 2
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]  # it learns
    assert all("samples" in r and "tokens_per_s" in r for r in epochs)
    ck = load_checkpoint(tiny_checkpoint)
    assert ck.config.model.vocab_size == ck.tokenizer.vocab_size
    assert ck.meta["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in epochs))
    # the best checkpoint stores fp16 weights; training state is in last/ only
    assert all(t.dtype == torch.float16 for t in load_file(tiny_checkpoint / "model.safetensors").values())
    assert (tiny_checkpoint.parent / "last" / "train_state.pt").exists()


REGULARISED = {"train.subword_alpha": "0.1", "train.word_dropout": "0.2", "train.select": "chrf"}


@pytest.mark.parametrize("extra", [{}, REGULARISED], ids=["plain", "sampled-segmentation+word-dropout+chrf"])
def test_resume_is_exact(tiny_corpus_csv, tmp_path, extra):
    """2N steps straight == N steps, then --resume, then N more (parameters equal), also with
    per-epoch segmentation sampling and word dropout (their randomness is part of the resume state)."""
    common = {"train.epochs": "3", "model.dropout": "0.3", "train.patience": "10", **extra}
    train_tiny(tiny_corpus_csv, tmp_path / "a", **common, **{"train.max_steps": "14"})
    train_tiny(tiny_corpus_csv, tmp_path / "b", **common, **{"train.max_steps": "7"})
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"data.path": str(tiny_corpus_csv),
                                                       "train.out_dir": str(tmp_path / "b"),
                                                       **common, "train.max_steps": "14"})
    train(cfg, resume=True, log=lambda s: None)
    a = load_file(tmp_path / "a" / "last" / "model.safetensors")
    b = load_file(tmp_path / "b" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    state = torch.load(tmp_path / "b" / "last" / "train_state.pt", weights_only=True)
    assert json.loads(state["progress"])["step"] == 14


def test_resume_with_more_patience_continues_a_run_that_early_stopping_ended(tiny_corpus_csv, tmp_path):
    """patience 0 stops after the first epoch; --resume with --train.patience 10 runs the remaining epochs."""
    train_tiny(tiny_corpus_csv, tmp_path, **{"train.epochs": "3", "train.patience": "0"})
    epochs = lambda: [r["epoch"] for r in read_metrics(tmp_path) if "val_loss" in r]  # noqa: E731
    assert epochs() == [1]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"data.path": str(tiny_corpus_csv), "train.out_dir": str(tmp_path),
                                                       "train.epochs": "3", "train.patience": "10"})
    train(cfg, resume=True, log=lambda s: None)
    assert epochs() == [1, 2, 3]
    assert json.loads((tmp_path / "last" / "config.json").read_text())["config"]["train"]["patience"] == 10


def test_resume_without_state_is_a_clear_error(tiny_corpus_csv, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"data.path": str(tiny_corpus_csv),
                                                       "train.out_dir": str(tmp_path)})
    with pytest.raises(TrainingError, match="no resumable state"):
        train(cfg, resume=True, log=lambda s: None)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_corpus_csv, tmp_path):
    train_tiny(tiny_corpus_csv, tmp_path, **{"train.epochs": "1"})
    before = (tmp_path / "last" / "manifest.json").read_text()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"data.path": str(tiny_corpus_csv), "train.out_dir": str(tmp_path),
                                                       "train.epochs": "3", "train.lr": "1e30", "train.warmup_steps": "1",
                                                       "train.grad_clip": "1e30"})
    with pytest.raises(TrainingError, match=r"at step \d+"):
        train(cfg, log=lambda s: None)
    assert (tmp_path / "last" / "manifest.json").read_text() == before
    load_checkpoint(tmp_path / "last")  # still loads and verifies


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(ROOT / "configs" / "tiny.yaml", {"train.epoch": "3"})
    with pytest.raises(ValueError, match="attention"):
        load_config(ROOT / "configs" / "tiny.yaml", {"model.attention": "luong"})


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_loads(recipe):
    load_config(ROOT / "configs" / recipe)


def test_sampled_segmentations_vary_decode_to_the_same_text_and_repeat_with_the_seed(tiny_checkpoint):
    tok = load_checkpoint(tiny_checkpoint).tokenizer
    text = "오늘 점심 추천해줘 배고파"
    assert tok.decode(tok.encode(text)) == text  # every character is in the tiny vocabulary
    draws = []
    for seed in (1, 1, 2):
        rng = np.random.default_rng(seed)
        draws.append([tuple(tok.encode(text, sample_alpha=0.1, rng=rng)) for _ in range(20)])
    assert draws[0] == draws[1] != draws[2]  # seeded
    assert len(set(draws[0])) > 1  # more than one segmentation
    assert all(tok.decode(ids) == text for ids in draws[0])  # every one spells the question
    assert tok.encode(text) == tok.encode(text)  # no sampling by default


def test_word_dropout_hits_about_its_share_of_real_pieces_and_never_padding():
    from chatbot.config import PAD_ID, UNK_ID
    from chatbot.train import drop_words

    torch.manual_seed(0)
    src = torch.randint(4, 100, (200, 30))
    src[:, 20:] = PAD_ID
    out = drop_words(src, 0.25)
    assert (out[:, 20:] == PAD_ID).all()
    hit = out[:, :20] != src[:, :20]
    assert (out[:, :20][hit] == UNK_ID).all()
    assert 0.22 < hit.float().mean().item() < 0.28


def test_selecting_by_chrf_keeps_the_epoch_with_the_best_validation_chrf(tiny_corpus_csv, tmp_path):
    best = train_tiny(tiny_corpus_csv, tmp_path, **{"train.select": "chrf", "train.epochs": "4"})
    epochs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    chrfs = [r["val_chrf"] for r in epochs]
    assert all(0 <= c <= 100 for c in chrfs) and max(chrfs) > 0
    meta = load_checkpoint(best).meta
    assert meta["selected_by"] == "chrf"
    assert meta["best_val_chrf"] == pytest.approx(max(chrfs))
    assert meta["best_epoch"] == 1 + chrfs.index(max(chrfs))
    assert meta["best_val_loss"] == pytest.approx(epochs[chrfs.index(max(chrfs))]["val_loss"])


@pytest.mark.parametrize("key,value", [("train.select", "bleu"), ("train.word_dropout", "1.0"),
                                       ("train.subword_alpha", "-0.1")])
def test_bad_regularisation_settings_are_rejected(key, value):
    with pytest.raises(ValueError, match=key.split(".")[1]):
        load_config(ROOT / "configs" / "tiny.yaml", {key: value})


def test_early_stopping_counts_epochs_that_improve_neither_loss_nor_the_selection_metric():
    from chatbot.train import Progress

    p = Progress()
    # (val loss, val chrF): a lucky chrF peak at epoch 2, then the loss keeps falling while chrF lags
    history = [(5.0, 1.0), (4.6, 7.5), (4.2, 6.0), (3.9, 6.2), (3.7, 6.4), (3.6, 7.0), (3.6, 8.0), (3.7, 7.9),
               (3.65, 7.7)]
    best, bad = [], []
    for epoch, (loss, chrf) in enumerate(history):
        p.epoch = epoch
        best.append(p.record(loss, chrf, "chrf"))
        bad.append(p.bad_epochs)
    assert best == [True, True, False, False, False, False, True, False, False]
    assert bad == [0, 0, 0, 0, 0, 0, 0, 1, 2]  # loss improvements kept it going past the early peak
    assert (p.best_epoch, p.best_chrf, p.best_loss, p.min_loss) == (7, 8.0, 3.6, 3.6)

    q = Progress()
    for epoch, loss in enumerate([3.0, 2.9, 2.95, 2.97]):
        q.epoch = epoch
        q.record(loss, None, "loss")
    assert (q.best_epoch, q.best_loss, q.bad_epochs) == (2, 2.9, 2)


def test_a_label_model_reads_each_questions_label_in_validation_and_evaluate(tiny_corpus_csv, tiny_topic_checkpoint):
    """model.num_topics > 0: the corpus label is an input, so validation chrF and `evaluate --topics corpus`
    pass each question's own label (not label 0 for all), and the replies are the ones ChatBot gives for that
    label; `evaluate` as served (the default) gives each question the topic its classifier predicts."""
    from chatbot.data import load_corpus, split_corpus
    from chatbot.evaluate import evaluate
    from chatbot.inference import ChatBot
    from chatbot.train import sample_replies

    bot = ChatBot.from_checkpoint(tiny_topic_checkpoint, device="cpu")
    assert bot.config.model.num_topics == 3 and bot.topic_classifier is not None
    result = evaluate(bot, str(tiny_corpus_csv), topics="corpus")
    assert result["reads_topic"] is True and result["topics"] == "corpus"
    test = split_corpus(load_corpus(str(tiny_corpus_csv), verbose=False).pairs, bot.config.data.val_fraction,
                        bot.config.data.test_fraction)["test"]
    label_of = dict(zip(test["Q"], test["label"]))
    assert len({label_of[e["q"]] for e in result["examples"]}) > 1  # the sample covers several labels
    for e in result["examples"]:
        assert e["model"] == bot.reply(e["q"], topic=int(label_of[e["q"]])).text
    served = evaluate(bot, str(tiny_corpus_csv))
    assert served["topics"] == "predicted" and 0 <= served["topic_accuracy"] <= 1
    predicted = dict(zip(test["Q"], bot.topic_classifier.predict(list(test["Q"]))))
    for e in served["examples"]:
        assert e["model"] == bot.reply(e["q"], topic=predicted[e["q"]]).text == bot.reply(e["q"]).text

    model = bot.model
    with torch.no_grad():
        model.encoder.topic_embedding.weight.mul_(50)  # make the label dominate the tiny model's input
    questions = list(test["Q"][:6])
    by_label = [sample_replies(model, bot.tokenizer, questions, 48, torch.device("cpu"), [lab] * 6)
                for lab in range(3)]
    assert len({tuple(r for _, r in replies) for replies in by_label}) > 1


def test_the_defaults_are_the_shipped_recipe():
    """`python -m chatbot train` with no --config trains checkpoints/default's recipe."""
    from chatbot.checkpoint import read_config

    recipe = load_config(ROOT / "configs" / "default.yaml").to_dict()
    assert Config().to_dict() == recipe
    shipped = read_config(ROOT / "checkpoints" / "default")[0].to_dict()
    for section in ("data", "tokenizer", "model", "train"):  # apart from what a run fills in or the command set
        for key, value in recipe[section].items():
            # (its run had patience 4, the recipe's value then; early stopping never fired: it ran all 50 epochs)
            if (section, key) not in {("model", "vocab_size"), ("train", "threads"), ("train", "out_dir"),
                                      ("train", "patience")}:
                assert shipped[section][key] == value, f"{section}.{key}"


@pytest.mark.parametrize("key", ["model.memory_noise", "train.answer_word_dropout", "train.topic_dropout",
                                 "model.unknown_topic", "model.char_dim", "data.use_label", "model.num_labels"])
def test_a_removed_key_is_one_clear_error_naming_it(key, tiny_checkpoint, tmp_path):
    from chatbot.checkpoint import CheckpointError, read_config

    section, name = key.split(".")
    with pytest.raises(ValueError, match=f"config key {key} "):
        Config.from_dict({section: {name: 1}})
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    raw = json.loads((old / "config.json").read_text(encoding="utf-8"))
    raw["config"][section][name] = 0
    (old / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"{key} (was removed|is now)") as e:
        read_config(old)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, epochs", [({}, 3), ({"model.recall_k": "2"}, 2)], ids=["luong", "recall"])
def test_training_records_the_attention_of_the_probe_messages_every_epoch(tiny_corpus_csv, tmp_path, overrides,
                                                                        epochs):
    """One attention_probe per epoch in metrics.jsonl (and so in best/ and last/, whose manifests still verify):
    for each probe message its pieces and attention rows that sum to 1 over the columns (a recall model's
    column groups tile them), the same greedy replies the checkpoint gives."""
    from chatbot.checkpoint import verify
    from chatbot.inference import ChatBot
    from chatbot.train import ATTENTION_PROBES, PROBE_KEY

    best = train_tiny(tiny_corpus_csv, tmp_path, **{"train.epochs": str(epochs), "train.patience": "10",
                                                    **overrides})
    for ckpt in (best, tmp_path / "last"):
        verify(ckpt)
        rows = [r for r in read_metrics(ckpt) if PROBE_KEY in r]
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
        assert [r["epoch"] for r in read_metrics(ckpt) if "val_loss" in r] == list(range(1, epochs + 1))
    for row in rows:
        assert [p["message"] for p in row[PROBE_KEY]] == list(ATTENTION_PROBES)
        for p in row[PROBE_KEY]:
            att = np.array(p["attention"])
            assert att.shape == (len(p["reply"]), len(p["source"])) and len(p["reply"]) > 0
            np.testing.assert_allclose(att.sum(1), 1.0, atol=0.01)
            assert att.round(3).tolist() == p["attention"]  # 3 decimals
            if overrides:
                groups = p["groups"]
                assert [(g["start"], g["end"]) for g in groups] == list(
                    zip([0] + [g["end"] for g in groups[:-1]], [g["end"] for g in groups]))
                assert groups[-1]["end"] == len(p["source"]) and len(groups) == 3
                assert len(p["gate"]) == len(p["reply"])
    if overrides:  # the About tab draws the groups as the chat's heatmap does
        from chatbot import ui

        fig = ui.epoch_figure(best, 0, 1)
        assert {"기억 1", "기억 2"} <= {a.text.split(" ·")[0] for a in fig.layout.annotations}
    last_epoch = load_checkpoint(tmp_path / "last")  # the last row: the replies of the last epoch's weights
    bot = ChatBot(last_epoch, "cpu")
    for p, reply in zip(rows[-1][PROBE_KEY], bot.reply_batch(list(ATTENTION_PROBES))):
        assert p["reply"] == reply.reply_tokens and p["source"] == reply.source_tokens


def test_a_model_without_attention_records_no_probe(tiny_corpus_csv, tmp_path):
    from chatbot.train import PROBE_KEY

    best = train_tiny(tiny_corpus_csv, tmp_path, **{"train.epochs": "1", "model.attention": "none"})
    rows = read_metrics(best)
    assert any("val_loss" in r for r in rows) and not any(PROBE_KEY in r for r in rows)
