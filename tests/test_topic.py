"""The topic classifier (chatbot.topic) and a topic-reading model served without a given topic."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from chatbot.checkpoint import CheckpointError, add_topic_classifier, load_checkpoint, save_checkpoint
from chatbot.inference import ChatBot
from chatbot.topic import TOPIC_FILE, TopicClassifier, char_ngrams, hashed_counts
from conftest import ROOT
from corpus import BASE_PAIRS, PREFIXES, tiny_pairs


def test_char_ngrams_are_scikit_learns_char_wb():
    analyzer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3)).build_analyzer()
    for text in ["헤어진 지  일주일 됐어", "ㅋㅋ 너무 웃기다!", "a", "연애하고싶다"]:
        assert sorted(char_ngrams(text)) == sorted(analyzer(text))


def test_hashing_is_the_same_in_another_process():
    """crc32, not Python's per-process salted hash(): a checkpoint's classifier must read the same
    buckets wherever it is loaded."""
    texts = ["헤어진 지 일주일 됐어", "좋아하는 사람이 생겼어"]
    here = hashed_counts(texts, 8192)
    code = ("import json; from chatbot.topic import hashed_counts; "
            f"print(json.dumps([t.tolist() for t in hashed_counts({texts!r}, 8192)]))")
    there = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                      check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout)
    assert [t.tolist() for t in here] == there


def test_fit_predicts_topics_of_unseen_phrasings():
    """Trained on the tiny corpus's questions with some openers, it labels the same questions with an
    opener it never saw (the base question's n-grams carry the topic) far above a majority guess."""
    rows = tiny_pairs(len(BASE_PAIRS) * len(PREFIXES))
    train = [r for r in rows if not r[0].startswith("근데 ")]
    test = [r for r in rows if r[0].startswith("근데 ")]
    clf = TopicClassifier.fit([q for q, _, _ in train], [y for _, _, y in train], 3)
    accuracy = clf.accuracy([q for q, _, _ in test], [y for _, _, y in test])
    majority = max(np.bincount([y for _, _, y in test])) / len(test)
    assert accuracy >= 0.9 > majority + 0.4
    probs = clf.predict_proba(["헤어졌어", "", "좋아하는 사람이 생겼어"])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert probs[0].argmax() == 1 and probs[2].argmax() == 2
    np.testing.assert_allclose(probs[1], clf.bias.softmax(0).numpy(), atol=1e-6)  # no n-grams: the bias alone
    with pytest.raises(ValueError, match="as many labels"):
        TopicClassifier.fit(["a", "b"], [0])


def test_save_load_round_trip_and_a_bad_file(tmp_path):
    clf = TopicClassifier.fit(["헤어졌어", "좋아해", "배고파"], [1, 2, 0], 3, buckets=64)
    clf.save(tmp_path / "t.safetensors")
    back = TopicClassifier.load(tmp_path / "t.safetensors")
    texts = ["헤어진 지 한 달", "배고프다"]
    np.testing.assert_array_equal(back.predict_proba(texts), clf.predict_proba(texts))
    assert back.names == clf.names and back.buckets == 64
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(Exception):
        TopicClassifier.load(tmp_path / "bad.safetensors")


def test_training_writes_the_classifier_and_the_bot_predicts_the_topic(tiny_topic_checkpoint):
    assert (tiny_topic_checkpoint / TOPIC_FILE).is_file()
    ck = load_checkpoint(tiny_topic_checkpoint)
    assert ck.topic_classifier is not None and set(ck.meta["topic_accuracy"]) == {"train", "val"}
    assert "topic.safetensors" in (tiny_topic_checkpoint / "README.md").read_text(encoding="utf-8")
    bot = ChatBot.from_checkpoint(tiny_topic_checkpoint, device="cpu")
    auto = bot.reply("헤어진 지 한 달 됐어")
    assert auto.topic.label == int(np.argmax(auto.topic.probs)) and auto.topic.name == bot.topic_names[auto.topic.label]
    assert auto.text == bot.reply("헤어진 지 한 달 됐어", topic=auto.topic.label).text  # predicted = given, same reply
    given = bot.reply("헤어진 지 한 달 됐어", topic=2)
    assert given.topic.label == 2 and given.topic.probs is None
    assert given.to_dict()["topic_source"] == "given" and auto.to_dict()["topic_source"] == "predicted"
    streamed = list(bot.stream("헤어진 지 한 달 됐어", topic=2))
    assert streamed[-1].done and streamed[-1].reply.text == given.text and streamed[-1].reply.topic.label == 2
    beam = bot.reply("헤어진 지 한 달 됐어", strategy="beam", beam_size=3, n_best=3)
    assert all(h.topic == beam.topic for h in beam.n_best)
    with pytest.raises(ValueError, match="topic must be in 0..2"):
        bot.reply("안녕", topic=3)


def test_a_model_without_topics_ignores_the_topic(tiny_bot):
    assert not tiny_bot.reads_topic
    r = tiny_bot.reply("안녕", topic=1)
    assert r.topic is None and r.text == tiny_bot.reply("안녕").text and r.to_dict()["topic_source"] is None


def test_topic_command_adds_a_classifier_and_refuses_models_without_topics(tiny_topic_checkpoint, tiny_checkpoint,
                                                                           tiny_corpus_csv, tmp_path, capsys):
    from chatbot.cli import main

    ck = load_checkpoint(tiny_topic_checkpoint)
    bare = save_checkpoint(tmp_path / "bare", ck.model, ck.tokenizer, ck.config, meta=ck.meta)  # as trained before
    assert load_checkpoint(bare).topic_classifier is None
    defaulted = ChatBot.from_checkpoint(bare, device="cpu").reply("헤어졌어")
    assert (defaulted.topic.label, defaulted.topic.source) == (0, "default")  # no classifier: topic 0, and it says so
    assert main(["topic", "--checkpoint", str(bare), "--data", str(tiny_corpus_csv)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["topic_accuracy"]["train"] > 0.9
    again = load_checkpoint(bare)
    texts = ["헤어졌어", "배고파", "고백할까"]
    np.testing.assert_allclose(again.topic_classifier.predict_proba(texts), ck.topic_classifier.predict_proba(texts),
                               atol=1e-5)
    assert "python -m chatbot topic" in (bare / "README.md").read_text(encoding="utf-8")
    assert main(["topic", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_corpus_csv)]) == 2
    assert "reads no topic" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="reads 3 topics .*, the classifier predicts 2"):
        add_topic_classifier(bare, TopicClassifier.fit(["a", "b"], [0, 1], 2))


def test_a_corrupt_classifier_file_is_named(tiny_topic_checkpoint, tmp_path):
    import shutil

    ck = shutil.copytree(tiny_topic_checkpoint, tmp_path / "ck")
    data = bytearray((ck / TOPIC_FILE).read_bytes())
    data[-5] ^= 0xFF
    (ck / TOPIC_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="topic.safetensors"):
        load_checkpoint(ck)

