"""The demo's callbacks as plain functions, and the plotly figures they return.

Nothing here imports gradio: ``chatbot/demo.py`` wires these functions to components, so
every behaviour of the demo can be tested without a server or a browser.

Chat history is gradio's messages format: ``[{"role": "user" | "assistant", "content": ...}]``.
Per-session turn history (for bringing back an earlier heatmap) is a list of :class:`Turn`.
"""
from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .checkpoint import read_metrics
from .inference import EMPTY_PROMPT, MAX_MESSAGE_CHARS, ChatBot, Reply

FONT_FAMILY = "NanumGothic, Noto Sans KR, Malgun Gothic, Apple SD Gothic Neo, sans-serif"
MAX_INPUT_CHARS = MAX_MESSAGE_CHARS  # the Textbox's max_length; the callbacks cut API input to this too
EXAMPLES = ["오늘 너무 힘들었어", "헤어진 지 한 달 됐어", "좋아하는 사람이 생겼어", "주말에 뭐 하지"]
STRATEGY_CHOICES = [("탐욕 greedy", "greedy"), ("빔 beam", "beam"), ("샘플링 sampling", "sample")]
TRUNCATED_NOTE = f"(메시지가 길어서 앞부분 {MAX_INPUT_CHARS}자까지만 읽었어요. / Message truncated.)"
NO_ATTENTION_NOTE = "이 모델은 어텐션이 없어요 (no-attention baseline): 보여 줄 히트맵이 없습니다."
NBEST_HEADERS = ["순위 rank", "답변 reply", "점수 score"]
TOPIC_AUTO = "auto"  # the topic radio's value for "predict it from the message"
TOPIC_HELP = ("이 모델은 질문과 함께 주제(말뭉치의 label)를 읽어요. 자동이면 메시지에서 예측합니다. "
              "같은 메시지를 주제만 바꿔 보내 보세요. (This model reads a topic; auto predicts it.)")
EMPTY_REPLY = Reply(EMPTY_PROMPT, [], [], None, generated=False)  # what ChatBot.reply gives for "", without the call


@dataclass
class Turn:
    """One answered message of a session: what the heatmap selector brings back."""

    message: str
    reply: Reply


# ---------------------------------------------------------------- inputs
def literal(text: str) -> str:
    """Escape HTML so a message or reply shows as typed (the Chatbot renders HTML; markdown is off).

    Plotly labels take the same escaping: it parses a few tags (<b>, <br>) in tick and hover text
    and turns entities back into characters.
    """
    return html.escape(text, quote=False)


def content_text(content: Any) -> str:
    """A chat message's content as plain text: gradio sends a str or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return str(content)


def normalize_history(history: Sequence[Any] | None) -> list[dict[str, str]]:
    """Messages-format history with every content flattened to a str."""
    out = []
    for m in history or []:
        if isinstance(m, dict):
            out.append({"role": m.get("role", "assistant"), "content": content_text(m.get("content"))})
    return out


def clean_message(message: Any) -> tuple[str, bool]:
    """(message cut to MAX_INPUT_CHARS, whether it was cut). API clients bypass the textbox limit."""
    text = content_text(message)
    return text[:MAX_INPUT_CHARS], len(text) > MAX_INPUT_CHARS


def decoding_kwargs(strategy: str = "greedy", beam_size: float = 5, temperature: float = 1.0,
                    top_k: float = 0, top_p: float = 1.0, max_len: float = 40, no_repeat_ngram: float = 0,
                    length_penalty: float = 1.0, repetition_penalty: float = 1.0) -> dict[str, Any]:
    """The decoding controls as :class:`chatbot.search.DecodeOptions` fields (sliders send floats)."""
    strategy = strategy if strategy in {v for _, v in STRATEGY_CHOICES} else "greedy"
    beam = max(1, int(beam_size or 1))
    return dict(strategy=strategy, beam_size=beam, n_best=beam if strategy == "beam" else 1,
                temperature=max(float(temperature or 1.0), 1e-3), top_k=max(0, int(top_k or 0)),
                top_p=min(max(float(top_p or 1.0), 1e-3), 1.0), max_len=max(1, int(max_len or 40)),
                no_repeat_ngram=max(0, int(no_repeat_ngram or 0)),
                length_penalty=float(length_penalty if length_penalty is not None else 1.0),
                repetition_penalty=max(float(repetition_penalty or 1.0), 1e-3))


def topic_choices(bots: ChatBot | Sequence[ChatBot]) -> list[tuple[str, str]]:
    """The topic radio's (label, value) pairs: auto, then one per topic of the bot that reads the most
    (one radio serves every loaded model; models that read none hide it)."""
    bots = [bots] if isinstance(bots, ChatBot) else list(bots)
    names = max((b.topic_names for b in bots if b.reads_topic), key=len, default=[])
    return [("자동 auto", TOPIC_AUTO)] + [(name, str(i)) for i, name in enumerate(names)]


def topic_label(value: Any, bot: ChatBot) -> int | None:
    """The radio's value as the ``label`` for ``bot``: None (predict it) for auto, for anything that is
    not one of its topics, and for a model that reads no topic."""
    try:
        label = int(value)
    except (TypeError, ValueError):
        return None
    return label if 0 <= label < len(bot.topic_names) else None  # no names: the model reads no topic


def topic_note(reply: Reply | None) -> str:
    """One line on the topic the encoder read, e.g. "주제 topic: 이별 breakup (자동 예측 auto, 96%)"."""
    if reply is None or reply.topic is None:
        return ""
    name = f"주제 topic: **{literal(reply.topic_name)}**"
    top = f"{max(reply.topic_probs):.0%}" if reply.topic_probs else ""
    return {"given": f"{name} (선택 chosen)",
            "predicted": f"{name} (자동 예측 auto, {top})",
            "unsure": f"{name} (자동 auto: 분류기가 확신하지 못함 unsure, 최고 top {top})",
            }.get(reply.topic_source or "", f"{name} (기본값 default: 주제 분류기 없음 no topic classifier)")


# ---------------------------------------------------------------- figures
def _layout(fig: go.Figure, title: str | None = None, height: int | None = None, top: int = 40) -> go.Figure:
    fig.update_layout(font=dict(family=FONT_FAMILY, size=13), margin=dict(l=10, r=10, t=top if title else 10, b=10),
                      title=dict(text=title, x=0.5, xanchor="center") if title else None, template="plotly_white")
    if height:
        fig.update_layout(height=height)
    return fig


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
                     attention: np.ndarray | None, title: str | None = None) -> go.Figure:
    """Heatmap of ``attention`` (len(reply_tokens), len(source_tokens)): reply pieces down, source across.

    Axes use integer positions with tick labels, so a piece that occurs twice keeps two columns.
    """
    if attention is None:
        return note_figure(NO_ATTENTION_NOTE)
    if not reply_tokens or not source_tokens:
        return note_figure("메시지를 보내면 어텐션 히트맵이 여기에 그려져요.")
    att = np.asarray(attention, dtype=float)[: len(reply_tokens), : len(source_tokens)]
    S, R = len(source_tokens), att.shape[0]
    src, rep = [literal(p) for p in source_tokens], [literal(p) for p in reply_tokens[:R]]
    fig = go.Figure(go.Heatmap(
        z=att.round(4).tolist(), x=list(range(S)), y=list(range(R)), zmin=0.0, zmax=1.0,
        colorscale="Blues", colorbar=dict(title=dict(text="weight"), thickness=12),
        customdata=[[[s, r] for s in src] for r in rep], xgap=1, ygap=1,
        hovertemplate="입력 source: %{customdata[0]}<br>출력 reply: %{customdata[1]}"
                      "<br>가중치 weight: %{z:.3f}<extra></extra>"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(S)), ticktext=src, side="top",
                     title=dict(text="입력 조각 source pieces"), tickangle=0)
    fig.update_yaxes(tickmode="array", tickvals=list(range(R)), ticktext=rep, autorange="reversed",
                     title=dict(text="답변 조각 reply pieces"))
    return _layout(fig, title, height=max(260, 120 + 26 * R))


def reply_figure(reply: Reply | None, title: str | None = None) -> go.Figure:
    if reply is None or not reply.generated:
        return note_figure("메시지를 보내면 어텐션 히트맵이 여기에 그려져요.")
    return attention_figure(reply.source_tokens, reply.reply_tokens, reply.attention, title)


def step_figure(reply: Reply | None, step: int) -> go.Figure:
    """Step inspector for step ``step`` (1-based): top-k next-piece probabilities beside that step's attention row."""
    if reply is None or not reply.generated or not reply.reply_tokens:
        return note_figure("답변의 한 단계를 골라 보세요. (Pick a step of a reply.)")
    t = min(max(int(step or 1), 1), len(reply.reply_tokens)) - 1
    has_att = reply.attention is not None
    fig = make_subplots(rows=1, cols=2 if has_att else 1, horizontal_spacing=0.12, subplot_titles=(
        [f"{t + 1}단계 후보 top-k next pieces", f"{t + 1}단계 어텐션 attention row"] if has_att
        else [f"{t + 1}단계 후보 top-k next pieces"]))
    cands = reply.candidates[t] if t < len(reply.candidates) else []
    chosen = reply.reply_tokens[t]
    fig.add_trace(go.Bar(
        x=list(range(len(cands))), y=[round(c.prob, 4) for c in cands],
        marker_color=["#1f77b4" if c.piece == chosen else "#9ecae1" for c in cands],
        customdata=[literal(c.piece) for c in cands], hovertemplate="%{customdata}: %{y:.3f}<extra></extra>"), 1, 1)
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(cands))), ticktext=[literal(c.piece) for c in cands],
                     row=1, col=1)
    fig.update_yaxes(range=[0, 1], title=dict(text="확률 prob"), row=1, col=1)
    if has_att:
        row = np.asarray(reply.attention[t], dtype=float)
        src = [literal(p) for p in reply.source_tokens]
        fig.add_trace(go.Bar(x=list(range(len(src))), y=row.round(4).tolist(), marker_color="#31a354",
                             customdata=src, hovertemplate="%{customdata}: %{y:.3f}<extra></extra>"), 1, 2)
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(src))), ticktext=src, row=1, col=2)
        fig.update_yaxes(range=[0, 1], title=dict(text="가중치 weight"), row=1, col=2)
    fig.update_layout(showlegend=False)
    return _layout(fig, f"선택된 조각 chosen: {literal(chosen)}", height=340, top=70)


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
    return _layout(fig, "학습 곡선 training curves", height=480 if chrf else 360)


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


def chat_stream(bot: ChatBot, message: Any, history: Sequence[Any] | None, turns: Sequence[Turn] | None,
                label: int | None = None, **decoding: Any) -> Iterator[tuple[list[dict[str, str]], go.Figure, list[Turn]]]:
    """Stream one reply: yields (chat history, attention heatmap, turns) once per generated piece.

    An empty message yields a friendly prompt without running the model; an over-long one is cut
    and the reply says so. The heatmap has one row per reply piece generated so far. ``label``:
    the topic for a model that reads one (None: predicted from the message).
    """
    history = normalize_history(history)
    turns = list(turns or [])
    text, cut = clean_message(message)
    if not text.strip():
        history.append({"role": "assistant", "content": EMPTY_PROMPT})
        yield list(history), reply_figure(_turn_reply(turns, None)), turns
        return
    history.append({"role": "user", "content": literal(text)})
    history.append({"role": "assistant", "content": "…"})
    yield list(history), note_figure("생각하는 중… (thinking)"), turns
    reply: Reply | None = None
    for step in bot.stream(text, label=label, **decoding):
        reply = step.reply
        history[-1] = {"role": "assistant", "content": literal(reply.text)}
        yield list(history), reply_figure(reply), turns
    if reply is None:  # the model ended at once, or the message had no pieces ("\u200b")
        reply = bot.reply(text, label=label, **decoding)
        if not reply.generated:
            history[-1] = {"role": "assistant", "content": EMPTY_PROMPT}
            yield list(history), reply_figure(_turn_reply(turns, None)), turns
            return
    note = TRUNCATED_NOTE if (cut or reply.truncated) else ""
    history[-1] = {"role": "assistant", "content": literal(reply.text or "…") + (f"\n{note}" if note else "")}
    turns = [*turns, Turn(text, reply)]  # new lists each yield: gradio diffs streamed values
    yield list(history), reply_figure(reply), turns


def turn_choices(turns: Sequence[Turn] | None) -> list[tuple[str, int]]:
    """(label, index) for each turn, for the dropdown that brings back an earlier heatmap."""
    return [(f"{i + 1}. {t.message[:24]}{'…' if len(t.message) > 24 else ''}", i) for i, t in enumerate(turns or [])]


def nbest_rows(reply: Reply | None) -> list[list[Any]]:
    """The beam's n-best list as table rows [rank, reply, score]; greedy/sampling give one row."""
    if reply is None or not reply.generated:
        return []
    hyps = reply.n_best or [reply]
    return [[i + 1, h.text, round(float(h.score), 4)] for i, h in enumerate(hyps)]


@dataclass
class TurnView:
    """Everything shown for one turn beside the chat (the demo maps it onto components)."""

    heatmap: go.Figure
    nbest: list[list[Any]]
    steps: int  # reply pieces: the step slider's maximum
    step: go.Figure
    status: str


def turn_view(turns: Sequence[Turn] | None, index: Any = None, hypothesis: int = 0) -> TurnView:
    """The heatmap, n-best table and step inspector of turn ``index`` (default: the last),
    for its n-best ``hypothesis`` (0 = best)."""
    reply = _turn_reply(turns, index)
    if reply is not None and reply.n_best and 0 < hypothesis < len(reply.n_best):
        reply = reply.n_best[hypothesis]
    if reply is None:
        return TurnView(reply_figure(None), [], 1, step_figure(None, 1), "")
    status = f"{len(reply.source_tokens)}개 입력 조각 → {len(reply.reply_tokens)}개 답변 조각"
    if hypothesis:
        status += f" · {hypothesis + 1}번째 후보 hypothesis"
    if reply.attention is None:
        status += " · " + NO_ATTENTION_NOTE
    if reply.topic is not None:
        status += " · " + topic_note(reply)
    return TurnView(reply_figure(reply), nbest_rows(_turn_reply(turns, index)), max(1, len(reply.reply_tokens)),
                    step_figure(reply, len(reply.reply_tokens)), status)


def hypothesis_reply(turns: Sequence[Turn] | None, index: Any, hypothesis: int) -> Reply | None:
    reply = _turn_reply(turns, index)
    if reply is not None and reply.n_best and 0 <= hypothesis < len(reply.n_best):
        return reply.n_best[hypothesis]
    return reply


# ---------------------------------------------------------------- API, compare, about
def reply_json(bot: ChatBot, message: Any, label: int | None = None, **decoding: Any) -> dict[str, Any]:
    """The ``/reply`` endpoint: :meth:`Reply.to_dict` plus a note when the message was cut."""
    text, cut = clean_message(message)
    reply = bot.reply(text, label=label, **decoding) if text.strip() else EMPTY_REPLY
    out = reply.to_dict()
    out["truncated"] = bool(cut or reply.truncated)
    out["generated"] = reply.generated
    if out["truncated"]:
        out["note"] = TRUNCATED_NOTE
    return out


def compare(bots: dict[str, ChatBot], message: Any) -> list[tuple[str, go.Figure]]:
    """The same message answered by each bot (greedy): (reply text, heatmap) per bot, in order."""
    text, cut = clean_message(message)
    out = []
    for name, bot in bots.items():
        reply = bot.reply(text) if text.strip() else EMPTY_REPLY
        if not reply.generated:
            out.append((EMPTY_PROMPT, reply_figure(None)))
            continue
        note = f"\n\n{TRUNCATED_NOTE}" if (cut or reply.truncated) else ""
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


def describe(bot: ChatBot, name: str | None = None) -> str:
    """One markdown line on a loaded checkpoint (``name``: how the demo calls it)."""
    m = bot.config.model
    topic = " · 주제 입력 reads a topic" if m.num_labels else ""
    return f"**{literal(name or bot.name)}** · {m.rnn.upper()} {m.hidden_dim} · attention `{m.attention}`{topic}"


ATTENTION_EXPLAINED = r"""
### 인코더 · 디코더 · 어텐션 (How it works)

**인코더 encoder** — 양방향 RNN이 입력 메시지의 조각(sentencepiece piece)을 차례로 읽어 조각마다 은닉 상태
$\bar h_s$ 를 만듭니다. (A bidirectional RNN turns each source piece into a state $\bar h_s$.)

**디코더 decoder** — 다른 RNN이 답변을 한 조각씩 만듭니다. $t$번째 단계의 상태를 $h_t$ 라고 합니다.

**어텐션 attention (Luong et al., 2015)** — 조각을 하나 만들 때마다 디코더는 입력의 어느 부분을 볼지 정합니다.

$$\mathrm{score}(h_t, \bar h_s) = h_t^\top \bar h_s \;\text{(dot)},\quad h_t^\top W_a \bar h_s \;\text{(general)},\quad v_a^\top \tanh(W_a[h_t; \bar h_s]) \;\text{(additive)}$$

$$a_t(s) = \mathrm{softmax}_s\big(\mathrm{score}(h_t, \bar h_s)\big) = \frac{\exp \mathrm{score}(h_t, \bar h_s)}{\sum_{s'} \exp \mathrm{score}(h_t, \bar h_{s'})}$$

$$c_t = \sum_s a_t(s)\, \bar h_s \qquad \tilde h_t = \tanh\big(W_c [c_t; h_t]\big) \qquad p(y_t \mid y_{<t}, x) = \mathrm{softmax}(W_s \tilde h_t)$$

히트맵의 한 행이 바로 $a_t$ 입니다: $t$번째 답변 조각을 만들 때 입력 조각마다 준 가중치이고, 행의 합은 1입니다.
(Each heatmap row is $a_t$; it sums to 1.)
"""
