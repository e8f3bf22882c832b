from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatbot.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TokenizerConfig
from chatbot.text import Tokenizer, normalize
from conftest import ROOT
from corpus import tiny_pairs


def _texts() -> list[str]:
    return [t for q, a, _ in tiny_pairs(200) for t in (q, a)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_texts(), TokenizerConfig(vocab_size=300))


def _java_available() -> bool:
    pytest.importorskip("konlpy")
    from chatbot.text import MorphemeAnalyzerUnavailable, _get_okt

    try:
        _get_okt()
    except MorphemeAnalyzerUnavailable:
        return False
    return True


@pytest.fixture(scope="module")
def morph_tok() -> Tokenizer:
    if not _java_available():
        pytest.skip("konlpy is installed but no Java runtime (apt-get install default-jre)")
    return Tokenizer.train(_texts(), TokenizerConfig(vocab_size=300, morphemes=True))


# ------------------------------------------------------------------ normalize

def test_nfc_and_idempotent():
    s = "한국어  텍스트\t입니다\n"
    assert normalize(s) == "한국어 텍스트 입니다"
    assert normalize(normalize(s)) == normalize(s)
    assert unicodedata.is_normalized("NFC", normalize(s))


def test_nfd_input_equals_nfc():
    s = "헤어졌어 ㅠㅠ 사랑해요"
    nfd = unicodedata.normalize("NFD", s)
    assert nfd != s
    assert normalize(nfd) == normalize(s) == s


def test_compatibility_jamo_unchanged():
    for s in ("ㅋㅋ", "ㅎㅇ", "ㅋㅋㅋ 웃겨 ㅎㅎ", "ㅠㅠ"):
        assert normalize(s) == s


def test_invisible_and_control_characters_removed():
    s = "\u202e안\u200b녕\u2066하\u2069세\u200e요\u200f\ufeff\x00\x07!\u2060\u200c\u200d"
    assert normalize(s) == "안녕하세요!"
    assert normalize("안녕\r\n하세요\t\t반가워") == "안녕 하세요 반가워"
    assert normalize("  \u3000 \n ") == ""


def test_jamo_split_by_zero_width_compose():
    # Removal happens before NFC, so conjoining jamo separated by a ZWSP still compose.
    assert normalize("\u1112\u200b\u1161\u11ab") == "한"


def test_surrogates_do_not_raise():
    assert normalize("a\ud800b") == "a\ufffdb"
    assert normalize("\ud83d\ude00") == "😀"  # a valid pair becomes its character


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=40))
def test_normalize_total_and_idempotent(s):
    once = normalize(s)
    assert normalize(once) == once
    assert once == once.strip()
    assert "  " not in once


# ------------------------------------------------------------------ tokenizer

def test_special_ids(tok):
    assert tok.display_pieces([PAD_ID, UNK_ID, BOS_ID, EOS_ID]) == ["<pad>", "<unk>", "<s>", "</s>"]
    assert 50 < tok.vocab_size <= 300


def test_round_trip(tok):
    for text in [*_texts(), "오늘 날씨 좋다 그냥 배고파", "  안녕   하세요. "]:
        ids = tok.encode(text)
        assert BOS_ID not in ids and EOS_ID not in ids
        assert tok.decode(ids) == normalize(text)


def test_unknown_characters_become_unk(tok):
    ids = tok.encode("안녕 😀🙈 鬱")
    assert UNK_ID in ids
    assert tok.decode(ids).startswith("안녕")
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_decode_skips_special_ids(tok):
    ids = tok.encode("안녕")
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == "안녕"


def test_display_pieces(tok):
    ids = tok.encode("진짜 헤어졌어 ㅋㅋ 😀")
    labels = tok.display_pieces(ids)
    assert len(labels) == len(ids)
    assert all(label and "▁" not in label for label in labels)
    assert "<unk>" in labels


def test_save_load_and_bytes(tok, tmp_path):
    path = tmp_path / "sub" / "tok.model"
    tok.save(path)
    again = Tokenizer.load(path)
    same = Tokenizer.from_bytes(tok.to_bytes())
    for text in _texts()[:40]:
        assert again.encode(text) == same.encode(text) == tok.encode(text)
    assert again.vocab_size == tok.vocab_size


def test_bpe():
    bpe = Tokenizer.train(_texts(), TokenizerConfig(model_type="bpe", vocab_size=300))
    for text in _texts()[:60]:
        assert bpe.decode(bpe.encode(text)) == normalize(text)


def test_vocab_too_large_for_corpus_is_reduced():
    small = Tokenizer.train(["안녕하세요 반가워요", "오늘 날씨 좋다"] * 3, TokenizerConfig(vocab_size=8000))
    assert small.vocab_size < 8000
    assert small.decode(small.encode("안녕하세요")) == "안녕하세요"


def test_bad_model_type():
    with pytest.raises(ValueError, match="unigram or bpe"):
        Tokenizer.train(["안녕"], TokenizerConfig(model_type="wordpiece"))


# ------------------------------------------------------------------ morphemes

def test_morpheme_round_trip(morph_tok):
    for text in [*_texts(), "오늘 날씨 좋다 그냥 배고파", "헤어진 지 한 달 됐어 ㅋㅋ"]:
        assert morph_tok.decode(morph_tok.encode(text)) == normalize(text)


def test_morpheme_pieces_follow_morphemes(morph_tok, tok):
    ids = morph_tok.encode("친구랑 싸웠어")
    labels = morph_tok.display_pieces(ids)
    assert len(labels) == len(ids)
    assert "▁" not in "".join(labels)
    # A morpheme boundary costs no token: it is only a piece boundary.
    assert "".join(labels).replace("·", "") == "친구랑싸웠어"
    assert morph_tok.morphemes and not tok.morphemes


def test_morpheme_save_load(morph_tok, tmp_path):
    morph_tok.save(tmp_path / "m.model")
    again = Tokenizer.load(tmp_path / "m.model", morphemes=True)
    assert again.encode("친구랑 싸웠어") == morph_tok.encode("친구랑 싸웠어")


# ------------------------------------------------------------------ subword sampling (train.subword_alpha)

def _segmentation_probabilities(tok: Tokenizer, text: str, alpha: float) -> dict[tuple[int, ...], float]:
    """Every segmentation of ``text`` with its exact probability exp(alpha x score) / Z, by enumeration."""
    import math

    from chatbot.text import SubwordSampler

    sampler = SubwordSampler(tok.to_bytes())
    ends = sampler.lattice(normalize(text))
    paths: dict[int, list[tuple[tuple[int, ...], float]]] = {0: [((), 0.0)]}
    for j in range(1, len(ends)):
        paths[j] = [(ids + (piece,), s + alpha * score) for begin, piece, score in ends[j] for ids, s in paths[begin]]
    z = math.log(sum(math.exp(s) for _, s in paths[len(ends) - 1]))
    return {ids: math.exp(s - z) for ids, s in paths[len(ends) - 1]}


@pytest.mark.parametrize("text", ["오늘따라 아직도 그 사람 못 잊겠어", "그 사람도 나를 좋아할까 🙂"])
def test_sampled_segmentations_follow_sentencepieces_own_distribution(tok, text):
    """Our seeded sampler and sentencepiece's ``enable_sampling`` both match the exact distribution over
    every segmentation (total variation within sampling noise), and every draw spells the text."""
    import collections

    import numpy as np
    import sentencepiece as spm

    exact = _segmentation_probabilities(tok, text, 0.1)
    assert 5 < len(exact) < 5000 and sum(exact.values()) == pytest.approx(1.0)
    n = 20_000
    rng = np.random.default_rng(0)
    ours = collections.Counter(tuple(tok.encode(text, 0.1, rng)) for _ in range(n))
    spm.set_random_generator_seed(0)
    theirs = collections.Counter(tuple(tok._sp.encode(normalize(text), enable_sampling=True, alpha=0.1, nbest_size=-1))
                                 for _ in range(n))
    for drawn in (ours, theirs):
        assert set(drawn) <= set(exact)
        assert 0.5 * sum(abs(drawn[k] / n - p) for k, p in exact.items()) < 0.03
    assert all(tok.decode(ids) == tok.decode(tok.encode(text)) for ids in ours)  # the text, <unk> left out


def test_sampled_segmentations_repeat_with_the_seed_in_another_process(tok, tmp_path):
    """sentencepiece's own sampling draws other segmentations in each process for the same seed; ours does not."""
    import subprocess
    import sys

    tok.save(tmp_path / "t.model")
    code = ("import sys, numpy as np; from chatbot.text import Tokenizer; t = Tokenizer.load(sys.argv[1]); "
            "r = np.random.default_rng(7); print([t.encode('오늘 점심 추천해줘 배고파', 0.1, r) for _ in range(30)])")
    runs = {subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.model")], capture_output=True, text=True,
                           check=True, cwd=ROOT).stdout for _ in range(2)}
    assert len(runs) == 1 and runs.pop().count("[") > 30


def test_subword_sampling_needs_a_unigram_tokenizer():
    from chatbot.config import Config, TrainConfig

    with pytest.raises(ValueError, match="unigram"):
        Config(tokenizer=TokenizerConfig(model_type="bpe"), train=TrainConfig(subword_alpha=0.1))
    Config(tokenizer=TokenizerConfig(model_type="bpe"), train=TrainConfig(subword_alpha=0.0))
