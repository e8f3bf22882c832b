"""ChatBot: replies with their attention, streaming, odd messages."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from chatbot.batching import MAX_MESSAGE_CHARS
from chatbot.inference import EMPTY_PROMPT
from corpus import BASE_PAIRS


def test_reply_has_pieces_and_attention(tiny_bot):
    r = tiny_bot.reply("헤어졌어")
    assert r.generated and r.text.strip()
    assert r.source_tokens == tiny_bot.tokenizer.display_pieces(tiny_bot.tokenizer.encode("헤어졌어"))
    assert r.attention.shape == (len(r.reply_tokens), len(r.source_tokens))
    np.testing.assert_allclose(r.attention.sum(1), 1.0, atol=1e-5)
    assert all("▁" not in p for p in r.source_tokens + r.reply_tokens)
    assert len(r.candidates) == len(r.reply_tokens) and all(len(c) == 5 for c in r.candidates)
    d = r.to_dict()
    assert set(d) >= {"reply", "source_tokens", "reply_tokens", "attention"}
    assert isinstance(d["attention"], list) and isinstance(d["attention"][0][0], float)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_stream_grows_one_row_per_piece_and_ends_at_the_full_reply(tiny_bot, strategy):
    opts = {"strategy": strategy, "seed": 3} if strategy != "beam" else {"strategy": "beam", "beam_size": 3, "n_best": 3}
    *steps, last = list(tiny_bot.stream("오늘 날씨 좋다", **opts))
    assert steps and last.done and not any(s.done for s in steps)
    for i, s in enumerate(steps, 1):
        assert len(s.reply.reply_tokens) == i and s.reply.attention.shape[0] == i
        assert s.piece == s.reply.reply_tokens[-1]
        np.testing.assert_allclose(s.attention, s.reply.attention[-1])
    full = tiny_bot.reply("오늘 날씨 좋다", **opts)
    assert last.reply.text == full.text and last.reply.reply_tokens == full.reply_tokens
    assert last.reply.score == pytest.approx(full.score, abs=1e-5)  # one score: </s> included in both
    np.testing.assert_allclose(last.reply.attention, full.attention, atol=1e-6)
    if strategy == "beam":
        assert len(full.n_best) == 3 and len(last.reply.n_best) == 3


@pytest.mark.parametrize("message", ["", "   ", "\u200b\u200b", "\x00", "\n\t"])
def test_empty_messages_get_a_prompt_without_running_the_model(tiny_bot, message):
    r = tiny_bot.reply(message)
    assert not r.generated and r.text == EMPTY_PROMPT and r.attention is None
    [final] = list(tiny_bot.stream(message))  # the final step alone
    assert final.done and not final.reply.generated and final.reply.text == EMPTY_PROMPT


@pytest.mark.parametrize("message", ["😀😀", "<script>alert(1)</script>", "a\x00b", "\u202e거꾸로", "ㅋㅋㅋㅋ",
                                     "안녕" * 5000])
def test_odd_messages_always_get_a_reply(tiny_bot, message):
    r = tiny_bot.reply(message)
    assert isinstance(r.text, str) and r.generated
    assert len(r.source_tokens) <= tiny_bot.max_source_len
    assert r.attention.shape == (len(r.reply_tokens), len(r.source_tokens))


def test_long_messages_are_truncated_with_a_flag(tiny_bot):
    r = tiny_bot.reply("안녕 " * (MAX_MESSAGE_CHARS))
    assert r.truncated and len(r.source_tokens) == tiny_bot.max_source_len
    assert not tiny_bot.reply("안녕").truncated
    exact = " ".join(["안녕"] * 200)  # cut to exactly max_source_len pieces: nothing dropped, not truncated
    ids = tiny_bot.tokenizer.encode(exact)[: tiny_bot.max_source_len]
    assert not tiny_bot.reply(tiny_bot.tokenizer.decode(ids)).truncated


def test_batch_matches_single_replies(tiny_bot):
    msgs = ["안녕", "헤어졌어", "", "고백할까"]
    batch = tiny_bot.reply_batch(msgs)
    assert [r.text for r in batch] == [tiny_bot.reply(m).text for m in msgs]


def test_int8_quantized_bot_gives_valid_replies_and_streams(tiny_checkpoint):
    from chatbot.inference import ChatBot

    bot = ChatBot.from_checkpoint(tiny_checkpoint, device="cpu", quantize=True)
    assert bot.quantized and "quantized" in type(bot.model.decoder_rnn).__module__
    assert type(bot.model.combine) is torch.nn.Linear  # small layers stay fp32 (int8 would be slower)
    for strategy in ("greedy", "beam"):
        r = bot.reply("헤어졌어", strategy=strategy)
        assert r.attention.shape == (len(r.reply_tokens), len(r.source_tokens))
        np.testing.assert_allclose(r.attention.sum(1), 1.0, atol=1e-5)
    steps = list(bot.stream("헤어졌어"))
    assert steps[-1].done and steps[-1].reply.text == bot.reply("헤어졌어").text
    assert not ChatBot.from_checkpoint(tiny_checkpoint, device="cpu").quantized  # auto: tiny models stay fp32


def test_the_encoder_neighbour_probe_finds_each_training_question_itself(tiny_bot):
    from chatbot.evaluate import encoder_keys, encoder_neighbour_answers

    questions = list(dict.fromkeys(q for q, _, _ in BASE_PAIRS))[:12]
    answers = [f"answer {i}" for i in range(len(questions))]  # one per question: a miss shows
    keys = encoder_keys(tiny_bot, questions, batch_size=5)  # batches of 5: padding must not matter
    assert keys.shape == (len(questions), tiny_bot.config.model.hidden_dim * 2)
    torch.testing.assert_close(keys, encoder_keys(tiny_bot, questions[::-1])[range(len(questions) - 1, -1, -1)])
    assert encoder_neighbour_answers(tiny_bot, questions, answers, questions) == answers
    assert encoder_neighbour_answers(tiny_bot, questions, answers, questions[3:5]) == answers[3:5]
