"""The Gradio demo: a chat that streams replies beside a live attention heatmap.

The only module that imports gradio. The callbacks are plain functions in
:mod:`chatbot.ui`; here they are wired to components, and ``launch`` sets the serving
limits (queue size, concurrency x torch threads <= cores, blocked paths, bind address).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qs

import gradio as gr
import torch
from starlette.middleware import Middleware

from . import ui
from .inference import ChatBot
from .search import OPTIONS

TORCH_THREADS = 1  # per request; concurrency = cores // threads so requests never oversubscribe the CPU
QUEUE_SIZE = 32
MAX_FILE_SIZE = 0  # the demo takes no uploads: RequestLimits refuses /upload, and gradio would take no byte
MAX_BODY_BYTES = 1024 * 1024  # a request body at most; a chat of ui.MAX_HISTORY_MESSAGES messages needs under 0.7 MB
MAX_SESSION_HASH = 128  # characters; gradio keys per-session state by it (the page sends 11, gradio_client 36)
SESSION_CAPACITY = 64  # sessions whose state the server keeps, least recently used dropped first (gradio: 10,000
# of ~120 KB each, its copy of the page's config, plus the chat's turns)
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]
THEME_FONT = ["NanumGothic", "Noto Sans KR", "Malgun Gothic", "Apple SD Gothic Neo", "sans-serif"]
CSS = """
#heatmap, #step-plot { min-height: 240px; }
.gradio-container { max-width: 1400px !important; }
.katex-display { overflow-x: auto; overflow-y: hidden; padding-bottom: 2px; }
.model-card table { display: block; overflow-x: auto; }
.model-card td, .model-card th { white-space: nowrap; }
/* a phone stacks the columns: the heatmap follows the chat, the settings and the API come after it */
@media (max-width: 767px) {
  #chat-row { flex-direction: column; flex-wrap: nowrap; }
  #chat-col { display: contents; }
  #chat-row > *, #chat-col > * { width: 100%; min-width: 0; }
  #view-col { order: 1; }
  #chat-row .chat-extras { order: 2; }
}
"""
# Run once when the page loads (launch's js=); every change to the page (re)attaches plotly listeners to each
# plot (a plot's div may be re-created; removing a listener first keeps it attached once):
# - a click on a heatmap cell (or on a recall model's copy strip) moves the step inspector to that cell's
#   reply piece. gr.Plot has no click event, so the click is plotly's own ``plotly_click``; the step slider is
#   set as a person would set it (an input event), which runs the slider's own inspect_step event;
# - hovering a heatmap cell marks the source pieces its reply piece attended to (weight >= HIGHLIGHT, and the
#   most attended one): their labels turn bold and orange until the pointer leaves;
# - after every drawing (``plotly_afterplot``: a new figure, a resize), x tick labels that would overlap other
#   labels are hidden, the least attended (or least probable) pieces' first, whatever the plot's width: the
#   columns attention goes to keep their names, no faint column's name stands where an attended one's was
#   hidden, and every piece stays in the hover (ui.source_ticks turns a long message's labels first, so that
#   few need hiding).
HIGHLIGHT = 0.1
PAGE_JS = """() => {
  const toStep = (e) => {
    const point = e && e.points && e.points[0];
    const slider = document.querySelector('#step input[type=range]');
    if (!point || !Number.isInteger(point.y) || !slider) return;
    slider.value = String(Math.min(point.y + 1, Number(slider.max)));
    slider.dispatchEvent(new Event('input', {bubbles: true}));
  };
  const mark = (plot, row) => {  // the heatmap's own x axis (a recall model's copy strip is on x2)
    const weights = row === null ? null : plot.data[0].z[row], top = weights && Math.max(...weights);
    plot.querySelectorAll('g.xtick').forEach((tick, i) => {
      const x = tick.__data__ && Number.isInteger(tick.__data__.x) ? tick.__data__.x : i;
      const on = weights !== null && (weights[x] >= HIGHLIGHT || weights[x] === top);
      const label = tick.querySelector('text');
      label.style.fill = on ? '#e6550d' : '';
      label.style.fontWeight = on ? 'bold' : '';
      label.classList.toggle('attended', on);
      // a label thinned away for room is shown while it is attended: the column must read as its own piece
      label.style.display = on || label.dataset.thinned !== '1' ? '' : 'none';
    });
    // ... and an unattended label it would overlap steps aside until the pointer leaves
    const shown = [...plot.querySelectorAll('g.xtick text')].filter((t) => t.style.display !== 'none');
    const marked = shown.filter((t) => t.classList.contains('attended')).map((t) => t.getBoundingClientRect());
    shown.filter((t) => !t.classList.contains('attended')).forEach((t) => {
      const b = t.getBoundingClientRect();
      if (marked.some((k) => b.left < k.right && k.left < b.right)) t.style.display = 'none';
    });
  };
  const weightsOn = (plot, axis) => {  // per tick value of x axis ``axis`` ('x', 'x2'): how much its traces put there
    const w = {};
    for (const d of plot.data || []) {
      if ((d.xaxis || 'x') !== axis || !d.x) continue;
      d.x.forEach((x, i) => {
        if (d.type === 'heatmap') w[x] = Math.max(w[x] || 0, ...(d.z || []).map((row) => row[i] || 0));
        else if (d.type === 'bar') w[x] = (w[x] || 0) + ((d.y || [])[i] || 0);  // stacked parts add up
      });
    }
    return w;
  };
  const thinTicks = (plot) => {
    for (const layer of plot.querySelectorAll('.xaxislayer-above')) {
      const ticks = [...layer.querySelectorAll('g[class$="tick"]')];  // xtick, x2tick, ...
      if (!ticks.length) continue;
      const w = weightsOn(plot, ticks[0].getAttribute('class').replace(/tick$/, ''));
      const labels = ticks.map((g, i) => [g.querySelector('text'), g.__data__ ? g.__data__.x : i]).filter(([t]) => t);
      labels.forEach(([t]) => { t.style.display = ''; t.dataset.thinned = ''; });
      // the labels of the most attended (most probable) pieces first; a label that would overlap one kept goes.
      // An attended piece's label, hidden, still holds its place: a faint neighbour's label beside its dark
      // column would read as that column's name
      const boxes = labels.map(([t, x]) => [t, t.getBoundingClientRect(), x]).filter(([, b]) => b.width > 0)
        .sort((a, b) => (w[b[2]] || 0) - (w[a[2]] || 0) || a[2] - b[2]);
      const taken = [];
      for (const [t, b, x] of boxes) {
        if (taken.some((k) => b.left < k.right + 1 && k.left < b.right + 1)) {
          t.style.display = 'none';
          t.dataset.thinned = '1';
          if ((w[x] || 0) >= HIGHLIGHT) taken.push(b);
        } else taken.push(b);
      }
    }
    // a recall model's group names (메시지 | 기억 1 · 유사도 score / question | ...): where two would overlap, every
    // name drops its question line (still in the name's hover), then, as long as need be, the word 유사도, the
    // score, and at last every other name moves up a line
    const names = [...plot.querySelectorAll('g.annotation')].filter((a) => /^(메시지|기억 \\d)/.test(a.textContent));
    const lines = (a) => {  // a one-line name has no tspan of its own
      const l = [...a.querySelectorAll('text.annotation-text tspan.line')];
      return l.length ? l : [...a.querySelectorAll('text.annotation-text')];
    };
    const crowded = () => {  // the boxes of the lines that show (a name's background box keeps its first size)
      const boxes = names.map((a) => lines(a).filter((l) => l.style.display !== 'none')
        .map((l) => l.getBoundingClientRect()).reduce((u, b) => ({left: Math.min(u.left, b.left),
          right: Math.max(u.right, b.right), width: u.width + b.width}), {left: Infinity, right: -Infinity, width: 0}))
        .filter((b) => b.width > 0).sort((a, b) => a.left - b.left);
      return boxes.some((b, i) => i > 0 && b.left < boxes[i - 1].right + 2);
    };
    names.forEach((a) => {
      a.style.transform = '';
      lines(a).forEach((l) => {
        l.style.display = '';
        if (l.dataset.full) l.textContent = l.dataset.full;
      });
    });
    const firstLines = (short) => names.forEach((a) => lines(a).slice(0, 1).forEach((l) => {
      if (!l.dataset.full) l.dataset.full = l.textContent;
      l.textContent = short(l.dataset.full);
    }));
    if (names.length > 1 && crowded()) {
      names.forEach((a) => lines(a).slice(1).forEach((l) => { l.style.display = 'none'; }));
      if (crowded()) firstLines((full) => full.replace(' · 유사도 ', ' · '));
      if (crowded()) firstLines((full) => full.split(' · ')[0]);
      if (crowded()) [...names].sort((a, b) => a.getBoundingClientRect().left - b.getBoundingClientRect().left)
        .forEach((a, i) => { if (i % 2) a.style.transform = 'translateY(-14px)'; });
    }
  };
  const listen = (plot, name, fn) => { plot.removeListener(name, fn); plot.on(name, fn); };
  const attach = () => {
    for (const plot of document.querySelectorAll('.js-plotly-plot')) {
      if (typeof plot.on !== 'function') continue;
      const fresh = !plot._page;
      plot._page = plot._page || {
        thin: () => thinTicks(plot),
        hover: (e) => {
          const point = e.points && e.points[0];
          if (point && point.curveNumber === 0 && point.data.type === 'heatmap') mark(plot, point.y);
        },
        unhover: () => mark(plot, null),
      };
      listen(plot, 'plotly_afterplot', plot._page.thin);
      if (fresh) plot._page.thin();
      if (plot.closest('#heatmap')) {
        listen(plot, 'plotly_click', toStep);
        listen(plot, 'plotly_hover', plot._page.hover);
        listen(plot, 'plotly_unhover', plot._page.unhover);
      }
    }
  };
  new MutationObserver(attach).observe(document.body, {childList: true, subtree: true});
  attach();
}""".replace("HIGHLIGHT", str(HIGHLIGHT))
LENGTH_PLOT = Path("docs/chrf_by_length.png")  # made by: python -m chatbot evaluate ... --plot (app.py passes its own)
LENGTH_PLOT_TEXT = """### 질문이 길어지면 어텐션이 더 중요해질까? · Does attention matter more for longer questions?
고정된 context vector 하나(어텐션 없음)와 어텐션 모델, 비슷한 학습 질문의 답을 함께 읽는 기억(recall) 모델의 chrF를
질문 길이별로 비교했어요 (테스트 분할). (chrF of replies by question length on the test split: attention vs. the
fixed-context baseline, the recall model, and the TF-IDF lookup it reads from.)"""
INTRO = """# 한국어 어텐션 챗봇 · Korean attention seq2seq chatbot
메시지를 보내면 답변이 한 조각씩 나타나고, 히트맵(넓은 화면에서는 옆, 휴대폰에서는 아래)에 조각마다 한 행씩
어텐션이 그려집니다. 답변 중에는 1초에 몇 번씩 갱신되고, ▶ 다시 보기로 한 행씩 원하는 속도로 다시 볼 수 있어요.
(Replies stream piece by piece and the heatmap gets one row per piece, redrawn a few times a second while
the reply streams; ▶ replay grows it again row by row at your pace.)"""


def concurrency(threads: int = TORCH_THREADS) -> int:
    """Requests served at once so that requests x torch threads <= CPU cores."""
    return max(1, (os.cpu_count() or 1) // max(1, threads))


MODEL_GROUPS = {"chat": "chat", "reply": "reply", "compare": "reply"}  # api_name -> the model group it runs in
REPLAY_CONCURRENCY = 4  # replays drawn at once: each sleeps between frames of ~50 ms (ui.replay)
CHAT_QUEUE_SHARE = 0.75  # of the queue that streamed chats may hold: a crowd of them leaves /reply room


def model_limits(total: int | None = None) -> dict[str, int]:
    """Requests at once per model group: ``total`` (default: :func:`concurrency`) split between streamed
    chats and one-shot replies (/reply, /compare), at least 1 each, so that a crowd of long chats never
    makes /reply wait behind it and the two together keep requests x torch threads <= cores (on 2 or more)."""
    n = total or concurrency()
    return {"chat": max(1, n // 2), "reply": max(1, n - n // 2)}


DECODING_ROWS = (("beam_size", "length_penalty"), ("temperature", "top_k"), ("top_p",),
                 ("max_len", "no_repeat_ngram"), ("repetition_penalty",))  # beam's, sampling's, every strategy's


def build_demo(bots: dict[str, ChatBot], length_plot: str | Path = LENGTH_PLOT) -> gr.Blocks:
    """The demo for already-loaded ``bots`` (name -> ChatBot; the first is the default); the About tab
    shows ``length_plot`` where that file exists."""
    if not bots:
        raise ValueError("build_demo needs at least one loaded ChatBot")
    with gr.Blocks(title="한국어 어텐션 챗봇", analytics_enabled=False) as demo:  # no telemetry calls home
        turns = gr.State([])  # per-session list[ui.Turn]
        hypothesis = gr.State(0)  # n-best row shown (0 = best)
        gr.Markdown(INTRO)
        with gr.Tabs():
            chat = _chat_tab(bots)
            compare = _compare_tab(bots)
            _about_tab(bots, Path(length_plot))
        _wire(Callbacks(bots), chat, compare, turns, hypothesis)
    return demo


@dataclass
class ChatTab:
    """The chat tab's components that events read or write."""

    model: gr.Dropdown
    topic: gr.Radio
    chat: gr.Chatbot
    msg: gr.Textbox
    send: gr.Button
    stop: gr.Button
    clear: gr.Button
    pending: gr.Textbox
    controls: list[gr.components.Component]  # in ui.CONTROLS order
    api_msg: gr.Textbox
    api_btn: gr.Button
    api_out: gr.JSON
    heatmap: gr.Plot
    status: gr.Markdown
    turn_pick: gr.Dropdown
    replay: gr.Button
    pace: gr.Slider
    nbest: gr.Dataframe
    step: gr.Slider
    step_plot: gr.Plot


@dataclass
class CompareTab:
    msg: gr.Textbox
    button: gr.Button
    outputs: list[gr.components.Component]  # (reply, heatmap) per model


def _chat_tab(bots: dict[str, ChatBot]) -> ChatTab:
    names = list(bots)
    with gr.Tab("대화 Chat", id="chat"):
        with gr.Row(equal_height=False, elem_id="chat-row"):
            with gr.Column(scale=5, elem_id="chat-col"):
                model = gr.Dropdown(ui.model_choices(bots), value=names[0], label="모델 checkpoint",
                                    visible=len(names) > 1, interactive=True)
                topic = gr.Radio(ui.topic_choices(list(bots.values())), value=ui.TOPIC_AUTO, label="주제 topic",
                                 info=ui.TOPIC_HELP, visible=bots[names[0]].reads_topic, elem_id="topic")
                chat = gr.Chatbot(label="대화 chat", height=440, render_markdown=False, sanitize_html=True,
                                  feedback_options=None, elem_id="chat", buttons=["copy"],
                                  group_consecutive_messages=False,  # a prompt never joins the reply above it
                                  placeholder="무엇이든 한국어로 말을 걸어 보세요. (Say something in Korean.)")
                with gr.Row():
                    msg = gr.Textbox(show_label=False, placeholder="메시지 + Enter (message)",
                                     max_length=ui.MAX_INPUT_CHARS, scale=6, autofocus=True, elem_id="msg")
                    send = gr.Button("보내기 Send", variant="primary", scale=1, min_width=90)
                    stop = gr.Button("멈춤 Stop", variant="stop", scale=1, min_width=90, visible=False)
                    clear = gr.Button("지우기 Clear", scale=1, min_width=90)
                pending = gr.Textbox(visible=False, label="message")  # the message being answered
                gr.Examples(ui.EXAMPLES, inputs=[msg], label="예시 examples", cache_examples=False,
                            api_name="load_example", api_visibility="private")
                controls = _decoding_controls()
                with gr.Accordion("API · JSON (/reply)", open=False, elem_classes=["chat-extras"]):
                    gr.Markdown("`gradio_client.Client(url).predict(\"안녕\", api_name=\"/reply\")` 와 같은 결과입니다.")
                    api_msg = gr.Textbox(label="message", max_length=ui.MAX_INPUT_CHARS, value="오늘 너무 힘들었어")
                    api_btn = gr.Button("JSON 보기 Show JSON")
                    api_out = gr.JSON(label="reply JSON")
            with gr.Column(scale=6, elem_id="view-col"):
                heatmap = gr.Plot(ui.reply_figure(None), label="어텐션 히트맵 attention heatmap", elem_id="heatmap",
                                  show_label=False)  # its badge covered the figure's top titles
                status = gr.Markdown("", elem_id="status")
                with gr.Row(equal_height=True):
                    turn_pick = gr.Dropdown([], value=None, label="이전 대화 보기 earlier turns", interactive=True,
                                            elem_id="turn-pick", scale=3)
                    replay, pace = _replay_controls()
                nbest = gr.Dataframe(headers=ui.NBEST_HEADERS, value=[], interactive=False, wrap=True, elem_id="nbest",
                                     column_widths=["16%", "59%", "25%"],
                                     label="빔 후보 n-best (행을 누르면 그 후보의 히트맵 / click a row) · 점수: 로그 "
                                           "확률, 빔은 길이 보정 (log-probability; beam: length-normalised)")
                step = gr.Slider(1, 2, value=1, step=1, label="단계 살펴보기 step inspector", visible=False,
                                 elem_id="step")  # shown once a reply has pieces to step through
                step_plot = gr.Plot(ui.step_figure(None, 1), label="후보 확률과 어텐션 candidates & attention",
                                    elem_id="step-plot", show_label=False)  # the figure titles itself
                gr.Markdown(ui.PIECES_LEGEND, elem_id="pieces-legend")
    return ChatTab(model, topic, chat, msg, send, stop, clear, pending, controls, api_msg, api_btn, api_out,
                   heatmap, status, turn_pick, replay, pace, nbest, step, step_plot)


def _replay_controls() -> tuple[gr.Button, gr.Slider]:
    """The replay button and its pace: the heatmap of the chosen turn grows again, row by row."""
    low, high, default = ui.REPLAY_PACE
    with gr.Column(scale=3, min_width=200):
        pace = gr.Slider(low, high, value=default, step=1, label="재생 속도 pace (조각/초 pieces per second)",
                         elem_id="replay-pace")
        replay = gr.Button(ui.REPLAY_LABEL, elem_id="replay", size="sm")
    return replay, pace


def _decoding_controls() -> list[gr.components.Component]:
    """The decoding accordion, every control built from its DecodeOptions field (range, step, default,
    label); returned in ui.CONTROLS order, the order the callbacks take them."""
    with gr.Accordion("디코딩 설정 Decoding", open=False, elem_classes=["chat-extras"]):
        spec = OPTIONS["strategy"]
        strategy = gr.Radio(ui.STRATEGY_CHOICES, value=spec.default, label=spec.label)
        built: dict[str, gr.components.Component] = {"strategy": strategy}
        gr.Markdown("고른 전략이 쓰는 설정만 보여요: 빔 크기·길이 보정은 빔 탐색, 온도·top-k·top-p는 샘플링. "
                    "(Only the settings the chosen strategy uses are shown: beam size and length penalty for "
                    "beam search, temperature, top-k and top-p for sampling.)")
        rows = []  # (row, the strategies its sliders serve): a row shows or hides as a whole, leaving no gap
        for names in DECODING_ROWS:
            serves = OPTIONS[names[0]].strategies
            assert all(OPTIONS[name].strategies == serves for name in names), names
            with gr.Row(visible=OPTIONS["strategy"].default in serves) as row:
                for name in names:
                    spec = OPTIONS[name]
                    built[name] = gr.Slider(spec.low, spec.high, value=spec.default, step=spec.step,
                                            label=spec.label)
            rows.append((row, serves))
        strategy.change(lambda chosen: [gr.update(visible=chosen in serves) for _, serves in rows],
                        inputs=[strategy], outputs=[row for row, _ in rows], api_name="show_controls",
                        api_visibility="private", queue=False)
    return [built[name] for name in ui.CONTROLS]


def _compare_tab(bots: dict[str, ChatBot]) -> CompareTab:
    with gr.Tab("비교 Compare", id="compare"):
        gr.Markdown("같은 메시지에 불러온 모델이 모두 답합니다 (greedy). (Every loaded model answers the same "
                    "message, greedy.) 직접 실행할 때 고를 수 있어요 (run your own: "
                    "`python app.py --checkpoint A --checkpoint B`).")
        with gr.Row():
            msg = gr.Textbox(show_label=False, placeholder="비교할 메시지 message to compare",
                             max_length=ui.MAX_INPUT_CHARS, scale=6)
            button = gr.Button("비교 Compare", variant="primary", scale=1)
        outputs: list[gr.components.Component] = []
        items = list(bots.items())
        for row in range(0, len(items), 2):  # two models side by side per row: heatmaps stay readable
            with gr.Row(equal_height=False):
                for name, bot in items[row: row + 2]:
                    with gr.Column():
                        gr.Markdown(ui.describe(bot, name))
                        outputs.append(gr.Textbox(label=f"{name} 답변 reply", interactive=False))
                        outputs.append(gr.Plot(ui.reply_figure(None), label=f"{name} attention",
                                               show_label=False))  # its badge covered the group names
                if len(items) > 1 and len(items[row: row + 2]) == 1:
                    gr.Column()  # an odd last model keeps half the width
    return CompareTab(msg, button, outputs)


def _about_tab(bots: dict[str, ChatBot], length_plot: Path) -> None:
    with gr.Tab("소개 About", id="about"):
        gr.Markdown(ui.ATTENTION_EXPLAINED, latex_delimiters=LATEX)
        if length_plot.is_file():
            gr.Markdown(LENGTH_PLOT_TEXT)
            gr.Image(str(length_plot), show_label=False, interactive=False, buttons=[])
        for i, (name, bot) in enumerate(bots.items()):
            with gr.Accordion(f"모델 카드 model card · {name}", open=len(bots) == 1):
                if bot.config.tokenizer.morphemes:
                    gr.Markdown("⚠️ 이 체크포인트는 konlpy 형태소 분석을 써서 Java 런타임(JRE)이 필요해요.")
                gr.Markdown(ui.model_card(bot), elem_classes=["model-card"])
                gr.Plot(ui.training_figure(bot.path), label="학습 곡선 training curves", show_label=False)
                _attention_epochs(bot, i)


def _attention_epochs(bot: ChatBot, i: int) -> None:
    """Attention forming over training, for model ``i``: a probe message and an epoch slider over the
    heatmaps its training recorded (ui.epoch_figure), or a note where its checkpoint has no such log."""
    if not bot.has_attention:
        return
    epochs, messages = ui.probe_epochs(bot.path), ui.probe_messages(bot.path)
    if not epochs:  # one line, not a promise of a slider that is not there
        gr.Markdown(f"<small>에폭별 어텐션 attention per epoch: {ui.NO_PROBE_NOTE}</small>", elem_id=f"epoch-note-{i}")
        return
    gr.Markdown(ui.EPOCHS_TEXT)
    with gr.Row():
        message = gr.Dropdown([(m, k) for k, m in enumerate(messages)], value=0, label="메시지 probe message",
                              interactive=True, elem_id=f"epoch-message-{i}", scale=3)
        epoch = gr.Slider(epochs[0], max(epochs[-1], epochs[0] + 1), value=epochs[0], step=1, label="에폭 epoch",
                          elem_id=f"epoch-slider-{i}", scale=3, visible=len(epochs) > 1)  # one epoch: no slider
    plot = gr.Plot(ui.epoch_figure(bot.path, 0, epochs[0]), label="에폭별 어텐션 attention per epoch", show_label=False,
                   elem_id=f"epoch-plot-{i}")

    def show(k: int, e: float):
        return ui.epoch_figure(bot.path, k, e)

    gr.on([message.input, epoch.input], show, inputs=[message, epoch], outputs=[plot],
          api_name=f"attention_epoch_{i}", api_visibility="private", trigger_mode="always_last",
          show_progress="hidden")


# ---------------------------------------------------------------- callbacks
class Callbacks:
    """The callbacks that need the loaded bots. Named parameters (not *args): the API page and
    gradio_client show these names."""

    def __init__(self, bots: dict[str, ChatBot]):
        self.bots = bots
        self.default = next(iter(bots))

    def pick(self, name: str | None) -> ChatBot:
        return self.bots.get(name or "", self.bots[self.default])

    def label(self, name: str | None) -> str | None:
        """The name a reply is labelled with: the picked model's, when there is a choice of models."""
        return (name if name in self.bots else self.default) if len(self.bots) > 1 else None

    def chat(self, message: str, history: list, session_turns: list, model: str, strategy: str, beam_size: float,
             temperature: float, top_k: float, top_p: float, max_len: float, no_repeat_ngram: float,
             length_penalty: float, repetition_penalty: float, topic: str = ui.TOPIC_AUTO):
        decoding = _decoding(strategy, beam_size, temperature, top_k, top_p, max_len, no_repeat_ngram,
                             length_penalty, repetition_penalty)
        bot = self.pick(model)
        for chat, heatmap, turns in ui.chat_stream(bot, message, history, session_turns, ui.topic_id(topic, bot),
                                                   self.label(model), **decoding):
            yield chat, gr.skip() if heatmap is None else heatmap, turns  # skip: the browser keeps the last heatmap

    def reply(self, message: str, model: str, strategy: str, beam_size: float, temperature: float, top_k: float,
              top_p: float, max_len: float, no_repeat_ngram: float, length_penalty: float,
              repetition_penalty: float, topic: str = ui.TOPIC_AUTO) -> dict:
        decoding = _decoding(strategy, beam_size, temperature, top_k, top_p, max_len, no_repeat_ngram,
                             length_penalty, repetition_penalty)
        bot = self.pick(model)
        return ui.reply_json(bot, message, ui.topic_id(topic, bot), **decoding)

    def pick_model(self, model: str):
        return gr.Radio(value=ui.TOPIC_AUTO, visible=self.pick(model).reads_topic)

    def compare(self, message: str):
        return [x for pair in ui.compare(self.bots, message) for x in pair]


def _decoding(*controls: Any) -> dict[str, Any]:
    """ui.decoding_kwargs, its ValueError (NaN, an infinity, not a number) shown as a gr.Error naming the
    control: gradio shows any other exception as a blank "Error" (show_error is off)."""
    try:
        return ui.decoding_kwargs(*controls)
    except ValueError as e:
        raise gr.Error(str(e)) from None


def _stash(message: str):
    """Take the message out of the box; the status line of the previous turn goes until this one is done,
    and so does the replay (it would draw an old turn over the growing heatmap)."""
    return "", message, gr.Button(visible=False), gr.Button(visible=True), "", gr.Button(interactive=False)


def _view(session_turns: list, index: Any = None, hyp: int = 0, heatmap: bool = True):
    """The turn's (heatmap, n-best, step slider, step figure, status); ``heatmap=False`` leaves the
    heatmap as it is (gr.skip)."""
    v = ui.turn_view(session_turns, index, hyp)
    # gradio needs min < max: a reply of one piece has nothing to step through, and none no slider at all
    steps = gr.Slider(1, max(2, v.steps), value=max(1, v.steps), step=1, visible=v.steps > 1)
    return v.heatmap if heatmap else gr.skip(), v.nbest, steps, v.step, v.status


def _after(session_turns: list):
    """After a streamed reply: the turn picker, n-best table, step inspector and status of the new turn.
    The heatmap is left alone: the stream's last yield drew the same one."""
    n = len(session_turns or [])
    return (gr.Dropdown(choices=ui.turn_choices(session_turns), value=n - 1 if n else None), 0,
            *_view(session_turns, heatmap=False), gr.Button(visible=True), gr.Button(visible=False),
            gr.Button(interactive=True))


def _stopped():
    """The send button back, the stop button and the replay's pause over (the stream's _after never runs)."""
    return gr.Button(visible=True), gr.Button(visible=False), gr.Button(interactive=True)


def _select_turn(session_turns: list, index: Any):
    return 0, *_view(session_turns, index)


def _select_hypothesis(session_turns: list, index: Any, evt: gr.SelectData):
    hyp = int(evt.index[0]) if evt.index is not None else 0
    return hyp, *_view(session_turns, index, hyp)


def _step(session_turns: list, index: Any, hyp: int, k: float):
    return ui.step_figure(ui.shown_reply(session_turns, index, hyp), int(k))


def _clear():
    return [], [], 0, *_view([]), gr.Dropdown(choices=[], value=None), ""


def _replay_turn(session_turns: list, index: Any, hyp: int, pace: float):
    """The chosen turn's heatmap again, one row more every 1 / pace seconds (ui.replay)."""
    yield from ui.replay(session_turns, index, hyp, pace)


def _wire(cb: Callbacks, c: ChatTab, cmp: CompareTab, turns: gr.State, hypothesis: gr.State) -> None:
    """Every event: the public /chat, /reply and /compare, and the private ones the page uses."""
    view_outputs = [c.heatmap, c.nbest, c.step, c.step_plot, c.status]
    replaying = c.replay.click(_replay_turn, inputs=[turns, c.turn_pick, hypothesis, c.pace],
                               outputs=[c.heatmap], api_name="replay", api_visibility="private",
                               show_progress="hidden")  # no overlay over the heatmap it redraws
    stashed = gr.on([c.msg.submit, c.send.click], _stash, inputs=[c.msg],
                    outputs=[c.msg, c.pending, c.send, c.stop, c.status, c.replay], api_name="stash",
                    api_visibility="private", queue=False,
                    cancels=[replaying])  # no old turn's replay draws over the new reply's heatmap
    streaming = stashed.then(cb.chat, inputs=[c.pending, c.chat, turns, c.model, *c.controls, c.topic],
                             outputs=[c.chat, c.heatmap, turns], api_name="chat",
                             show_progress="minimal")  # a full overlay would hide the growing heatmap
    streaming.then(_after, inputs=[turns],
                   outputs=[c.turn_pick, hypothesis, *view_outputs, c.send, c.stop, c.replay],
                   api_name="after_turn", api_visibility="private",
                   show_progress="hidden")  # no overlay over the heatmap the stream just finished
    c.stop.click(_stopped, outputs=[c.send, c.stop, c.replay], cancels=[streaming], api_name="stop",
                 api_visibility="private", queue=False)
    c.clear.click(_clear, outputs=[c.chat, turns, hypothesis, *view_outputs, c.turn_pick, c.msg],
                  api_name="clear", api_visibility="private", queue=False, cancels=[replaying])
    c.turn_pick.input(_select_turn, inputs=[turns, c.turn_pick], outputs=[hypothesis, *view_outputs],
                      api_name="select_turn", api_visibility="private", cancels=[replaying])
    c.nbest.select(_select_hypothesis, inputs=[turns, c.turn_pick], outputs=[hypothesis, *view_outputs],
                   api_name="select_hypothesis", api_visibility="private", cancels=[replaying])
    c.step.input(_step, inputs=[turns, c.turn_pick, hypothesis, c.step], outputs=[c.step_plot],
                 api_name="inspect_step", api_visibility="private", trigger_mode="always_last")
    c.api_btn.click(cb.reply, inputs=[c.api_msg, c.model, *c.controls, c.topic], outputs=[c.api_out],
                    api_name="reply")
    c.model.change(cb.pick_model, inputs=[c.model], outputs=[c.topic], api_name="pick_model",
                   api_visibility="private", queue=False)
    gr.on([cmp.msg.submit, cmp.button.click], cb.compare, inputs=[cmp.msg], outputs=cmp.outputs,
          api_name="compare")


def server_name() -> str:
    """GRADIO_SERVER_NAME if set; on a Hugging Face Space (SPACE_ID set) every interface, else localhost."""
    return os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")


def server_port() -> int:
    return int(os.environ.get("GRADIO_SERVER_PORT") or 7860)


class RequestLimits:
    """ASGI middleware in front of gradio's routes, which bound no request body but an upload's:

    - a body over ``max_body`` bytes gets 413 before gradio parses any of it: at once by its
      Content-Length, a chunked one as soon as it passes the bound;
    - uploads get 403: the demo has no file inputs, and gradio stores whatever is posted;
    - a JSON body must be standard JSON: NaN, Infinity and numbers that overflow to it get 422 (Python's
      parser takes them, and NaN passes gradio's slider range checks);
    - a queue join must name one of the demo's functions (gradio answers an unknown ``fn_index`` with a
      bare 500), a ``/call/<name>`` one of its endpoints (404), and a session_hash is at most
      MAX_SESSION_HASH characters (422);
    - when a session's event stream ends with nothing pending, gradio's per-session queue bookkeeping
      goes (it keeps it for 2,000 sessions, the event-id sets for good: ~5 KB a session).
    """

    def __init__(self, app: Any, blocks: gr.Blocks, max_body: int = MAX_BODY_BYTES):
        self.app, self.blocks, self.max_body = app, blocks, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/gradio_api/queue/data"):
            await self.app(scope, receive, send)
            return self.forget_finished_stream(scope)
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/")
        if path.endswith(("/gradio_api/upload", "/gradio_api/process_recording")):
            return await _refuse(send, 403, "This demo takes no uploads.")
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        declared_too_big = length.isdigit() and int(length) > self.max_body
        body = None if declared_too_big else await _read_body(receive, self.max_body)
        if body is None:
            return await _refuse(send, 413, f"The request body is over {self.max_body} bytes.")
        problem = self.check(path, headers.get(b"content-type", b""), body)
        if problem:
            return await _refuse(send, *problem)
        await self.app(scope, _replay(body, receive), send)

    def check(self, path: str, content_type: bytes, body: bytes) -> tuple[int, str] | None:
        """(status, why) for a body refused here, else None."""
        if not body or (content_type and b"json" not in content_type.lower()):
            return None  # FastAPI parses JSON only where it says so or says nothing
        try:
            data = json.loads(body, parse_constant=_not_finite, parse_float=_finite)
        except _NotFinite as e:
            return 422, f"Numbers must be finite: {str(e)[:20]} is not. Send one in the control's range."
        except (ValueError, RecursionError):
            return 400, "The request body is not valid JSON."
        if not isinstance(data, dict):
            return None
        session = data.get("session_hash")
        if isinstance(session, str) and len(session) > MAX_SESSION_HASH:
            return 422, f"session_hash is over {MAX_SESSION_HASH} characters."
        called = re.search(r"/gradio_api/call/(?:v2/)?([^/]+)$", path)
        if called and called[1] not in {fn.api_name for fn in self.blocks.fns.values()}:
            return 404, f"This demo has no endpoint named {called[1][:40]!r}."
        index = data.get("fn_index")
        if not path.endswith("/gradio_api/queue/join") or index is None:
            return None
        if type(index) is not int or index not in self.blocks.fns:
            return 422, "fn_index must be the id of one of the demo's functions (see /config)."
        return None

    def forget_finished_stream(self, scope: dict) -> None:
        """Drop the queue's message queue and event-id set of a session whose stream ended with no event
        pending (a later join makes new ones; this runs on the event loop, as the queue's own upkeep)."""
        session = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [""])[0]
        queue = self.blocks._queue
        if not session or queue.pending_event_ids_session.get(session):
            return
        queue.pending_event_ids_session.pop(session, None)
        messages = queue.pending_messages_per_session.get(session)
        if messages is not None and messages.empty():
            del queue.pending_messages_per_session[session]


class _NotFinite(ValueError):
    """A JSON number that is not finite: NaN, Infinity, or one that overflows to it (1e999)."""


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _NotFinite(text)
    return number


def _not_finite(text: str) -> float:
    raise _NotFinite(text)


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The request body, or None once it passes ``limit`` bytes (or the client goes away)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the body read already, then what comes next (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        return pending.pop() if pending else await receive()
    return replay


async def _refuse(send: Any, status: int, detail: str) -> None:
    """A JSON error, as FastAPI words its own; the connection closes (a refused body may be unread)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _forget_closed_sessions(demo: gr.Blocks) -> None:
    """Drop a session as soon as its page's heartbeat ends (tab closed): gradio keeps a closed session's
    state an hour, and its copy of the page's config until SESSION_CAPACITY newer sessions push it out."""
    if getattr(demo, "_forgets_closed_sessions", False):
        return  # launched before

    async def forget(request: gr.Request) -> None:  # async: runs on the event loop, as gradio's own state upkeep
        demo.state_holder.session_data.pop(request.session_hash, None)
        demo.state_holder.time_last_used.pop(request.session_hash, None)

    demo.unload(forget)
    demo._forgets_closed_sessions = True


def chats_full(queue: Any, fn: Any) -> bool:
    """Whether ``fn`` is a streamed chat and chats already wait in CHAT_QUEUE_SHARE of ``queue`` (gradio's
    queueing.Queue). Chats queued but about to start in a free chat worker do not count as waiting."""
    chats = queue.event_queue_per_concurrency_id.get("chat")
    if fn is None or fn.concurrency_id != "chat" or queue.max_size is None or chats is None \
            or chats.concurrency_limit is None:
        return False
    starting = max(0, chats.concurrency_limit - chats.current_concurrency)
    return len(chats.queue) - starting >= max(1, int(queue.max_size * CHAT_QUEUE_SHARE))


def _share_the_queue(demo: gr.Blocks) -> None:
    """Streamed chats may hold only CHAT_QUEUE_SHARE of the queue, so that a crowd of them leaves /reply
    and the page's own events room: a further chat join gets gradio's "queue full" (503). The check runs in
    the queue's push, on the event loop with nothing awaited before gradio appends the event, so joins
    that arrive together are counted exactly."""
    queue = demo._queue
    push = queue.push

    async def push_within_share(body: Any, request: Any, username: str | None) -> tuple[bool, Any, str]:
        if chats_full(queue, demo.fns.get(body.fn_index)):
            return False, "Queue is full: streamed chats may hold only part of it. Please try again.", "queue_full"
        return await push(body, request, username)

    queue.push = push_within_share


def launch(demo: gr.Blocks, checkpoint_dirs: Sequence[str | Path] = (), *,
           private_dirs: Sequence[str | Path] = ("checkpoints", "data"), queue_size: int = QUEUE_SIZE,
           concurrency_limit: int | None = None, **overrides: Any):
    """Queue and launch with the serving limits; ``overrides`` go to ``Blocks.launch`` (tests pass
    ``server_port`` and ``prevent_thread_lock``). Never shares a public link.

    The queue is the only way in (``api_open=False``: no direct REST call skips its size bound or
    the concurrency limit); ``concurrency_limit`` is split between the model groups (:func:`model_limits`)
    and is each other event's limit. MCP and the /monitoring page stay off unless an override asks for them.
    Every request passes :class:`RequestLimits` first; the server keeps SESSION_CAPACITY sessions at
    most, and forgets one as soon as its page closes.
    """
    torch.set_num_threads(TORCH_THREADS)
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency_limit or concurrency(), api_open=False)
    limits = model_limits(concurrency_limit)
    for fn in demo.fns.values():  # streamed chats and one-shot replies each get their own workers
        if fn.api_name in MODEL_GROUPS:
            fn.concurrency_id = MODEL_GROUPS[fn.api_name]
            fn.concurrency_limit = limits[fn.concurrency_id]
        elif fn.api_name == "replay":  # mostly waiting for its next frame: more at once than the cores
            fn.concurrency_limit = REPLAY_CONCURRENCY
    _share_the_queue(demo)
    _forget_closed_sessions(demo)
    blocked = [str(Path(d).resolve()) for d in (*private_dirs, *checkpoint_dirs)]
    kwargs: dict[str, Any] = dict(
        server_name=server_name(), server_port=server_port(), max_file_size=MAX_FILE_SIZE,
        state_session_capacity=SESSION_CAPACITY,
        blocked_paths=blocked, show_error=False, footer_links=["api", "settings"], mcp_server=False,
        enable_monitoring=False, theme=gr.themes.Soft(font=THEME_FONT, font_mono=["ui-monospace", "monospace"]),
        css=CSS, js=PAGE_JS)
    kwargs.update(overrides)
    kwargs["share"] = False
    app_kwargs = dict(kwargs.get("app_kwargs") or {})  # an override adds to the limits, never drops them
    app_kwargs["middleware"] = [Middleware(RequestLimits, blocks=demo), *app_kwargs.get("middleware", [])]
    kwargs["app_kwargs"] = app_kwargs
    return demo.launch(**kwargs)
