"""The demo's callbacks as plain functions, and the plotly figures they return.

Nothing here imports gradio: ``chatbot/demo.py`` wires these functions to components, so
every behaviour of the demo can be tested without a server or a browser.

Chat history is gradio's messages format: ``[{"role": "user" | "assistant", "content": ...}]``.
Per-session turn history (for bringing back an earlier heatmap) is a list of :class:`Turn`.
"""
from __future__ import annotations

import html
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .checkpoint import PROBE_KEY, read_metrics
from .batching import MAX_MESSAGE_CHARS
from .inference import EMPTY_PROMPT, ChatBot, ColumnGroup, Reply
from .search import OPTIONS, STRATEGIES, STRATEGY_LABELS

FONT_FAMILY = "NanumGothic, Noto Sans KR, Malgun Gothic, Apple SD Gothic Neo, sans-serif"
MAX_INPUT_CHARS = MAX_MESSAGE_CHARS  # the Textbox's max_length; the callbacks cut API input to this too
MAX_HISTORY_MESSAGES = 200  # a chat keeps its last 100 turns: the page sends all of it back with every message
MAX_CONTENT_CHARS = 8 * MAX_INPUT_CHARS  # a history message read at most: above any message the chat writes
MAX_TURNS = 10  # turns a session keeps for the turn picker (each holds its reply's attention and candidates)
EXAMPLES = ["오늘 너무 힘들었어", "헤어진 지 한 달 됐어", "좋아하는 사람이 생겼어", "주말에 뭐 하지"]
STRATEGY_CHOICES = [(label, value) for value, label in STRATEGY_LABELS.items()]  # the radio's (label, value)
NO_ATTENTION_NOTE = "이 모델은 어텐션이 없어요 (no-attention baseline): 보여 줄 히트맵이 없습니다."
NBEST_HEADERS = ["순위 rank", "답변 reply", "점수 log p"]
TOPIC_AUTO = "auto"  # the topic radio's value for "predict it from the message"
TOPIC_HELP = ("이 모델은 질문과 함께 주제(말뭉치의 label)를 읽어요. 자동이면 메시지에서 예측합니다. "
              "같은 메시지를 주제만 바꿔 보내 보세요. (This model reads a topic; auto predicts it.)")
EMPTY_REPLY = Reply(EMPTY_PROMPT, [], [], None, generated=False)  # what ChatBot.reply gives for "", without the call
THINKING_NOTE = "생각하는 중… (thinking)"
PIECES_LEGEND = ("`·` = 띄어쓰기 (space) · `</s>` = 답변 끝 (end of reply); 기억 열에서는 질문과 답변 사이 "
                 "(in a recall's columns: between its question and its answer)")  # under the step inspector
MODEL_LABEL = "<small>— {}</small>"  # an assistant turn's last line: the model that answered
FIGURE_INTERVAL = 0.25  # seconds between two heatmaps of a streaming reply; its text goes every piece
FIGURE_SHARE = 4.0  # ... and at least this many times as long as the last heatmap took to build
UPRIGHT_PIECES = 12  # source pieces whose labels stand upright; more are turned to read bottom to top
LABEL_ROOM = 60  # px a figure grows by for its turned labels (their margin; the rows keep their height)
# the heatmaps' colour bar: the same ticks in every frame of a stream or replay (plotly picks its own per frame)
WEIGHT_BAR = dict(title=dict(text="가중치<br>weight"), tickmode="array", tickvals=[0, 0.25, 0.5, 0.75, 1],
                  ticktext=["0", ".25", ".5", ".75", "1"])
REPLAY_PACE = (1.0, 10.0, 3.0)  # the replay's pieces per second: lowest, highest, default
REPLAY_LABEL = "▶ 다시 보기 replay"


@dataclass
class Turn:
    """One answered message of a session: what the heatmap selector brings back."""

    message: str
    reply: Reply
    model: str = ""  # the loaded model that answered (its name in the demo's picker)


# ---------------------------------------------------------------- inputs
def literal(text: str) -> str:
    """Escape HTML so a message or reply shows as typed (the Chatbot renders HTML; markdown is off).

    Plotly labels take the same escaping: it parses a few tags (<b>, <br>) in tick and hover text
    and turns entities back into characters.
    """
    return html.escape(text, quote=False)


def _well_formed(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone UTF-16 surrogate (JSON can send one, the reply stream cannot)
    becomes U+FFFD and an escaped pair its character, as in :func:`chatbot.text.normalize`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def content_text(content: Any) -> str:
    """A chat message's content as plain text: gradio sends a str or a list of parts. Lone surrogates
    become U+FFFD, as every other character that cannot be sent back."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _well_formed(content)
    if isinstance(content, dict):
        return content_text(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return _well_formed(str(content))


def normalize_history(history: Sequence[Any] | None, keep: int = MAX_HISTORY_MESSAGES - 2) -> list[dict[str, str]]:
    """Messages-format history with every content flattened to a str, each cut to MAX_CONTENT_CHARS: only
    its last ``keep`` messages, since the callbacks only append to it (the default leaves room for the
    turn being answered, so a chat never grows past MAX_HISTORY_MESSAGES)."""
    messages = [m for m in history or [] if isinstance(m, dict)]
    return [{"role": m.get("role", "assistant"), "content": content_text(m.get("content"))[:MAX_CONTENT_CHARS]}
            for m in messages[max(0, len(messages) - keep):]]


def labelled(text: str, model: str | None) -> str:
    """An assistant turn's content: ``text``, then, when several models are loaded, a small line naming
    the one that answered (in the same part: each part of a message would be a bubble of its own)."""
    return f"{text}\n{MODEL_LABEL.format(literal(model))}" if model else text


def clean_message(message: Any) -> str:
    """The message as text, at most MAX_INPUT_CHARS characters (API clients bypass the textbox limit;
    the model reads even less: :func:`chatbot.batching.encode_message` says what)."""
    return content_text(message)[:MAX_INPUT_CHARS]


def truncated_note(reply: Reply) -> str:
    """What the model read of a long message, or "" when it read all of it."""
    if not reply.truncated:
        return ""
    n, chars = len(reply.message_tokens), reply.source_chars
    return (f"(메시지가 길어서 앞 {n}조각 ≈ {chars}자만 읽었어요. / "
            f"The model read the first {n} pieces, about {chars} characters.)")


def unfinished_note(reply: Reply) -> str:
    """A reply cut at the length limit (no </s>: often a loop), or "" for one that ended itself."""
    if reply.finished or not reply.generated:
        return ""
    return (f"(최대 길이 {len(reply.reply_tokens)}조각에서 멈췄어요: 답변이 스스로 끝나지 않았어요. / Stopped at the "
            f"length limit of {len(reply.reply_tokens)} pieces: the reply did not end by itself.)")


# the demo's decoding controls, in the order its callbacks (and the API endpoints) take them
CONTROLS = ("strategy", "beam_size", "temperature", "top_k", "top_p", "max_len", "no_repeat_ngram",
            "length_penalty", "repetition_penalty")


def decoding_kwargs(strategy: str | None = None, beam_size: float | None = None, temperature: float | None = None,
                    top_k: float | None = None, top_p: float | None = None, max_len: float | None = None,
                    no_repeat_ngram: float | None = None, length_penalty: float | None = None,
                    repetition_penalty: float | None = None) -> dict[str, Any]:
    """The decoding controls as :class:`chatbot.search.DecodeOptions` fields, tolerant as an API must be
    (sliders send floats, API clients anything): a missing value (None) takes the option's default, a
    number is cast to the option's type and clamped into its range (``OPTIONS``), an unknown strategy
    is greedy; NaN, infinities and non-numbers raise ValueError naming the control. Beam search
    returns as many hypotheses as it keeps beams."""
    sent = dict(zip(CONTROLS, (strategy, beam_size, temperature, top_k, top_p, max_len, no_repeat_ngram,
                               length_penalty, repetition_penalty)))
    kw: dict[str, Any] = {"strategy": strategy if strategy in STRATEGIES else OPTIONS["strategy"].default}
    for name in CONTROLS[1:]:
        kw[name] = OPTIONS[name].default if sent[name] is None else OPTIONS[name].clamp(sent[name])
    kw["n_best"] = kw["beam_size"] if kw["strategy"] == "beam" else OPTIONS["n_best"].default
    return kw


def topic_choices(bots: ChatBot | Sequence[ChatBot]) -> list[tuple[str, str]]:
    """The topic radio's (label, value) pairs: auto, then one per topic of the bot that reads the most
    (one radio serves every loaded model; models that read none hide it)."""
    bots = [bots] if isinstance(bots, ChatBot) else list(bots)
    names = max((b.topic_names for b in bots if b.reads_topic), key=len, default=[])
    return [("자동 auto", TOPIC_AUTO)] + [(name, str(i)) for i, name in enumerate(names)]


def topic_id(value: Any, bot: ChatBot) -> int | None:
    """The radio's value as the topic for ``bot``: None (predict it) for auto, for anything that is
    not one of its topics, and for a model that reads no topic."""
    try:
        topic = int(value)
    except (TypeError, ValueError):
        return None
    return topic if 0 <= topic < len(bot.topic_names) else None  # no names: the model reads no topic


def topic_note(reply: Reply | None) -> str:
    """One line on the topic the encoder read, e.g. "주제 topic: 이별 breakup (자동 예측 auto, 96%)"."""
    if reply is None or reply.topic is None:
        return ""
    t = reply.topic
    name = f"주제 topic: **{literal(t.name)}**"
    if t.source == "given":
        return f"{name} (선택 chosen)"
    if t.source == "predicted":
        return f"{name} (자동 예측 auto, {max(t.probs):.0%})"
    return f"{name} (기본값 default: 주제 분류기 없음 no topic classifier)"


# ---------------------------------------------------------------- figures
def _layout(fig: go.Figure, title: str | None = None, height: int | None = None, top: int = 40) -> go.Figure:
    fig.update_layout(font=dict(family=FONT_FAMILY, size=13), margin=dict(l=10, r=10, t=top if title else 10, b=10),
                      title=dict(text=title, x=0.5, xanchor="center") if title else None, template="plotly_white")
    if height:
        fig.update_layout(height=height)
    return fig


def source_ticks(pieces: Sequence[str]) -> dict[str, Any]:
    """The source-piece axis of a heatmap or an attention row: one tick per piece, upright for a short
    message, turned to -90 degrees (and smaller) for a long one, so that a label takes the height of a line
    of text across, not its length. Where the columns are narrower still, the page hides labels that would
    overlap (PAGE_JS in chatbot/demo.py); every piece stays in the hover."""
    n, turned = len(pieces), len(pieces) > UPRIGHT_PIECES
    return dict(tickmode="array", tickvals=list(range(n)), ticktext=[literal(p) for p in pieces], automargin=True,
                tickangle=-90 if turned else 0, tickfont=dict(size=10 if turned else 12))


def note_figure(text: str, width: int = 30) -> go.Figure:
    """An empty figure that only says ``text`` (no attention to show, nothing yet), in lines of about
    ``width`` characters so that it fits a narrow column (plotly never wraps an annotation itself)."""
    fig = go.Figure()
    fig.add_annotation(text="<br>".join(textwrap.wrap(text, width)) or text, x=0.5, y=0.5, xref="paper",
                       yref="paper", showarrow=False,
                       font=dict(size=15))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, height=220)


def attention_figure(source_tokens: Sequence[str], reply_tokens: Sequence[str],
                     attention: np.ndarray | None, title: str | None = None,
                     groups: Sequence[ColumnGroup] = (), gate: np.ndarray | None = None,
                     pieces_copied: Sequence[tuple[float | None, str | None]] | None = None) -> go.Figure:
    """Heatmap of ``attention`` (len(reply_tokens), len(source_tokens)): reply pieces down, source across.

    Axes use integer positions with tick labels, so a piece that occurs twice keeps two columns.
    A recall model's columns come in ``groups`` (메시지 | 기억 1 | …, each recall named by its question
    and score above its columns), and a strip beside them says how much of each piece was copied:
    ``pieces_copied`` (:func:`pieces_copied`), else the gate's copy weight 1 - ``gate``.
    """
    if groups and attention is not None and reply_tokens:
        return recall_figure(source_tokens, reply_tokens, attention, groups, gate, title, pieces_copied)
    if attention is None:
        return note_figure(NO_ATTENTION_NOTE)
    if not reply_tokens or not source_tokens:
        return note_figure("메시지를 보내면 어텐션 히트맵이 여기에 그려져요.")
    att = np.asarray(attention, dtype=float)[: len(reply_tokens), : len(source_tokens)]
    S, R = len(source_tokens), att.shape[0]
    src, rep = [literal(p) for p in source_tokens], [literal(p) for p in reply_tokens[:R]]
    fig = go.Figure(go.Heatmap(
        z=att.round(4).tolist(), x=list(range(S)), y=list(range(R)), zmin=0.0, zmax=1.0,
        colorscale="Blues", colorbar=dict(WEIGHT_BAR, thickness=12),
        customdata=[[[s, r] for s in src] for r in rep], xgap=1, ygap=1,
        hovertemplate="입력 source: %{customdata[0]}<br>출력 reply: %{customdata[1]}"
                      "<br>가중치 weight: %{z:.3f}<extra></extra>"))
    fig.update_xaxes(side="top", title=dict(text="입력 조각 source pieces"), **source_ticks(source_tokens))
    fig.update_yaxes(tickmode="array", tickvals=list(range(R)), ticktext=rep, autorange="reversed",
                     title=dict(text="답변 조각 reply pieces"))
    return _layout(fig, title, height=max(260, 120 + 26 * R) + (LABEL_ROOM if S > UPRIGHT_PIECES else 0))


def recall_figure(source_tokens: Sequence[str], reply_tokens: Sequence[str], attention: np.ndarray,
                  groups: Sequence[ColumnGroup], gate: np.ndarray | None, title: str | None = None,
                  pieces_copied: Sequence[tuple[float | None, str | None]] | None = None) -> go.Figure:
    """:func:`attention_figure` for a recall model: one heatmap over every column group (each row still
    sums to 1 over all of them), the groups marked and named, and a copy strip on the right: each piece's
    copied share where ``pieces_copied`` gives it (the gate's 1 - g_t in the hover), else 1 - g_t."""
    att = np.asarray(attention, dtype=float)[: len(reply_tokens), : len(source_tokens)]
    S, R = len(source_tokens), att.shape[0]
    src, rep = [literal(p) for p in source_tokens], [literal(p) for p in reply_tokens[:R]]
    group_of = [next((g.name for g in groups if g.start <= i < g.end), "") for i in range(S)]
    # the group names go this far (px) above the plot: past the labels, which a long message turns
    lift = 8 + 11 * max(len(p) for p in source_tokens[:S]) if S > UPRIGHT_PIECES else 44
    top = lift + 56 + (36 if title else 0)  # the names take two lines, the title (the epoch log's) one more
    fig = make_subplots(rows=1, cols=2, column_widths=[0.9, 0.1], shared_yaxes=True, horizontal_spacing=0.01)
    fig.add_trace(go.Heatmap(
        z=att.round(4).tolist(), x=list(range(S)), y=list(range(R)), zmin=0.0, zmax=1.0,
        colorscale="Blues", colorbar=dict(WEIGHT_BAR, thickness=12, x=1.02),
        customdata=[[[s, r, grp] for s, grp in zip(src, group_of)] for r in rep], xgap=1, ygap=1,
        hovertemplate="%{customdata[2]} · 입력 source: %{customdata[0]}<br>출력 reply: %{customdata[1]}"
                      "<br>가중치 weight: %{z:.3f}<extra></extra>"), 1, 1)
    weight = [] if gate is None else [round(1.0 - float(g), 3) for g in np.asarray(gate)[:R]]
    if pieces_copied is not None and weight:  # the piece's own share, as the step inspector shows it
        shares = [(None, None) if i >= len(pieces_copied) else pieces_copied[i] for i in range(R)]
        z = [[None if c is None else round(c, 3)] for c, _ in shares]
        text = [["" if c is None else f"{100 * c:.0f}"] for c, _ in shares]  # percent, no sign: "100%" overflows a phone's cell
        hover = [[f"{r}: 복사 copied {c:.0%}{f' ({src})' if src else ''} · 생성 generated {1 - c:.0%}"
                  f"<br>게이트 gate 1−g = {w:.0%}" if c is not None else
                  f"{r}: 상위 후보 밖 outside the top-k<br>게이트 gate 1−g = {w:.0%}"]
                 for r, (c, src), w in zip(rep, shares, weight)]
    else:  # no candidates (the epoch log): the gate's copy weight
        z = [[w] for w in weight]
        text = [[f"{100 * w:.0f}"] for w in weight]
        hover = [[f"{r}: 게이트 gate 1−g = {w:.0%} (복사 쪽 가중치 copy weight)"] for r, w in zip(rep, weight)]
    if weight:
        fig.add_trace(go.Heatmap(
            z=z, x=[0], y=list(range(R)), zmin=0.0, zmax=1.0, colorscale="Oranges",
            showscale=False, xgap=1, ygap=1, customdata=hover, text=text, texttemplate="%{text}", textfont=dict(size=9),
            hovertemplate="%{customdata}<extra></extra>"), 1, 2)
    for g in groups[1:]:  # a line before each recall, its name and score above its columns
        fig.add_vline(x=g.start - 0.5, line=dict(color="#e6550d", width=2), row=1, col=1)
    for g in groups:
        label = (f"{g.name}<br>message" if not g.question else  # two lines each, so the names line up
                 f"{g.name} · 유사도 {g.score:.2f}<br>{literal(textwrap.shorten(g.question, 14, placeholder='…'))}")
        whole = ("<br>".join(textwrap.wrap(literal(f"{g.question} → {g.answer}"), 18, break_long_words=False))
                 if g.question else "입력 메시지 the message")  # in lines that fit a phone
        fig.add_annotation(x=(g.start + g.end - 1) / 2, y=1.0, xref="x", yref="paper", yanchor="bottom", yshift=lift,
                           text=label, showarrow=False, font=dict(size=11, color="#e6550d" if g.question else "#333"),
                           hovertext=whole)
    fig.update_xaxes(side="top", **source_ticks(source_tokens), row=1, col=1)
    strip = "복사 %<br>copied" if pieces_copied is not None else "1−g<br>%"  # a piece's copied share, or the gate's copy weight
    fig.update_xaxes(tickmode="array", tickvals=[0], ticktext=[strip], side="top", row=1, col=2)
    fig.update_yaxes(tickmode="array", tickvals=list(range(R)), ticktext=rep, autorange="reversed",
                     title=dict(text="답변 조각 reply pieces"), row=1, col=1)
    fig = _layout(fig, title, height=max(320, 190 + 26 * R) + top - 130, top=120)
    fig.update_layout(margin=dict(t=top))
    return fig


def reply_figure(reply: Reply | None, title: str | None = None) -> go.Figure:
    if reply is None or not reply.generated:
        return note_figure("메시지를 보내면 어텐션 히트맵이 여기에 그려져요.")
    return attention_figure(reply.source_tokens, reply.reply_tokens, reply.attention, title,
                            reply.groups, reply.gate, pieces_copied(reply))


def pieces_copied(reply: Reply) -> list[tuple[float | None, str | None]] | None:
    """A recall model's reply: for each of its pieces, the share of that piece's probability that copying
    gave and the group it came from (its entry among the step's candidates; (None, None) where the piece
    was not among them, e.g. sampled from the tail). None for other models."""
    if not reply.groups or not reply.candidates:
        return None
    out = []
    for piece, cands in zip(reply.reply_tokens, reply.candidates):
        c = next((c for c in cands if c.piece == piece and c.copied is not None), None)
        out.append((None, None) if c is None else (c.copied, c.source))
    return out


def step_figure(reply: Reply | None, step: int) -> go.Figure:
    """Step inspector for step ``step`` (1-based): top-k next-piece probabilities beside that step's attention
    row; under them, at the figure's full width, for a long message (its labels need the room)."""
    if reply is None or not reply.generated or not reply.reply_tokens:
        return note_figure("답변의 한 단계를 골라 보세요. (Pick a step of a reply.)")
    t = min(max(int(step or 1), 1), len(reply.reply_tokens)) - 1
    has_att = reply.attention is not None
    stacked = has_att and len(reply.source_tokens) > UPRIGHT_PIECES
    titles = [f"{t + 1}단계 후보<br>top-k next pieces", f"{t + 1}단계 어텐션<br>attention row"]
    if stacked:
        fig = make_subplots(rows=2, cols=1, vertical_spacing=0.2,
                            subplot_titles=[title.replace("<br>", " ") for title in titles])
    else:  # side by side, each title in two lines: a narrow screen has room for them
        fig = make_subplots(rows=1, cols=2 if has_att else 1, horizontal_spacing=0.12,
                            subplot_titles=titles[:1 + has_att])
    at = (2, 1) if stacked else (1, 2)  # where the attention row goes
    cands = reply.candidates[t] if t < len(reply.candidates) else []
    chosen = reply.reply_tokens[t]
    copies = [c.copied or 0.0 for c in cands] if any(c.copied is not None for c in cands) else None
    fig.add_trace(go.Bar(
        x=list(range(len(cands))),
        y=[round(c.prob * (1 - (copies[i] if copies else 0.0)), 4) for i, c in enumerate(cands)],
        marker_color=["#1f77b4" if c.piece == chosen else "#9ecae1" for c in cands],
        customdata=[literal(c.piece) for c in cands], name="생성 generated", showlegend=copies is not None,
        hovertemplate="%{customdata}: " + ("생성 generated " if copies else "") + "%{y:.3f}<extra></extra>"), 1, 1)
    if copies:  # a recall model: the copied share of each candidate on top, named by where it came from
        fig.add_trace(go.Bar(
            x=list(range(len(cands))), y=[round(c.prob * copies[i], 4) for i, c in enumerate(cands)],
            marker_color=["#e6550d" if c.piece == chosen else "#fdae6b" for c in cands],
            customdata=[[literal(c.piece), c.source or "-"] for c in cands], name="복사 copied", showlegend=True,
            hovertemplate="%{customdata[0]}: 복사 copied %{y:.3f} (%{customdata[1]})<extra></extra>"), 1, 1)
        top_right = (fig.layout.xaxis.domain[1], fig.layout.yaxis.domain[1])  # of the candidates' panel
        fig.update_layout(barmode="stack", legend=dict(x=top_right[0], y=top_right[1], xanchor="right", yanchor="top",
                                                        bgcolor="rgba(255,255,255,0.8)", font=dict(size=11),
                                                        title=dict(text="진한 색 = 선택 (dark = chosen)",
                                                                   font=dict(size=10))))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(cands))), ticktext=[literal(c.piece) for c in cands],
                     row=1, col=1)
    totals = [c.prob for c in cands]
    fig.data[len(fig.data) - 1].update(text=[f"{p:.0%}" if p >= 0.005 else "<1%" for p in totals],
                                       textposition=["inside" if p > 0.8 else "outside" for p in totals],  # clear of the title
                                       insidetextanchor="end", textfont=dict(size=10), cliponaxis=False)
    fig.update_yaxes(range=[0, min(1.0, 1.25 * max(totals, default=1.0)) or 1.0], title=dict(text="확률 prob"),
                     row=1, col=1)
    if has_att:
        row = np.asarray(reply.attention[t], dtype=float)
        src = [literal(p) for p in reply.source_tokens]
        fig.add_trace(go.Bar(x=list(range(len(src))), y=row.round(4).tolist(), marker_color="#31a354",
                             showlegend=False, customdata=src,
                             hovertemplate="%{customdata}: %{y:.3f}<extra></extra>"), *at)
        fig.update_xaxes(**source_ticks(reply.source_tokens), row=at[0], col=at[1])
        fig.update_yaxes(range=[0, 1], title=dict(text="가중치 weight"), row=at[0], col=at[1])
        for g in reply.groups[1:]:  # a recall model: the heatmap's group lines and names, inside the row's panel
            fig.add_vline(x=g.start - 0.5, line=dict(color="#e6550d", width=1.5), row=at[0], col=at[1])
        for g in reply.groups:
            fig.add_annotation(x=(g.start + g.end - 1) / 2, y=0.98, yanchor="top", text=g.name, showarrow=False,
                               font=dict(size=10, color="#e6550d" if g.question else "#333"), row=at[0], col=at[1])
    mine = next((c for c in cands if c.piece == chosen), None)
    source = (f"<br><span style='font-size:13px'>← {mine.source}에서 복사 copied from {mine.source} ({mine.copied:.0%})</span>"
              if mine is not None and mine.source and (mine.copied or 0) >= 0.5 else "")
    extra = 22 if source else 0  # the title's second line
    return _layout(fig, f"선택된 조각 chosen: 「{literal(chosen)}」{source}",
                   height=(600 + LABEL_ROOM if stacked else 360) + extra, top=90 + extra)


def training_figure(ckpt_dir: str | Path | None) -> go.Figure:
    """Training curves from the checkpoint's metrics.jsonl: train loss per step, val loss / ppl per epoch,
    and, for runs that chose their best epoch by it, validation chrF per epoch in a second panel."""
    rows = read_metrics(ckpt_dir) if ckpt_dir else []
    # per-step rows carry train_loss alone; epoch rows give the epoch's mean train loss beside val_loss
    steps = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r and "step" in r and "val_loss" not in r]
    epochs = [r for r in rows if "val_loss" in r and "step" in r]
    if not steps and not epochs:
        return note_figure("이 체크포인트에는 학습 기록(metrics.jsonl)이 없어요.")
    chrf = [(r["step"], r["val_chrf"]) for r in epochs if r.get("val_chrf") is not None]
    specs = [[{"secondary_y": True}]] + ([[{"secondary_y": False}]] if chrf else [])
    fig = make_subplots(rows=len(specs), cols=1, specs=specs, shared_xaxes=True, vertical_spacing=0.08,
                        row_heights=[0.62, 0.38] if chrf else None)

    def line(xy: list[tuple[float, float]], name: str, row: int = 1, **style: Any) -> None:
        if xy:
            fig.add_trace(go.Scatter(x=[x for x, _ in xy], y=[y for _, y in xy], name=name, **style),
                          row=row, col=1, **({"secondary_y": name == "val ppl"} if row == 1 else {}))

    line(steps, "train loss (step)", mode="lines", line=dict(width=1))
    line([(r["step"], r["train_loss"]) for r in epochs if "train_loss" in r], "train loss (epoch)",
         mode="lines+markers")
    line([(r["step"], r["val_loss"]) for r in epochs], "val loss", mode="lines+markers")
    line([(r["step"], r["val_ppl"]) for r in epochs if r.get("val_ppl") is not None], "val ppl",
         mode="lines+markers", line=dict(dash="dot"))
    fig.update_yaxes(title=dict(text="loss"), row=1, col=1, secondary_y=False)
    fig.update_yaxes(title=dict(text="perplexity"), row=1, col=1, secondary_y=True)
    if chrf:
        line(chrf, "val chrF", row=2, mode="lines+markers", line=dict(color="#31a354"))
        fig.update_yaxes(title=dict(text="chrF"), row=2, col=1)
    fig.update_xaxes(title=dict(text="step"), row=len(specs), col=1)
    fig = _layout(fig, "학습 곡선 training curves", height=(480 if chrf else 360) + 90)
    return fig.update_layout(legend=dict(orientation="h", x=0.5, xanchor="center", y=-0.2, yanchor="top"),
                             margin=dict(b=110))  # under the step axis: beside the plot it covers the perplexity axis on a phone


# ---------------------------------------------------------------- attention over the epochs
EPOCHS_TEXT = ("#### 학습이 진행되면서 어텐션이 정렬되는 모습 · attention forming over training\n"
               "학습 중 에폭마다 같은 메시지 몇 개에 답하게 하고 그 어텐션을 기록했어요. 슬라이더로 에폭을 옮기면 "
               "처음의 흐릿한 가중치가 입력 조각에 정렬되는 과정을 볼 수 있습니다. (After every epoch, training "
               "answered the same few messages (greedy) and kept their attention: slide through the epochs to "
               "watch alignment emerge from noise.) 기억 모델은 기억한 답변을 따라 읽도록 직접 배우기 때문에 "
               "(copy_alignment) 첫 에폭부터 또렷해요. (A recall model is taught to follow a recalled answer, so "
               "its attention is sharp from the first epoch.)")
NO_PROBE_NOTE = ("이 체크포인트는 에폭별 어텐션을 기록하기 전에 학습되었어요. (This checkpoint was trained before "
                 "attention was recorded per epoch.)")


def probe_log(ckpt_dir: str | Path | None) -> dict[int, list[dict[str, Any]]]:
    """The attention that training recorded per epoch (``chatbot.train.attention_probe``): epoch -> one
    entry per probe message. {} for a checkpoint trained before it was recorded, or without attention.
    An epoch validated twice (a run stopped at train.max_steps inside it, then resumed): the later record."""
    rows = read_metrics(ckpt_dir) if ckpt_dir else []
    return {int(r["epoch"]): r[PROBE_KEY] for r in rows if r.get(PROBE_KEY) and "epoch" in r}


def probe_epochs(ckpt_dir: str | Path | None) -> list[int]:
    """The epochs whose attention the checkpoint's log holds, in order (the About tab's slider)."""
    return sorted(probe_log(ckpt_dir))


def probe_messages(ckpt_dir: str | Path | None) -> list[str]:
    """The probe messages of the checkpoint's log, in order (the About tab's dropdown)."""
    log = probe_log(ckpt_dir)
    return [entry["message"] for entry in log[max(log)]] if log else []


def epoch_figure(ckpt_dir: str | Path | None, message_index: Any = 0, epoch: Any = None) -> go.Figure:
    """The heatmap of probe message ``message_index`` at ``epoch`` (the recorded epoch nearest to it; None:
    the last), drawn by :func:`attention_figure`; a note for a checkpoint without the log."""
    log = probe_log(ckpt_dir)
    if not log:
        return note_figure(NO_PROBE_NOTE)
    epochs = sorted(log)
    try:
        wanted = float(epoch) if epoch is not None else epochs[-1]
    except (TypeError, ValueError):
        wanted = epochs[-1]
    shown = min(epochs, key=lambda e: (abs(e - wanted), e))
    entries = log[shown]
    try:
        entry = entries[min(max(int(message_index or 0), 0), len(entries) - 1)]
    except (TypeError, ValueError):
        entry = entries[0]
    title = f"에폭 epoch {shown} / {epochs[-1]} · {literal(entry['message'])}"
    if not entry["reply"]:
        return note_figure(f"에폭 epoch {shown}: 빈 답변이에요. (The reply ended at once: nothing to show.)")
    groups = [ColumnGroup(**g) for g in entry.get("groups", [])]
    gate = np.asarray(entry["gate"]) if entry.get("gate") is not None else None
    fig = attention_figure(entry["source"], entry["reply"], np.asarray(entry["attention"], dtype=float), title,
                           groups, gate)
    # the title goes above the column labels (and a recall model's group names): 50 px more on top
    return fig.update_layout(height=fig.layout.height + 50, margin=dict(t=fig.layout.margin.t + 50),
                             title=dict(yref="container", y=1.0, yanchor="top", pad=dict(t=12)))


# ---------------------------------------------------------------- chat
def _turn_reply(turns: Sequence[Turn] | None, index: Any) -> Reply | None:
    turns = list(turns or [])
    if not turns:
        return None
    try:
        i = int(index)
    except (TypeError, ValueError):
        i = len(turns) - 1
    return turns[i].reply if 0 <= i < len(turns) else turns[-1].reply


class FigureThrottle:
    """When a streaming reply's heatmap is worth rebuilding: at most every ``interval`` seconds, and never
    sooner than ``share`` times as long as the last one took to build. Each heatmap costs time (and
    bytes to the browser) in proportion to the rows so far, so one per piece would make a reply's
    cost grow with the square of its length; so throttled, building heatmaps takes at most
    1 / (1 + share) of the stream's time and the total stays linear in it."""

    def __init__(self, interval: float = FIGURE_INTERVAL, share: float = FIGURE_SHARE,
                 clock: Callable[[], float] = time.monotonic):
        self.interval, self.share, self.clock = interval, share, clock
        self.due = clock() + interval  # the first heatmap after one interval: a short reply sends only its last

    def __call__(self, reply: Reply) -> go.Figure | None:
        """The heatmap of ``reply`` if one is due, else None (the browser keeps the last one)."""
        start = self.clock()
        if start < self.due:
            return None
        fig = reply_figure(reply)
        end = self.clock()
        self.due = end + max(self.interval, self.share * (end - start))
        return fig


def _prompted(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``history`` ending in one empty-message prompt: repeated empty sends do not stack prompts."""
    if history and history[-1] == {"role": "assistant", "content": EMPTY_PROMPT}:
        history = history[:-1]
    return [*history, {"role": "assistant", "content": EMPTY_PROMPT}]


def chat_stream(bot: ChatBot, message: Any, history: Sequence[Any] | None, turns: Sequence[Turn] | None,
                topic: int | None = None, model: str | None = None, *,
                throttle: Callable[[Reply], go.Figure | None] | None = None,
                **decoding: Any) -> Iterator[tuple[list[dict[str, Any]], go.Figure | None, list[Turn]]]:
    """Stream one reply: yields (chat history, attention heatmap or None, turns) once per generated piece.

    The chat text is new every piece; the heatmap (one row per piece so far) only when ``throttle``
    (default: a :class:`FigureThrottle`) says one is due, else None: the last one sent still stands.
    The final yield always carries the finished heatmap, and the turn. An empty message yields a
    friendly prompt without running the model; of an over-long one the model reads the first pieces,
    and the reply says how many. ``topic``: the topic for a model that reads one (None: predicted).
    ``model``: the answering model's name, shown under its reply and kept in the turn (None: unlabelled).
    """
    history = normalize_history(history)
    turns = list(turns or [])[-(MAX_TURNS - 1):]  # room for this one
    text = clean_message(message)
    if not text.strip():
        yield _prompted(history), reply_figure(_turn_reply(turns, None)), turns
        return
    history.append({"role": "user", "content": literal(text)})
    history.append({"role": "assistant", "content": "…"})
    yield list(history), note_figure(THINKING_NOTE), turns
    throttle = throttle or FigureThrottle()
    for step in bot.stream(text, topic=topic, **decoding):
        reply = step.reply
        if step.done:
            break
        history[-1] = {"role": "assistant", "content": literal(reply.text)}
        yield list(history), throttle(reply), turns
    if not reply.generated:  # the message had no pieces ("\u200b")
        history[-1] = {"role": "assistant", "content": EMPTY_PROMPT}
        yield list(history), reply_figure(_turn_reply(turns, None)), turns
        return
    note = "\n".join(n for n in (truncated_note(reply), unfinished_note(reply)) if n)
    history[-1] = {"role": "assistant",
                   "content": labelled(literal(reply.text or "…") + (f"\n{note}" if note else ""), model)}
    turns = [*turns, Turn(text, reply, model or "")]  # new lists each yield: gradio diffs streamed values
    yield list(history), reply_figure(reply), turns


def turn_choices(turns: Sequence[Turn] | None) -> list[tuple[str, int]]:
    """(label, index) for each turn, for the dropdown that brings back an earlier heatmap; a turn that
    knows its model says which answered ("2. 안녕 · additive")."""
    return [(f"{i + 1}. {t.message[:24]}{'…' if len(t.message) > 24 else ''}{f' · {t.model}' if t.model else ''}", i)
            for i, t in enumerate(turns or [])]


def nbest_rows(reply: Reply | None) -> list[list[Any]]:
    """The beam's n-best list as table rows [rank, reply, score]; greedy/sampling give one row."""
    if reply is None or not reply.generated:
        return []
    hyps = reply.n_best or [reply]
    return [[i + 1, h.text, f"{float(h.score):.4f}"] for i, h in enumerate(hyps)]


@dataclass
class TurnView:
    """Everything shown for one turn beside the chat (the demo maps it onto components)."""

    heatmap: go.Figure
    nbest: list[list[Any]]
    steps: int  # reply pieces: the step slider's maximum (0: no reply yet, nothing to step through)
    step: go.Figure
    status: str


def shown_reply(turns: Sequence[Turn] | None, index: Any = None, hypothesis: Any = 0) -> Reply | None:
    """The reply whose heatmap turn ``index`` shows (default: the last turn): its n-best ``hypothesis``,
    or the reply itself for 0 (the best) and for a row it does not have."""
    reply = _turn_reply(turns, index)
    try:
        hypothesis = int(hypothesis or 0)
    except (TypeError, ValueError):
        hypothesis = 0
    if reply is not None and reply.n_best and 0 < hypothesis < len(reply.n_best):
        return reply.n_best[hypothesis]
    return reply


def turn_view(turns: Sequence[Turn] | None, index: Any = None, hypothesis: int = 0) -> TurnView:
    """The heatmap, n-best table and step inspector of turn ``index`` (default: the last),
    for its n-best ``hypothesis`` (0 = best)."""
    reply = shown_reply(turns, index, hypothesis)
    if reply is None:
        return TurnView(reply_figure(None), [], 0, step_figure(None, 1), "")
    status = (f"{len(reply.source_tokens)}개 입력 조각 → {len(reply.reply_tokens)}개 답변 조각 "
              f"({len(reply.source_tokens)} source → {len(reply.reply_tokens)} reply pieces)")
    if reply.groups:  # a recall model: the message, its recalls, how much it copied
        shares = [c for c, _ in pieces_copied(reply) or [] if c is not None]
        copied = float(np.mean(shares)) if shares else 0.0  # the pieces' own copied shares (the strip)
        status = (f"메시지 {len(reply.message_tokens)}조각 + 기억 {len(reply.groups) - 1}개 "
                  f"({len(reply.source_tokens) - len(reply.message_tokens)}조각) → {len(reply.reply_tokens)}개 답변 조각"
                  f" · 평균 복사 mean copied {copied:.0%}")
    if hypothesis:
        status += f" · {hypothesis + 1}번째 후보 hypothesis"
    if reply.attention is None:
        status += " · " + NO_ATTENTION_NOTE
    if reply.topic is not None:
        status += " · " + topic_note(reply)
    return TurnView(reply_figure(reply), nbest_rows(_turn_reply(turns, index)), len(reply.reply_tokens),
                    step_figure(reply, len(reply.reply_tokens)), status)


def replay_pace(pace: Any) -> float:
    """The replay's pace in pieces per second, clamped into REPLAY_PACE's range; anything that is not a
    finite number (an API client's None, NaN, text) takes its default."""
    low, high, default = REPLAY_PACE
    try:
        pace = float(pace)
    except (TypeError, ValueError):
        return default
    return min(max(pace, low), high) if math.isfinite(pace) else default


def partial_figure(reply: Reply | None, rows: int) -> go.Figure:
    """The heatmap of ``reply``'s first ``rows`` pieces, as it stood while the reply streamed (the figure
    builders cut the attention and the copy strip to the rows given); all rows: :func:`reply_figure`."""
    if reply is None or not reply.generated or not reply.reply_tokens:
        return reply_figure(reply)
    return attention_figure(reply.source_tokens, reply.reply_tokens[:max(1, int(rows))], reply.attention,
                            None, reply.groups, reply.gate, pieces_copied(reply))


def replay(turns: Sequence[Turn] | None, index: Any = None, hypothesis: Any = 0, pace: Any = None, *,
           sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> Iterator[go.Figure]:
    """Replay the growth of turn ``index``'s heatmap (its n-best ``hypothesis``, as :func:`turn_view`
    shows it): yields the heatmap of 1, 2, ..., n rows, ``pace`` pieces a second (:func:`replay_pace`),
    the last one the finished heatmap. A turn with nothing to grow (none yet, no attention) yields its
    heatmap once. Bounded: n is the reply's length (at most max_len + 1 pieces) and every frame waits
    for its due time, so a replay costs n figure builds however it is paced."""
    reply = shown_reply(turns, index, hypothesis)
    if reply is None or not reply.generated or reply.attention is None or not reply.reply_tokens:
        yield reply_figure(reply)
        return
    interval, due = 1.0 / replay_pace(pace), clock()
    for rows in range(1, len(reply.reply_tokens) + 1):
        wait = due - clock()
        if wait > 0:
            sleep(wait)
        yield partial_figure(reply, rows)
        due = max(due + interval, clock())  # a slow build delays the next frame, never bunches the rest


# ---------------------------------------------------------------- API, compare, about
def reply_json(bot: ChatBot, message: Any, topic: int | None = None, **decoding: Any) -> dict[str, Any]:
    """The ``/reply`` endpoint: :meth:`Reply.to_dict` plus a note when the model read part of the message."""
    text = clean_message(message)
    reply = bot.reply(text, topic=topic, **decoding) if text.strip() else EMPTY_REPLY
    out = reply.to_dict()
    if reply.truncated:
        out["note"] = truncated_note(reply)
    return out


def compare(bots: dict[str, ChatBot], message: Any) -> list[tuple[str, go.Figure]]:
    """The same message answered by each bot (greedy): (reply text, heatmap) per bot, in order."""
    text = clean_message(message)
    out = []
    for name, bot in bots.items():
        reply = bot.reply(text) if text.strip() else EMPTY_REPLY
        if not reply.generated:
            out.append((EMPTY_PROMPT, reply_figure(None)))
            continue
        note = "".join(f"\n\n{n}" for n in (truncated_note(reply), unfinished_note(reply)) if n)
        if reply.topic is not None:
            note += f"\n\n({topic_note(reply).replace('**', '')})"
        out.append((reply.text + note, reply_figure(reply)))
    return out


def model_card(bot: ChatBot) -> str:
    """The checkpoint's README.md (model card), or a line saying there is none."""
    card = Path(bot.path) / "README.md" if bot.path else None
    if card is not None and card.is_file():
        return card.read_text(encoding="utf-8")
    return f"`{bot.name}`: 모델 카드(README.md)가 없어요."


ATTENTION_KINDS = {"none": "어텐션 없음 no attention", "dot": "어텐션 attention (Luong dot)",
                   "general": "어텐션 attention (Luong general)", "additive": "더하기 어텐션 additive (Bahdanau)"}


def model_kind(bot: ChatBot) -> str:
    """What sets a checkpoint apart, in a few words: its attention, recall and topic input."""
    m = bot.config.model
    kind = f"기억 {m.recall_k}개 + 복사 recall & copy" if m.recall_k else ATTENTION_KINDS.get(m.attention, m.attention)
    return kind + (" · 주제 입력 topic" if m.num_topics else "")


def model_choices(bots: dict[str, ChatBot]) -> list[tuple[str, str]]:
    """The model dropdown's (label, value): each checkpoint's name and what sets it apart."""
    return [(f"{name} — {model_kind(bot)}", name) for name, bot in bots.items()]


def describe(bot: ChatBot, name: str | None = None) -> str:
    """One markdown line on a loaded checkpoint (``name``: how the demo calls it)."""
    m = bot.config.model
    return f"**{literal(name or bot.name)}** · {m.rnn.upper()} {m.hidden_dim} · {model_kind(bot)}"


ATTENTION_EXPLAINED = r"""
### 인코더 · 디코더 · 어텐션 (How it works)

**인코더 encoder** — 양방향 RNN이 입력 메시지의 조각(sentencepiece piece)을 차례로 읽어 조각마다 은닉 상태
$\bar h_s$ 를 만듭니다. (A bidirectional RNN turns each source piece into a state $\bar h_s$.)

**디코더 decoder** — 다른 RNN이 답변을 한 조각씩 만듭니다. $t$번째 단계의 상태를 $h_t$ 라고 합니다.
(Another RNN writes the reply piece by piece; $h_t$ is its state at step $t$.)

**어텐션 attention** — 조각을 하나 만들 때마다 디코더는 입력의 어느 부분을 볼지 정합니다: 입력 조각마다 점수를
매기고, softmax로 가중치 $a_t(s)$ 를 만들어, 그 가중치로 문맥 벡터 $c_t$ 를 모읍니다.
(At every step the decoder scores each source piece, turns the scores into weights $a_t(s)$ with a
softmax and takes the weighted sum $c_t$ of the source states.)

$$a_t(s) = \mathrm{softmax}_s\big(e_{ts}\big) = \frac{\exp e_{ts}}{\sum_{s'} \exp e_{ts'}} \qquad c_t = \sum_s a_t(s)\, \bar h_s$$

**Luong et al. (2015): dot, general** — RNN이 먼저 한 단계를 진행하고, 그 출력 $h_t$ 로 점수를 매긴 뒤 문맥을
출력 쪽에서 합칩니다. (The RNN steps first; its output $h_t$ scores the source, and the context joins on
the output side.)

$$e_{ts} = h_t^\top \bar h_s \;\text{(dot)}, \qquad e_{ts} = h_t^\top W_a \bar h_s \;\text{(general)}, \qquad h_t = \mathrm{RNN}\big(y_{t-1},\, h_{t-1}\big)$$

**Bahdanau et al. (2015): additive** — 이전 상태 $h_{t-1}$ (논문의 $s_{t-1}$)로 점수를 매기고, 문맥 $c_t$ 는
RNN의 입력이 됩니다. (The previous state $h_{t-1}$, the paper's $s_{t-1}$, scores the source, and the
context is an input of the RNN step.)

$$e_{ts} = v_a^\top \tanh\big(W_a h_{t-1} + U_a \bar h_s\big), \qquad h_t = \mathrm{RNN}\big([y_{t-1}; c_t],\, h_{t-1}\big)$$

**출력 output** — 두 방식 모두 문맥과 상태를 합쳐 다음 조각의 확률을 냅니다.
(Both then combine context and state into the next piece's probabilities.)

$$\tilde h_t = \tanh\big(W_c [c_t; h_t]\big) \qquad p(y_t \mid y_{<t}, x) = \mathrm{softmax}(W_s \tilde h_t)$$

히트맵의 한 행이 바로 $a_t$ 입니다: $t$번째 답변 조각을 만들 때 입력 조각마다 준 가중치이고, 행의 합은 1입니다.
(Each heatmap row is $a_t$; it sums to 1.)

### 기억 모델 (recall: read similar training pairs, copy or generate)

**기억 recall** — `recall` 모델은 메시지와 비슷한 학습 질문 $K$개를 글자 n-gram TF-IDF로 찾아, 그 질문과 답변을
함께 읽습니다 (기억 1 … 기억 $K$, 유사도 점수와 함께). 디코더의 어텐션은 **하나의 softmax** 로
[메시지 ; 기억 1 ; … ; 기억 $K$] 전체에 걸치므로, 히트맵의 한 행은 여전히 모든 열에 걸쳐 합이 1입니다.
(The `recall` model also reads the $K$ training pairs whose questions look most like the message, found by
character n-gram TF-IDF, each with its similarity score. One softmax spans [message ; recall 1 ; … ;
recall $K$], so a heatmap row still sums to 1 over every column.)

**복사 게이트 copy gate** (See et al., 2017) — 조각마다 게이트 $g_t$ 가 새로 만들지(생성), 어텐션이 가리키는
조각을 그대로 가져올지(복사) 섞습니다. 히트맵 오른쪽 주황색 띠는 각 답변 조각의 확률 중 복사에서 온 몫이고,
마우스를 올리면 게이트의 복사 가중치 $1 - g_t$ 도 보입니다. (At every piece a gate $g_t$ mixes generating from
the vocabulary with copying the attended pieces; the orange strip beside the heatmap is the share of each
reply piece's probability that came from copying, $(1 - g_t) \sum_{s:\, x_s = y_t} a_t(s) / p(y_t)$; its hover
also gives the gate's copy weight $1 - g_t$.)

$$g_t = \sigma\big(w_g^\top [c_t; h_t; e(y_{t-1})] + b_g\big) \qquad p(y_t) = g_t\, \mathrm{softmax}(W_s \tilde h_t)_{y_t} + (1 - g_t) \sum_{s:\, x_s = y_t} a_t(s)$$

**이어 읽기 continuation** — 방금 쓴 조각 $y_{t-1}$ 바로 다음 자리(같은 글 안에서 $x_{s-1} = y_{t-1}$)의 어텐션 점수에
모든 조각이 함께 쓰는 값 $c$ 와 조각마다 배운 값 $u_{y_{t-1}}$ 을 더합니다. 한 기억을 베끼기 시작했으면 그 자리에서
이어 가게 해, 여러 기억의 조각을 이어 붙인 어색한 문장을 줄입니다. 학습 때는 기억의 답변이 정답과 똑같으면 $t$번째 조각을 만들 때 그 답변의 $t$번째
조각을 보도록 가르칩니다 (guided alignment).
(Before the softmax, every position that follows the piece just written in its own text gets a learned
bonus $c + u_{y_{t-1}}$ ($c$ shared, $u$ per piece), so a copy that has begun goes on in the same recall
instead of splicing pieces from several. In training, where a recalled answer is the whole target answer, step $t$ is taught to look at its
$t$-th piece.)

$$e_t(s) = h_t^\top W_a \bar h_s + (c + u_{y_{t-1}}) [x_{s-1} = y_{t-1}] \qquad a_t = \mathrm{softmax}(e_t)$$

답변은 언제나 디코더가 한 조각씩 만듭니다: 저장된 답을 그대로 돌려주지 않고, 복사도 조각 단위의 선택입니다.
(The decoder still writes every reply piece by piece: copying is a per-piece choice, never a stored answer
returned whole.)
"""
