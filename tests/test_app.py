"""The real app, launched on a free port with the tiny checkpoint, driven through gradio_client."""
from __future__ import annotations

import sys
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from chatbot.loadtest import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # app.py lives at the repository root

import app  # noqa: E402

MSG = "헤어진 지 한 달 됐어"



@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """(url, bot): the demo built and launched the way app.py does, closed in teardown."""
    from chatbot.demo import build_demo, launch

    bots = app.load_bots([tiny_checkpoint], device="cpu")
    demo = build_demo(bots)
    _, url, _ = launch(demo, checkpoint_dirs=[tiny_checkpoint], server_port=free_port(),
                       prevent_thread_lock=True, quiet=True)
    yield url, next(iter(bots.values()))
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    from chatbot.loadtest import client as loopback_client

    return loopback_client(served[0])  # analytics off: tests send nothing off the machine


def test_reply_endpoint_returns_attention_rows_that_sum_to_one(client, served):
    out = client.predict(MSG, api_name="/reply")
    assert isinstance(out, dict) and out["reply"] and out["generated"]
    att = np.array(out["attention"])
    assert att.shape == (len(out["reply_tokens"]), len(out["source_tokens"]))
    np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=1e-3)
    assert out["source_tokens"] == served[1].reply(MSG).source_tokens


def test_reply_endpoint_takes_decoding_controls_by_name(client):
    out = client.predict(MSG, strategy="beam", beam_size=3, api_name="/reply")
    assert len(out["n_best"]) == 3 and out["reply"] == out["n_best"][0]["reply"]


def test_empty_message_gets_a_prompt(client):
    out = client.predict("   ", api_name="/reply")
    assert out["generated"] is False and out["attention"] == [] and "입력" in out["reply"]
    history, _ = client.predict("", api_name="/chat")
    assert "입력" in history[-1]["content"][0]["text"]


def test_very_long_message_returns_quickly_and_says_it_was_cut(client):
    start = time.perf_counter()
    out = client.predict("가나다라 " * 2_000, api_name="/reply")
    assert time.perf_counter() - start < 10
    assert out["truncated"] and out["note"]


def test_streaming_chat_endpoint_through_the_client(client, served):
    job = client.submit(MSG, api_name="/chat")
    updates = list(job)
    history, plot = job.result()
    assert len(updates) >= 2  # the placeholder, then pieces
    assert history[0]["content"][0]["text"] == MSG
    assert history[-1]["content"][0]["text"] == served[1].reply(MSG).text
    assert plot["type"] == "plotly"


def test_a_long_history_is_cut_to_its_last_messages(client):
    """The page sends its whole chat back with every message; the server reads only the last
    MAX_HISTORY_MESSAGES - 2 of them (room for this turn), each cut to MAX_CONTENT_CHARS."""
    from chatbot import ui

    history = [{"role": ("user", "assistant")[i % 2], "content": [{"type": "text", "text": str(i)}]} for i in range(500)]
    history[-1]["content"][0]["text"] = "가" * 100_000
    out, _ = client.predict(MSG, history, api_name="/chat")
    texts = [m["content"][0]["text"] for m in out]
    assert len(out) == ui.MAX_HISTORY_MESSAGES
    assert texts[0] == str(500 - ui.MAX_HISTORY_MESSAGES + 2)
    assert texts[-3] == "가" * ui.MAX_CONTENT_CHARS and texts[-2] == MSG


def test_chat_streams_text_every_piece_and_the_heatmap_at_most_every_interval(client):
    from chatbot import ui

    start = time.perf_counter()
    job = client.submit(MSG, strategy="sample", temperature=2.0, max_len=80, api_name="/chat")
    updates = list(job)
    wall = time.perf_counter() - start
    history, plot = job.result()
    rows = len(json.loads(plot["plot"])["data"][0]["z"])  # the finished heatmap: a row per reply piece
    assert len(updates) == rows + 2  # the placeholder, each piece, the finished turn
    heatmaps = [p for _, p in updates if isinstance(p, dict) and p.get("type") == "plotly"]
    assert len(heatmaps) <= wall / ui.FIGURE_INTERVAL + 2, (len(heatmaps), wall)
    assert all(p == {"__type__": "update"} for _, p in updates if p not in heatmaps)  # "keep the last one"


def test_events_after_a_reply_leave_the_heatmap_uncovered(tiny_bot):
    import gradio as gr

    from chatbot.demo import build_demo

    demo = build_demo({"tiny": tiny_bot})
    deps = {d["api_name"]: d for d in demo.config["dependencies"]}
    by_id = {b._id: b for b in demo.blocks.values()}
    assert deps["after_turn"]["show_progress"] == "hidden"  # no full overlay once the stream is done
    assert deps["chat"]["show_progress"] == "minimal"
    heatmap = next(b for b in by_id.values() if getattr(b, "elem_id", None) == "heatmap")
    assert heatmap._id in deps["chat"]["outputs"] and heatmap._id in deps["after_turn"]["outputs"]
    status = next(b for b in by_id.values() if getattr(b, "elem_id", None) == "status")
    assert status._id in deps["stash"]["outputs"]  # sending a message clears the last turn's status line
    step = next(b for b in by_id.values() if getattr(b, "elem_id", None) == "step")
    assert isinstance(step, gr.Slider) and step.visible is False  # no steps before a reply
    chat = next(b for b in by_id.values() if isinstance(b, gr.Chatbot))
    assert chat.group_consecutive_messages is False


def test_checkpoint_files_are_not_served(served, tiny_checkpoint):
    url = served[0].rstrip("/")
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        r = httpx.get(f"{url}/gradio_api/file={tiny_checkpoint / name}")
        assert r.status_code in (403, 404), (name, r.status_code)
    r = httpx.get(f"{url}/gradio_api/file={ROOT / 'data' / 'README.md'}")
    assert r.status_code in (403, 404)


def test_only_the_documented_endpoints_are_public(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == {"/chat", "/reply", "/compare"}


@pytest.fixture(scope="module")
def two_models(tiny_checkpoint, tiny_topic_checkpoint):
    """A client of the demo serving a plain model (first) and one that reads a topic."""
    from chatbot.demo import build_demo, launch
    from chatbot.loadtest import client as loopback_client

    bots = app.load_bots([tiny_checkpoint, tiny_topic_checkpoint], device="cpu")
    demo = build_demo(bots)
    _, url, _ = launch(demo, server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield loopback_client(url), bots
    demo.close()


def test_topic_parameter_of_reply_and_chat(two_models):
    client, bots = two_models
    plain, topical = bots
    given = client.predict(MSG, model=topical, topic="2", api_name="/reply")
    assert (given["topic_id"], given["topic_source"], given["topic_probs"]) == (2, "given", None)
    assert given["reply"] == bots[topical].reply(MSG, topic=2).text
    auto = client.predict(MSG, model=topical, api_name="/reply")  # the default: predicted from the message
    assert auto["topic_source"] == "predicted" and abs(sum(auto["topic_probs"]) - 1) < 1e-3
    assert auto["topic_id"] == bots[topical].topic_classifier.predict([MSG])[0]
    assert client.predict(MSG, model=plain, topic="2", api_name="/reply")["topic_id"] is None
    history, _ = client.predict(MSG, model=topical, topic="1", api_name="/chat")
    assert history[-1]["content"][0]["text"] == f"{bots[topical].reply(MSG, topic=1).text}\n<small>— {topical}</small>"


def test_switching_the_model_keeps_the_chat_and_each_reply_names_its_model(two_models):
    client, bots = two_models
    plain, topical = bots
    history, _ = client.predict(MSG, model=plain, api_name="/chat")
    history, _ = client.predict("안녕", history, model=topical, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2 and len(history[1]["content"]) == 1
    assert history[1]["content"][0]["text"] == f"{bots[plain].reply(MSG).text}\n<small>— {plain}</small>"
    assert history[3]["content"][0]["text"].endswith(f"\n<small>— {topical}</small>")


def test_decoding_controls_are_built_from_decode_options(tiny_bot):
    import gradio as gr

    from chatbot import ui
    from chatbot.demo import build_demo
    from chatbot.search import OPTIONS

    demo = build_demo({"tiny": tiny_bot})
    by_label = {b.label: b for b in demo.blocks.values() if isinstance(b, (gr.Slider, gr.Radio))}
    for name in ui.CONTROLS:
        spec, control = OPTIONS[name], by_label[OPTIONS[name].label]
        assert control.value == spec.default, name
        if isinstance(control, gr.Slider):
            assert (control.minimum, control.maximum, control.step) == (spec.low, spec.high, spec.step), name
        else:
            assert [value for _, value in control.choices] == list(spec.choices)
    reply = demo.fns[next(k for k, fn in demo.fns.items() if fn.api_name == "reply")]
    assert [c.label for c in reply.inputs[2:-1]] == [OPTIONS[name].label for name in ui.CONTROLS]  # the API's order


def test_checkpoint_arguments(tmp_path):
    assert app.parse_args(["--checkpoint", "a,b", "--checkpoint", "c"]).checkpoint == [Path("a"), Path("b"), Path("c")]
    for name in ("zeta", "default", "alpha", "empty"):
        (tmp_path / name).mkdir()
        if name != "empty":
            (tmp_path / name / "model.safetensors").write_bytes(b"")
    assert [p.name for p in app.default_checkpoints(tmp_path)] == ["default", "alpha", "zeta"]


def test_bind_address_follows_the_environment(monkeypatch):
    from chatbot import demo

    for var in ("GRADIO_SERVER_NAME", "SPACE_ID", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert (demo.server_name(), demo.server_port()) == ("127.0.0.1", 7860)
    monkeypatch.setenv("SPACE_ID", "someone/chatbot")
    assert demo.server_name() == "0.0.0.0"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "10.0.0.5")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9000")
    assert (demo.server_name(), demo.server_port()) == ("10.0.0.5", 9000)
    assert demo.concurrency() * demo.TORCH_THREADS <= (__import__("os").cpu_count() or 1)
