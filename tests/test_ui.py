"""The demo's callbacks as plain functions: no server, no browser."""
from __future__ import annotations

import html
import json

import numpy as np
import pytest

from chatbot import ui
from chatbot.inference import EMPTY_PROMPT, Candidate, Reply
from chatbot.search import STRATEGIES, DecodeOptions

MSG = "오늘 너무 힘들었어"


def ticks(fig, axis: str = "x") -> list[str]:
    """Tick labels as the browser shows them (plotly turns entities back into characters)."""
    return [html.unescape(t) for t in getattr(fig.layout, f"{axis}axis").ticktext]


class NoModel:
    """A bot that fails the test if the model is run."""

    def stream(self, *a, **k):
        raise AssertionError("the model must not run")

    reply = stream


def parts(history: list[dict]) -> list[dict]:
    """``history`` as gradio hands it to a callback: every content a list of text parts."""
    def as_parts(content):
        return [{"type": "text", "text": c} for c in (content if isinstance(content, list) else [content])]
    return [{"role": m["role"], "metadata": None, "content": as_parts(m["content"]), "options": None} for m in history]


class Clock:
    """A fake monotonic clock: every reading is ``tick`` seconds after the one before."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


LONG = dict(strategy="greedy", min_len=80, max_len=80)  # an 80-piece reply, whatever the model


def test_stream_yields_a_heatmap_that_grows_one_row_per_piece(tiny_bot):
    full = tiny_bot.reply(MSG)
    outs = list(ui.chat_stream(tiny_bot, MSG, [], [], throttle=ui.FigureThrottle(0.0, 0.0)))  # unthrottled
    streamed = outs[1:-1]  # first: the "thinking" placeholder; last: the finished turn
    assert len(streamed) == len(full.reply_tokens)
    for n, (history, fig, turns) in enumerate(streamed, 1):
        heat = fig.data[0]
        assert heat.type == "heatmap" and len(heat.z) == n == len(heat.y)
        assert ticks(fig, "y") == full.reply_tokens[:n]
        assert ticks(fig) == full.source_tokens and list(heat.x) == list(range(len(full.source_tokens)))
        assert (heat.zmin, heat.zmax) == (0.0, 1.0)
        np.testing.assert_allclose(np.sum(heat.z, axis=1), 1.0, atol=1e-3)
        assert history[-2] == {"role": "user", "content": MSG} and history[-1]["role"] == "assistant"
        assert turns == []  # a turn is recorded once finished
    history, fig, turns = outs[-1]
    assert history[-1]["content"] == full.text
    assert len(turns) == 1 and turns[0].message == MSG and turns[0].reply.text == full.text
    assert "NanumGothic" in fig.layout.font.family
    # hover names both pieces and the weight
    assert fig.data[0].customdata[0][0] == [full.source_tokens[0], full.reply_tokens[0]]
    assert "%{z" in fig.data[0].hovertemplate


def test_a_long_reply_streams_text_every_piece_and_a_heatmap_at_most_every_interval(tiny_bot):
    clock = Clock(0.02)  # each piece reads the clock once, twice when it builds a heatmap
    outs = list(ui.chat_stream(tiny_bot, MSG, [], [], throttle=ui.FigureThrottle(clock=clock), **LONG))
    pieces, (history, final, turns) = outs[1:-1], outs[-1]
    assert len(pieces) == 80 == len(turns[0].reply.reply_tokens)
    texts = [h[-1]["content"] for h, _, _ in pieces]
    assert texts[-1] == html.escape(turns[0].reply.text, quote=False)
    assert history[-1]["content"] == texts[-1] + "\n" + ui.unfinished_note(turns[0].reply)  # 80 = max_len: cut
    sent = [(n, fig) for n, (_, fig, _) in enumerate(pieces, 1) if fig is not None]
    assert 3 <= len(sent) <= clock.now / ui.FIGURE_INTERVAL + 1, (len(sent), clock.now)
    assert all(b - a >= ui.FIGURE_INTERVAL / 0.02 - 1 for (a, _), (b, _) in zip(sent, sent[1:]))  # pieces apart
    assert all(len(fig.data[0].z) == n for n, fig in sent)  # each is the heatmap of the reply so far
    assert len(final.data[0].z) == 80  # the last yield always carries the finished heatmap


def test_building_heatmaps_takes_a_bounded_share_of_the_stream(tiny_bot, monkeypatch):
    clock, build = Clock(0.01), ui.reply_figure
    built: list[float] = []

    def slow_figure(reply):  # a heatmap that takes half a second to build, as a big one on a busy CPU might
        clock.now += 0.5
        built.append(0.5)
        return build(reply)

    monkeypatch.setattr(ui, "reply_figure", slow_figure)
    outs = list(ui.chat_stream(tiny_bot, MSG, [], [], throttle=ui.FigureThrottle(clock=clock), **LONG))
    assert len(outs) == 82 and outs[-1][1] is not None
    streamed = sum(built[:-1])  # the last build is the finished heatmap, always sent
    assert streamed <= clock.now / (1 + ui.FIGURE_SHARE) + 0.5, (built, clock.now)


def test_a_short_reply_sends_only_its_finished_heatmap(tiny_bot):
    outs = list(ui.chat_stream(tiny_bot, MSG, [], [], throttle=ui.FigureThrottle(clock=lambda: 0.0)))
    assert all(fig is None for _, fig, _ in outs[1:-1])
    assert len(outs[-1][1].data[0].z) == len(outs[-1][2][0].reply.reply_tokens)


def test_repeated_source_pieces_keep_their_own_columns():
    src, rep = ["ㅋ", "ㅋ", "ㅋ"], ["네"]
    fig = ui.attention_figure(src, rep, np.array([[0.2, 0.3, 0.5]]))
    assert list(fig.data[0].x) == [0, 1, 2] and ticks(fig) == src


@pytest.mark.parametrize("message", ["", "   \n", None, [{"type": "text", "text": "  "}]])
def test_empty_message_yields_a_prompt_without_a_model_call(message):
    outs = list(ui.chat_stream(NoModel(), message, [{"role": "user", "content": [{"type": "text", "text": "안녕"}]}], []))
    assert len(outs) == 1
    history, _, turns = outs[0]
    assert history == [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": EMPTY_PROMPT}]
    assert turns == []


def test_repeated_empty_sends_leave_one_prompt():
    history = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "응"}]
    for message in ["", " ", ""]:
        (history, _, _), = ui.chat_stream(NoModel(), message, parts(history), [])
    assert history == [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "응"},
                       {"role": "assistant", "content": EMPTY_PROMPT}]


def test_each_reply_names_the_model_that_answered(tiny_bot):
    *_, (history, _, turns) = ui.chat_stream(tiny_bot, MSG, [], [], model="default")
    *_, (history, _, turns) = ui.chat_stream(tiny_bot, "안녕", parts(history), turns, model="<b>b</b>")
    assert history[1]["content"] == html.escape(turns[0].reply.text, quote=False) + "\n<small>— default</small>"
    assert history[3]["content"].endswith("\n<small>— &lt;b&gt;b&lt;/b&gt;</small>")  # escaped like any text
    assert [t.model for t in turns] == ["default", "<b>b</b>"]
    assert [label for label, _ in ui.turn_choices(turns)] == [f"1. {MSG} · default", "2. 안녕 · <b>b</b>"]
    *_, (history, _, turns) = ui.chat_stream(tiny_bot, MSG, [], [])  # one model loaded: no label
    assert "<small>" not in history[-1]["content"] and ui.turn_choices(turns)[0][0] == f"1. {MSG}"


def test_message_with_no_pieces_gets_the_prompt_and_no_turn(tiny_bot):
    history, _, turns = list(ui.chat_stream(tiny_bot, "\u200b\u200b", [], []))[-1]
    assert history[-1]["content"] == EMPTY_PROMPT and turns == []


def test_long_message_is_cut_with_a_note_and_html_is_escaped(tiny_bot):
    history, _, turns = list(ui.chat_stream(tiny_bot, "<b>안녕</b>" + "가" * 10_000, [], []))[-1]
    assert history[0]["content"].startswith("&lt;b&gt;안녕&lt;/b&gt;")
    assert len(turns[0].message) == ui.MAX_INPUT_CHARS
    n = tiny_bot.max_source_len
    assert history[-1]["content"].endswith(ui.truncated_note(turns[0].reply))
    assert f"앞 {n}조각 ≈ {turns[0].reply.source_chars}자만 읽었어요" in history[-1]["content"]
    out = ui.reply_json(tiny_bot, "가" * 10_000)
    assert out["truncated"] and f"앞 {n}조각" in out["note"]
    short = ui.reply_json(tiny_bot, "안녕")
    assert not short["truncated"] and "note" not in short


def test_a_reply_cut_at_the_length_limit_says_so(tiny_bot):
    """A reply that stops at max_len without </s> (a loop, often) is marked in the chat, the API and the
    stream; one that ends itself is not."""
    history, _, turns = list(ui.chat_stream(tiny_bot, "오늘 너무 힘들었어", [], [], max_len=1))[-1]
    reply = turns[0].reply
    assert not reply.finished and len(reply.reply_tokens) == 1
    assert history[-1]["content"].endswith(ui.unfinished_note(reply)) and "최대 길이 1조각에서 멈췄어요" in history[-1]["content"]
    assert tiny_bot.reply("오늘 너무 힘들었어", max_len=1).finished is False  # decoded, not streamed: the same flag
    assert ui.reply_json(tiny_bot, "오늘 너무 힘들었어", max_len=1)["finished"] is False
    full = tiny_bot.reply("오늘 너무 힘들었어")
    if full.finished:  # the tiny model ends this reply by itself within max_len
        assert ui.unfinished_note(full) == "" and ui.reply_json(tiny_bot, "오늘 너무 힘들었어")["finished"] is True


def test_history_parts_are_flattened():
    hist = ui.normalize_history([{"role": "user", "content": [{"type": "text", "text": "오늘 "}, {"text": "좋다"}]},
                                 {"role": "assistant", "content": "응"}])
    assert hist == [{"role": "user", "content": "오늘 좋다"}, {"role": "assistant", "content": "응"}]


def test_decoding_controls_map_to_decode_options():
    kw = ui.decoding_kwargs("beam", 4.0, 0.7, 10.0, 0.9, 30.0, 2.0, 0.6, 1.2)
    opts = DecodeOptions(**kw)
    assert (opts.strategy, opts.beam_size, opts.n_best, opts.top_k, opts.max_len, opts.no_repeat_ngram) == (
        "beam", 4, 4, 10, 30, 2)
    assert DecodeOptions(**ui.decoding_kwargs("nonsense")).strategy == "greedy"


def test_decoding_controls_take_their_defaults_clamp_and_reject_non_finite_numbers():
    defaults = DecodeOptions()
    assert DecodeOptions(**ui.decoding_kwargs()) == defaults  # nothing sent: DecodeOptions' defaults
    kw = ui.decoding_kwargs("sample", 99, 0.0, -3, 5.0, 500, 9, 7, 0)  # API clients may send anything
    assert (kw["beam_size"], kw["temperature"], kw["top_k"], kw["top_p"], kw["max_len"], kw["no_repeat_ngram"],
            kw["length_penalty"], kw["repetition_penalty"]) == (10, 0.05, 0, 1.0, 80, 5, 2.0, 1.0)
    assert isinstance(kw["max_len"], int) and isinstance(kw["top_p"], float)
    DecodeOptions(**kw)
    assert ui.decoding_kwargs("beam", 4.6)["n_best"] == 4  # beam search returns every beam
    for name in ui.CONTROLS[1:]:
        for bad in (float("nan"), float("inf"), "many"):
            with pytest.raises(ValueError, match=f"^{name} must be"):
                ui.decoding_kwargs(**{name: bad})
    assert [value for _, value in ui.STRATEGY_CHOICES] == list(STRATEGIES)


def test_step_inspector_shows_candidates_beside_the_attention_row(tiny_bot):
    reply = tiny_bot.reply(MSG)
    fig = ui.step_figure(reply, 2)
    cands, row = fig.data
    assert list(cands.y) == [round(c.prob, 4) for c in reply.candidates[1]]
    assert ticks(fig, "x") == [c.piece for c in reply.candidates[1]]
    assert [html.unescape(t) for t in fig.layout.xaxis2.ticktext] == reply.source_tokens
    np.testing.assert_allclose(row.y, reply.attention[1], atol=1e-4)
    assert ui.step_figure(reply, 999).data[1].y == ui.step_figure(reply, len(reply.reply_tokens)).data[1].y


def test_beam_nbest_table_and_each_hypothesis_has_its_heatmap(tiny_bot):
    kw = ui.decoding_kwargs("beam", 3)
    *_, (history, fig, turns) = ui.chat_stream(tiny_bot, MSG, [], [], **kw)
    view = ui.turn_view(turns)
    assert [r[0] for r in view.nbest] == [1, 2, 3]
    scores = [float(r[2]) for r in view.nbest]
    assert scores == sorted(scores, reverse=True)
    assert all(len(r[2].split(".")[1]) == 4 for r in view.nbest)  # four decimals each, so the column lines up
    hyp = turns[0].reply.n_best[2]
    second = ui.turn_view(turns, 0, hypothesis=2)
    assert len(second.heatmap.data[0].z) == len(hyp.reply_tokens) == second.steps
    assert ui.shown_reply(turns, 0, 2) is hyp


def test_no_turn_has_no_steps_to_inspect(tiny_bot):
    assert ui.turn_view([]).steps == 0 and ui.turn_view([]).status == ""
    *_, (_, _, turns) = ui.chat_stream(tiny_bot, MSG, [], [], **LONG)
    assert ui.turn_view(turns).steps == 80
    assert "`·` = 띄어쓰기" in ui.PIECES_LEGEND and "`</s>` = 답변 끝" in ui.PIECES_LEGEND


def test_turn_history_brings_back_an_earlier_heatmap(tiny_bot):
    turns: list = []
    for msg in ["안녕", MSG]:
        *_, (_, _, turns) = ui.chat_stream(tiny_bot, msg, [], turns)
    assert [label for label, _ in ui.turn_choices(turns)] == ["1. 안녕", f"2. {MSG}"]
    first = ui.turn_view(turns, 0)
    assert ticks(first.heatmap) == turns[0].reply.source_tokens
    assert ticks(ui.turn_view(turns).heatmap) == turns[1].reply.source_tokens  # default: the last turn


def test_no_attention_model_gets_a_note_not_a_heatmap():
    reply = Reply("네", ["안녕"], ["네"], None, [[Candidate("네", 0.9)]])
    fig = ui.reply_figure(reply)
    assert not fig.data and fig.layout.annotations[0].text.replace("<br>", " ") == ui.NO_ATTENTION_NOTE
    assert max(len(line) for line in fig.layout.annotations[0].text.split("<br>")) <= 30  # fits a column
    assert len(ui.step_figure(reply, 1).data) == 1  # candidates only
    assert ui.NO_ATTENTION_NOTE in ui.turn_view([ui.Turn("안녕", reply)]).status


def test_compare_answers_with_every_bot(tiny_bot):
    out = ui.compare({"a": tiny_bot, "b": tiny_bot}, MSG)
    full = tiny_bot.reply(MSG)
    assert [text for text, _ in out] == [full.text, full.text]
    assert all(ticks(fig) == full.source_tokens for _, fig in out)
    assert [text for text, _ in ui.compare({"a": NoModel()}, "  ")] == [EMPTY_PROMPT]


def test_about_tab_card_and_training_curves(tiny_bot):
    assert ui.model_card(tiny_bot).startswith("# ")
    names = [t.name for t in ui.training_figure(tiny_bot.path).data]
    assert names == ["train loss (step)", "train loss (epoch)", "val loss", "val ppl"]
    assert ui.training_figure(None).layout.annotations


def test_training_curves_show_validation_chrf_when_the_run_chose_by_it(tmp_path):
    rows = [{"step": 50, "epoch": 1, "train_loss": 5.0},
            {"epoch": 1, "step": 80, "train_loss": 4.8, "val_loss": 4.5, "val_ppl": 90.0, "val_chrf": 7.5},
            {"epoch": 2, "step": 160, "train_loss": 4.1, "val_loss": 4.2, "val_ppl": 66.7, "val_chrf": 9.25}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    fig = ui.training_figure(tmp_path)
    chrf = next(t for t in fig.data if t.name == "val chrF")
    assert list(chrf.x) == [80, 160] and list(chrf.y) == [7.5, 9.25]
    assert chrf.yaxis != next(t for t in fig.data if t.name == "val loss").yaxis  # its own panel
    assert "c_t = \\sum_s" in ui.ATTENTION_EXPLAINED and "\\tanh" in ui.ATTENTION_EXPLAINED


def test_ui_does_not_import_gradio():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ui))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "gradio" not in imported


def test_topic_control_maps_to_a_label_and_the_status_names_the_topic(tiny_bot, tiny_topic_checkpoint):
    from chatbot.inference import ChatBot

    topic_bot = ChatBot.from_checkpoint(tiny_topic_checkpoint, device="cpu")
    assert [v for _, v in ui.topic_choices(topic_bot)] == [ui.TOPIC_AUTO, "0", "1", "2"]
    assert [ui.topic_id(v, topic_bot) for v in (ui.TOPIC_AUTO, "0", "2", "3", None, "x")] == [None, 0, 2, None,
                                                                                              None, None]
    assert ui.topic_id("1", tiny_bot) is None  # a model that reads no topic gets none
    *_, (history, _, turns) = ui.chat_stream(topic_bot, "헤어진 지 한 달 됐어", [], [], 2)
    assert turns[-1].reply.topic.label == 2 and history[-1]["content"] == literal_reply(topic_bot, 2)
    status = ui.turn_view(turns).status
    assert topic_bot.topic_names[2] in status and "선택 chosen" in status
    *_, (_, _, turns) = ui.chat_stream(topic_bot, "헤어진 지 한 달 됐어", [], [])
    assert "자동 예측 auto" in ui.turn_view(turns).status
    out = ui.reply_json(topic_bot, "헤어진 지 한 달 됐어", 1)
    assert out["topic_id"] == 1 and out["topic_source"] == "given"
    (text, _), = ui.compare({"topic": topic_bot}, "헤어진 지 한 달 됐어")
    assert "자동 예측 auto" in text and "주제 입력" in ui.describe(topic_bot)
    *_, (_, _, plain_turns) = ui.chat_stream(tiny_bot, MSG, [], [], 1)
    assert plain_turns[-1].reply.topic is None and "주제" not in ui.turn_view(plain_turns).status


def literal_reply(bot, label: int) -> str:
    return html.escape(bot.reply("헤어진 지 한 달 됐어", topic=label).text, quote=False)


def test_one_topic_radio_serves_every_model(tiny_bot, tiny_topic_checkpoint):
    from chatbot.inference import ChatBot

    topic_bot = ChatBot.from_checkpoint(tiny_topic_checkpoint, device="cpu")
    assert ui.topic_choices([tiny_bot, topic_bot]) == ui.topic_choices(topic_bot)
    assert ui.topic_choices(tiny_bot) == [("자동 auto", ui.TOPIC_AUTO)]



class FakeTime:
    """A clock that only moves when slept on (or when a test moves it): replays run at once."""

    def __init__(self):
        self.now, self.slept = 0.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_replay_redraws_a_turns_heatmap_row_by_row_at_the_chosen_pace(tiny_bot):
    turns: list = []
    for msg in [MSG, "주말에 뭐 하지"]:
        *_, (_, final, turns) = ui.chat_stream(tiny_bot, msg, [], turns, **LONG)
    reply = turns[0].reply
    t = FakeTime()
    frames = list(ui.replay(turns, 0, 0, 4, sleep=t.sleep, clock=t.clock))  # the first turn, 4 pieces a second
    assert [len(f.data[0].z) for f in frames] == list(range(1, len(reply.reply_tokens) + 1))
    for n, fig in enumerate(frames, 1):
        assert ticks(fig, "y") == reply.reply_tokens[:n] and ticks(fig) == reply.source_tokens
        np.testing.assert_allclose(fig.data[0].z, np.round(reply.attention[:n], 4))
    assert frames[-1].to_plotly_json() == ui.turn_view(turns, 0).heatmap.to_plotly_json()  # ends on the finished one
    assert t.slept == pytest.approx([0.25] * (len(frames) - 1)) and t.now == pytest.approx((len(frames) - 1) / 4)
    last = list(ui.replay(turns, None, 0, 4, sleep=t.sleep, clock=t.clock))[-1]  # default: the last turn
    assert last.to_plotly_json() == final.to_plotly_json()


def test_replay_pace_is_bounded_and_a_slow_build_never_bunches_frames():
    low, high, default = ui.REPLAY_PACE
    assert [ui.replay_pace(p) for p in (0, -5, 1e9, float("nan"), float("inf"), None, "x", 2)] == [
        low, low, high, default, default, default, default, 2.0]
    reply = Reply("네 네 네", ["안녕"], ["네", "▁네", "▁네", "</s>"], np.ones((4, 1)))
    t, frames = FakeTime(), []
    for fig in ui.replay([ui.Turn("안녕", reply)], 0, 0, high, sleep=t.sleep, clock=t.clock):
        frames.append(fig)
        t.now += 1.0 if len(frames) == 1 else 0.0  # the first frame took a second to build and send
    # behind time, the second frame goes at once; the rest keep the pace again (no burst to catch up)
    assert len(frames) == 4 and t.slept == pytest.approx([1 / high] * 2)
    t = FakeTime()
    list(ui.replay([ui.Turn("안녕", reply)], 0, 0, 1e9, sleep=t.sleep, clock=t.clock))
    assert t.slept == pytest.approx([1 / high] * 3)  # the fastest pace there is


def test_replay_shows_the_chosen_hypothesis_and_once_what_cannot_grow(tiny_bot):
    *_, (_, _, turns) = ui.chat_stream(tiny_bot, MSG, [], [], **ui.decoding_kwargs("beam", 3))
    hyp = turns[0].reply.n_best[2]
    frames = list(ui.replay(turns, 0, 2, 10, sleep=lambda s: None))
    assert [ticks(f, "y") for f in frames] == [hyp.reply_tokens[:n] for n in range(1, len(hyp.reply_tokens) + 1)]
    no_attention = Reply("네", ["안녕"], ["네", "</s>"], None, [[Candidate("네", 0.9)]] * 2)
    (only,) = ui.replay([ui.Turn("안녕", no_attention)], 0, 0, 3, sleep=NoModel.stream)
    assert only.layout.annotations[0].text.replace("<br>", " ") == ui.NO_ATTENTION_NOTE
    (empty,) = ui.replay([], None, 0, 3, sleep=NoModel.stream)  # no turn yet: the placeholder, no waiting
    assert not empty.data and empty.layout.annotations


def test_a_long_messages_labels_are_turned_and_its_attention_row_gets_the_full_width():
    src = [f"조각{i}" for i in range(48)]
    reply = Reply("네", src, ["네", "</s>"], np.full((2, 48), 1 / 48), [[Candidate("네", 0.9)]] * 2)
    heat, step = ui.reply_figure(reply), ui.step_figure(reply, 1)
    assert ticks(heat) == src and heat.layout.xaxis.tickangle == -90  # every piece labelled, turned
    assert [c[0] for c in heat.data[0].customdata[0]] == src  # and named in the hover (the page may hide labels)
    assert [html.unescape(t) for t in step.layout.xaxis2.ticktext] == src and step.layout.xaxis2.tickangle == -90
    assert step.layout.xaxis2.domain[1] - step.layout.xaxis2.domain[0] == 1.0  # under the candidates, not beside
    assert step.layout.height > ui.step_figure(Reply("네", src[:5], ["네"], np.full((1, 5), 0.2),
                                                     [[Candidate("네", 0.9)]]), 1).layout.height
    short = ui.reply_figure(Reply("네", src[:ui.UPRIGHT_PIECES], ["네"], np.full((1, 12), 1 / 12)))
    assert short.layout.xaxis.tickangle == 0  # a short message's labels stay upright


def test_the_attention_of_each_epoch_and_a_note_for_a_checkpoint_trained_before_it_was_kept(tiny_checkpoint,
                                                                                            tmp_path):
    from chatbot.checkpoint import read_metrics
    from chatbot.train import ATTENTION_PROBES, PROBE_KEY

    epochs = ui.probe_epochs(tiny_checkpoint)
    assert epochs == [r["epoch"] for r in read_metrics(tiny_checkpoint) if "val_loss" in r] and len(epochs) >= 2
    assert ui.probe_messages(tiny_checkpoint) == list(ATTENTION_PROBES)
    for k, message in enumerate(ATTENTION_PROBES):
        first, last = (ui.epoch_figure(tiny_checkpoint, k, e) for e in (epochs[0], epochs[-1]))
        assert first.layout.title.text == f"에폭 epoch {epochs[0]} / {epochs[-1]} · {message}"
        assert last.layout.title.text.startswith(f"에폭 epoch {epochs[-1]} / ")
        assert first.data[0].z != last.data[0].z  # the attention moved over training
        entry = ui.probe_log(tiny_checkpoint)[epochs[-1]][k]
        assert ticks(last) == entry["source"] and ticks(last, "y") == entry["reply"]  # attention_figure's axes
    # a slider value between or past the recorded epochs shows the nearest one; bad input the last
    assert ui.epoch_figure(tiny_checkpoint, 0, epochs[-1] + 5).layout.title.text.startswith(f"에폭 epoch {epochs[-1]} ")
    assert ui.epoch_figure(tiny_checkpoint, 99, "x").layout.title.text.endswith(ATTENTION_PROBES[-1])
    # the same log without the probes, as a checkpoint trained before they were kept has it
    rows = [{k: v for k, v in r.items() if k != PROBE_KEY} for r in read_metrics(tiny_checkpoint)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    for old in (tmp_path, None):
        assert ui.probe_epochs(old) == [] and ui.probe_messages(old) == []
        note = ui.epoch_figure(old, 0, 1)
        assert not note.data and "trained before" in note.layout.annotations[0].text.replace("<br>", " ")
