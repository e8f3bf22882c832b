"""Decoding: beam 1 == greedy, every hypothesis carries its own attention, score rewriting works."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chatbot.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ModelConfig
from chatbot.model import build_model
from chatbot.search import (OPTIONS, STRATEGIES, DecodeOptions, beam_search, block_ngrams, decode, filter_top_k_top_p,
                            greedy, repetition_penalty, sample)


def tiny(attention="general", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=30, emb_dim=8, hidden_dim=12, attention=attention, dropout=0.0)
    return build_model(cfg).eval()


def sources():
    src = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0], [13, 14, 0, 0, 0]])
    return src, torch.tensor([5, 3, 2])


def forced_attention(model, src, src_len, tokens):
    """Teacher-force ``tokens`` and return the attention of each reply position."""
    tgt_in = torch.tensor([[BOS_ID] + tokens[:-1]]) if tokens else torch.tensor([[BOS_ID]])
    with torch.no_grad():
        _, w = model(src, src_len, tgt_in)
    return w[0, : len(tokens)].numpy()


@pytest.mark.parametrize("attention", ["none", "dot", "general", "additive"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_equals_greedy(attention, seed):
    model = tiny(attention, seed)
    src, src_len = sources()
    opts = DecodeOptions(max_len=12)
    g = greedy(model, src, src_len, opts)
    for i in range(3):
        b = beam_search(model, src[i:i + 1, : src_len[i]], src_len[i:i + 1],
                        DecodeOptions(strategy="beam", beam_size=1, max_len=12))[0]
        assert b.tokens == g[i].tokens
        assert b.score == pytest.approx(g[i].score, abs=1e-4)
        if attention != "none":
            np.testing.assert_allclose(b.attention, g[i].attention, atol=1e-6)


@pytest.mark.parametrize("attention", ["general", "additive"])
def test_every_beam_hypothesis_has_its_own_attention(attention):
    model = tiny(attention)
    src, src_len = sources()
    hyps = beam_search(model, src[:1], src_len[:1], DecodeOptions(strategy="beam", beam_size=4, n_best=4, max_len=8))
    assert len(hyps) == 4
    assert [h.norm_score for h in hyps] == sorted([h.norm_score for h in hyps], reverse=True)
    assert len({tuple(h.tokens) for h in hyps}) == 4
    for h in hyps:
        assert h.attention.shape == (len(h.tokens), 5)
        np.testing.assert_allclose(h.attention.sum(1), 1.0, atol=1e-5)
        # back-pointers: the kept rows are exactly what the decoder computes for this hypothesis
        np.testing.assert_allclose(h.attention, forced_attention(model, src[:1], src_len[:1], h.tokens), atol=1e-5)
        assert h.topk_ids.shape == h.topk_probs.shape == (len(h.tokens), 5)


def test_greedy_attention_matches_teacher_forcing_and_padding_is_cut():
    model = tiny("general")
    src, src_len = sources()
    for i, h in enumerate(greedy(model, src, src_len, DecodeOptions(max_len=10))):
        assert h.attention.shape == (len(h.tokens), int(src_len[i]))
        np.testing.assert_allclose(
            h.attention, forced_attention(model, src[i:i + 1, : src_len[i]], src_len[i:i + 1], h.tokens), atol=1e-5)
        assert len(h.tokens) <= 10
        assert not {PAD_ID, BOS_ID, UNK_ID, EOS_ID} & set(h.tokens)


def test_greedy_score_is_the_sum_of_log_probabilities():
    model = tiny("dot")
    src, src_len = sources()
    h = greedy(model, src[:1], src_len[:1], DecodeOptions(max_len=6))[0]
    tokens = h.tokens + ([EOS_ID] if h.finished else [])
    with torch.no_grad():
        logits, _ = model(src[:1], src_len[:1], torch.tensor([[BOS_ID] + tokens[:-1]]))
    logits[..., [PAD_ID, BOS_ID, UNK_ID]] = -math.inf
    logits[:, 0, EOS_ID] = -math.inf  # min_len 1: no </s> first
    logp = logits.log_softmax(-1)[0, torch.arange(len(tokens)), torch.tensor(tokens)]
    assert h.score == pytest.approx(float(logp.sum()), abs=1e-3)


def test_max_len_and_min_len():
    model = tiny("general")
    src, src_len = sources()
    for h in greedy(model, src, src_len, DecodeOptions(max_len=3, min_len=3)):
        assert len(h.tokens) == 3
    for h in beam_search(model, src[:1], src_len[:1], DecodeOptions(strategy="beam", max_len=2, min_len=2, n_best=3)):
        assert len(h.tokens) == 2


def test_block_ngrams_bans_only_completing_tokens():
    history = torch.tensor([[5, 6, 7, 5], [1, 2, 3, 4]])
    out = block_ngrams(torch.zeros(2, 10), history, 2)
    assert out[0, 6] == -math.inf  # "5 6" already seen, last token is 5
    assert torch.isfinite(out[0, 7]) and torch.isfinite(out[1]).sum() >= 9
    out3 = block_ngrams(torch.zeros(1, 10), torch.tensor([[5, 6, 7, 5, 6]]), 3)
    assert out3[0, 7] == -math.inf and torch.isfinite(out3[0, 8])


def test_no_repeat_ngram_decoding_never_repeats():
    model = tiny("general", seed=3)
    src, src_len = sources()
    for strategy in ("greedy", "beam"):
        for hyps in decode(model, src, src_len, DecodeOptions(strategy=strategy, max_len=20, min_len=20,
                                                              no_repeat_ngram=2)):
            t = hyps[0].tokens
            bigrams = list(zip(t, t[1:]))
            assert len(bigrams) == len(set(bigrams))


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    out = repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0]]


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.4)).tolist() == [[True, False, False, False]]


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k_one():
    model = tiny("general")
    src, src_len = sources()
    a = sample(model, src, src_len, DecodeOptions(strategy="sample", seed=7, temperature=1.5))
    b = sample(model, src, src_len, DecodeOptions(strategy="sample", seed=7, temperature=1.5))
    assert [h.tokens for h in a] == [h.tokens for h in b]
    k1 = sample(model, src, src_len, DecodeOptions(strategy="sample", seed=3, top_k=1))
    assert [h.tokens for h in k1] == [h.tokens for h in greedy(model, src, src_len)]


def test_decode_options_defaults_are_the_specs():
    assert DecodeOptions() == DecodeOptions(strategy="greedy", max_len=40, min_len=1, beam_size=5, length_penalty=1.0,
                                            n_best=1, temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram=0,
                                            repetition_penalty=1.0, inspect_k=5, seed=None)
    assert {name: spec.default for name, spec in OPTIONS.items()} == vars(DecodeOptions())
    for spec in OPTIONS.values():
        assert spec.label and spec.help and set(spec.strategies) <= set(STRATEGIES)
        if spec.choices:
            continue
        assert spec.type in (int, float) and isinstance(spec.low, spec.type) and isinstance(spec.high, spec.type)
        for value in (spec.low, spec.high):  # the limits themselves are allowed
            DecodeOptions(**{"beam_size": 10, spec.name: value})


OUT_OF_RANGE = [("max_len", 0), ("max_len", 81), ("min_len", 0), ("min_len", 81), ("beam_size", 0), ("beam_size", 11),
                ("length_penalty", -0.1), ("length_penalty", 2.5), ("n_best", 0), ("n_best", 11), ("temperature", 0),
                ("temperature", 0.01), ("temperature", 2.5), ("top_k", -1), ("top_k", 51), ("top_p", 0),
                ("top_p", 1.01), ("no_repeat_ngram", -1), ("no_repeat_ngram", 6), ("repetition_penalty", 0.9),
                ("repetition_penalty", 2.1), ("inspect_k", 0), ("inspect_k", 21), ("seed", -1), ("seed", 2**32)]
NOT_ALLOWED = [("strategy", "nucleus"), ("strategy", None), ("max_len", 3.0), ("max_len", None), ("top_k", True),
               ("temperature", "1.0")]
NOT_ALLOWED += [(name, bad) for name, spec in OPTIONS.items() if spec.type is float
                for bad in (math.nan, math.inf, -math.inf)]


@pytest.mark.parametrize("name, value", OUT_OF_RANGE)
def test_decode_options_reject_out_of_range_fields_by_name_and_range(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be in {OPTIONS[name].range_text()}, got "):
        DecodeOptions(**{"beam_size": 10, name: value})


@pytest.mark.parametrize("name, value", NOT_ALLOWED)
def test_decode_options_reject_non_finite_and_wrong_types_by_name(name, value):
    with pytest.raises(ValueError, match=f"^{name} must "):
        DecodeOptions(**{name: value})


def test_n_best_at_most_the_beam_size():
    DecodeOptions(strategy="beam", beam_size=3, n_best=3)
    with pytest.raises(ValueError, match="n_best must be at most beam_size"):
        DecodeOptions(strategy="beam", beam_size=3, n_best=4)


def test_clamp_casts_and_clamps_but_rejects_non_finite_numbers():
    assert OPTIONS["max_len"].clamp(500.0) == 80 and OPTIONS["max_len"].clamp(0) == 1
    assert OPTIONS["beam_size"].clamp("4.7") == 4 and isinstance(OPTIONS["beam_size"].clamp(4.0), int)
    assert OPTIONS["temperature"].clamp(0) == 0.05 and OPTIONS["top_p"].clamp(0.9) == 0.9
    assert isinstance(OPTIONS["length_penalty"].clamp(1), float)
    for bad in (math.nan, math.inf, "nan", "x", None):
        with pytest.raises(ValueError, match="^top_p must be"):
            OPTIONS["top_p"].clamp(bad)
