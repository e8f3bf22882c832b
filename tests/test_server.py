"""The served demo's settings and what it refuses: bind address, files, queue, MCP, monitoring, threads,
inference mode in the callback thread, and hostile messages through the API."""
from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch

from chatbot import demo as demo_module
from chatbot.inference import ChatBot
from chatbot.loadtest import client, endpoint_inputs, post_event, serve
from conftest import ROOT

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    """(demo, url, bot) launched the way app.py does, with a bot of its own (tests instrument its model)."""
    bot = ChatBot.from_checkpoint(tiny_checkpoint, device="cpu")
    demo, url, _ = serve([], bots={"tiny": bot})
    yield demo, url.rstrip("/"), bot
    demo.close()


@pytest.fixture(scope="module")
def api(served):
    c = client(served[1])
    yield c
    c.close()


# ---------------------------------------------------------------- launch settings
def test_launch_binds_loopback_and_never_shares(served, monkeypatch):
    demo, url, _ = served
    assert demo.server_name == "127.0.0.1" and url.startswith("http://127.0.0.1:")
    assert demo.share is False and demo.share_url is None
    for var in ("GRADIO_SERVER_NAME", "SPACE_ID"):
        monkeypatch.delenv(var, raising=False)
    assert demo_module.server_name() == "127.0.0.1"  # what app.py binds without configuration


def test_share_cannot_be_asked_for(monkeypatch):
    import gradio as gr
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw))
    monkeypatch.setenv("GRADIO_SHARE", "True")
    with gr.Blocks() as blocks:
        gr.Markdown("x")
    demo_module.launch(blocks, share=True)
    assert seen["share"] is False


def test_limits_are_set(served):
    demo, _, _ = served
    q = demo._queue
    assert q.max_size == demo_module.QUEUE_SIZE and q.max_size > 0
    assert demo.max_file_size == 0  # no uploads (and RequestLimits refuses /upload before gradio sees it)
    assert demo.state_session_capacity == demo_module.SESSION_CAPACITY
    assert demo.api_open is False  # a direct REST call cannot skip the queue and its bounds
    assert demo.mcp_server is False and demo.enable_monitoring is False and demo.analytics_enabled is False
    # concurrency limit x torch threads <= cores; the model runs in two groups that split the cores
    assert q.default_concurrency_limit == demo_module.concurrency()
    assert torch.get_num_threads() == demo_module.TORCH_THREADS
    groups = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values() if fn.queue}
    limits = demo_module.model_limits()
    assert groups["chat"] == ("chat", limits["chat"])
    assert groups["reply"] == groups["compare"] == ("reply", limits["reply"])
    # a replay runs no model and mostly waits for its next frame: a few more at once than the cores
    assert groups["replay"][1] == demo_module.REPLAY_CONCURRENCY
    others = {name: limit for name, (_, limit) in groups.items() if name not in {*demo_module.MODEL_GROUPS, "replay"}}
    assert all(v == "default" for v in others.values()), others  # none raises its own limit
    assert q.default_concurrency_limit * demo_module.TORCH_THREADS <= (os.cpu_count() or 1)
    if (os.cpu_count() or 1) >= 2:
        assert sum(limits.values()) * demo_module.TORCH_THREADS <= (os.cpu_count() or 1)


def test_launch_kwargs_exist_in_the_installed_gradio():
    """mcp_server / enable_monitoring / max_file_size / blocked_paths are real launch() parameters here."""
    import gradio as gr
    params = inspect.signature(gr.Blocks.launch).parameters
    assert {"mcp_server", "enable_monitoring", "max_file_size", "blocked_paths", "share"} <= set(params)
    assert "api_open" in inspect.signature(gr.Blocks.queue).parameters


def test_mcp_and_monitoring_routes_are_off(served):
    _, url, _ = served
    for path in ("/gradio_api/mcp/", "/gradio_api/mcp/sse", "/gradio_api/mcp/schema", "/monitoring",
                 "/monitoring/summary"):
        r = httpx.get(url + path, timeout=10)
        assert r.status_code in (403, 404), (path, r.status_code)


def test_direct_rest_call_cannot_skip_the_queue(served):
    _, url, _ = served
    r = httpx.post(url + "/gradio_api/api/reply/", json={"data": ["안녕"]}, timeout=10)
    assert r.status_code == 404 and "queue" in r.text


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.model", "manifest.json"])
def test_checkpoint_files_and_traversals_are_refused(served, tiny_checkpoint, name):
    _, url, _ = served
    target = tiny_checkpoint / name
    body = target.read_bytes()
    rel = os.path.relpath(target, ROOT)  # relative to the server's working directory
    up = "../" * len(ROOT.parts) + str(target).lstrip("/")  # climbs past / and back down
    paths = [str(target), rel, up, quote(up, safe=""), quote(quote(up, safe=""), safe=""),
             up.replace("/", "%2F"), str(tiny_checkpoint / ".." / tiny_checkpoint.name / name),
             f"{tiny_checkpoint}/./{name}", "..%2F" * len(ROOT.parts) + quote(str(target).lstrip("/"), safe="")]
    for p in paths:
        r = httpx.get(f"{url}/gradio_api/file={p}", timeout=10)
        assert r.status_code in (403, 404), (p, r.status_code)
        assert r.content != body and len(r.content) < 1000, p


@pytest.mark.parametrize("rel", ["data/README.md", "checkpoints/default/config.json", "chatbot/demo.py",
                                 "app.py", "../../etc/passwd"])
def test_repository_files_are_refused(served, rel):
    _, url, _ = served
    for p in (rel, str((ROOT / rel).resolve()), "../" + ROOT.name + "/" + rel):
        r = httpx.get(f"{url}/gradio_api/file={p}", timeout=10)
        assert r.status_code in (403, 404), (p, r.status_code)


def test_uploads_over_max_file_size_are_refused(served):
    _, url, _ = served
    r = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.txt", b"x" * (2 * 1024 * 1024))}, timeout=30)
    assert r.status_code in (403, 413), r.status_code


# ---------------------------------------------------------------- inference mode in the callback thread
@pytest.fixture
def recorded_steps(served):
    """Record (inference mode on?, thread name) at every decoder step of the served bot's real model."""
    bot = served[2]
    base = type(bot.model)
    seen: list[tuple[bool, str]] = []

    class Recording(base):
        def step(self, *args, **kwargs):
            seen.append((torch.is_inference_mode_enabled(), threading.current_thread().name))
            return super().step(*args, **kwargs)

    bot.model.__class__ = Recording
    yield seen
    bot.model.__class__ = base


@pytest.mark.parametrize("api_name,strategy", [("/reply", "greedy"), ("/reply", "beam"), ("/reply", "sample"),
                                               ("/chat", "greedy")])
def test_decoding_runs_under_inference_mode_in_the_callback_thread(api, recorded_steps, api_name, strategy):
    if api_name == "/reply":
        out = api.predict("오늘 너무 힘들었어", strategy=strategy, api_name=api_name)
        assert out["generated"]
    else:
        api.predict("오늘 너무 힘들었어", api_name=api_name)
    assert recorded_steps, "the model's step was never called"
    assert all(mode for mode, _ in recorded_steps), recorded_steps
    assert all(name != threading.main_thread().name for _, name in recorded_steps)
    assert not torch.is_inference_mode_enabled()  # nothing leaked into this thread


# ---------------------------------------------------------------- hostile messages through the API
@pytest.mark.parametrize("message", ["\u200b\u200c\u200d\ufeff", "\u2060\u200b ", "\x00", "\x00\x00\u200b"])
def test_invisible_only_messages_get_the_prompt(api, message):
    out = api.predict(message, api_name="/reply")
    assert out["generated"] is False and "입력" in out["reply"]


def test_nul_bidi_and_control_characters_are_stripped(api):
    plain = api.predict("오늘 너무 힘들었어", api_name="/reply")
    for dirty in ("오늘\x00 너무 힘들었어", "\u202e오늘 너무 힘들었어\u202c", "오늘\u200b 너무\x07 힘들었어\x1b",
                  "\u2066오늘\u2069 너무 힘들었어"):
        out = api.predict(dirty, api_name="/reply")
        assert out["source_tokens"] == plain["source_tokens"], dirty
        assert out["reply"] == plain["reply"]


def test_emoji_become_unknown_pieces_and_still_get_a_reply(api):
    out = api.predict("😀🎉 안녕", api_name="/reply")
    assert out["generated"] and "<unk>" in out["source_tokens"]
    assert not any(e in "".join(out["source_tokens"]) for e in "😀🎉")  # not in the vocabulary, no byte pieces


def test_ten_thousand_characters_with_nul_through_the_api(api):
    t0 = time.perf_counter()
    out = api.predict(("가\x00나\u202e다 😀" * 2_000)[:12_000], api_name="/reply")
    assert time.perf_counter() - t0 < 10
    assert out["truncated"] and out["generated"]


def test_the_server_still_answers_after_the_hostile_messages(api):
    assert api.predict("안녕", api_name="/reply")["generated"]


# ---------------------------------------------------------------- request bounds (audit round three)
@pytest.fixture(scope="module")
def inputs(served):
    """api_name -> (fn_index, default inputs), as the page would send them."""
    return endpoint_inputs(served[1])


def _chat(inputs, message, history=()):
    fn, data = inputs["chat"]
    return fn, [message, list(history), *data[2:]]


def _parts(text):
    return [{"type": "text", "text": text}]


def test_an_oversized_body_is_refused_before_gradio_reads_it(served, inputs):
    """A 40,000-message history (~28 MB) used to be parsed and answered, holding a worker for ~15-27 s."""
    demo, url, _ = served
    history = [{"role": "user", "content": _parts("안녕하세요 반가워요 " * 10)}] * 40_000
    fn, data = _chat(inputs, "안녕", history)
    body = json.dumps({"data": data, "fn_index": fn, "session_hash": "oversized"}).encode()
    assert len(body) > 20_000_000
    headers = {"content-type": "application/json"}
    t0 = time.perf_counter()
    r = httpx.post(url + "/gradio_api/queue/join", content=body, headers=headers, timeout=30)
    assert r.status_code == 413 and "bytes" in r.text, (r.status_code, r.text[:200])
    assert time.perf_counter() - t0 < 5

    def chunked():  # no Content-Length: refused once the bound is passed
        for i in range(0, len(body), 1 << 16):
            yield body[i: i + (1 << 16)]

    r = httpx.post(url + "/gradio_api/queue/join", content=chunked(), headers=headers, timeout=30)
    assert r.status_code == 413, r.status_code
    assert "oversized" not in demo.state_holder.session_data  # gradio never saw it
    assert post_event(url, *_chat(inputs, "안녕"))[1]["success"]  # and answers as before


def test_a_long_session_hash_is_refused(served, inputs):
    _, url, _ = served
    status, text = post_event(url, *_chat(inputs, "안녕"), session_hash="x" * 10_000)
    assert status == 422 and "session_hash" in text


def test_uploads_are_refused_and_nothing_is_stored(served):
    """The demo has no file inputs; gradio stored whatever was posted to /upload (61 MB in the audit)."""
    demo, url, _ = served
    name = f"upload-{uuid.uuid4().hex}.txt"
    r = httpx.post(f"{url}/gradio_api/upload", files={"files": (name, b"x" * 1000)}, timeout=30)
    assert r.status_code == 403 and "upload" in r.text.lower(), (r.status_code, r.text[:200])
    assert not list(Path(demo.server_app.uploaded_file_dir).rglob(name))


@pytest.mark.parametrize("name", ["beam_size", "temperature", "top_k", "top_p", "max_len", "no_repeat_ngram",
                                  "length_penalty", "repetition_penalty"])
def test_non_finite_numbers_are_refused_with_a_clear_message(served, inputs, name):
    """NaN passed gradio's slider range checks (a blank "Error", or a reply); it is not JSON either."""
    from chatbot import ui

    _, url, _ = served
    fn, data = inputs["reply"]
    for bad in ("NaN", "Infinity", "-Infinity", "1e999"):
        values = [json.dumps(v) for v in ["안녕", *data[1:]]]
        values[2 + ui.CONTROLS.index(name)] = bad
        status, text = post_event(url, fn, "[" + ", ".join(values) + "]")
        assert status == 422 and "finite" in text, (name, bad, status, text)


def test_the_callbacks_name_a_non_finite_control(served):
    """In-process callers (no JSON on the way) get a gr.Error naming the control, not a blank "Error"."""
    import gradio as gr

    from chatbot.demo import Callbacks

    cb = Callbacks({"tiny": served[2]})
    with pytest.raises(gr.Error, match="temperature must be a finite number"):
        cb.reply("안녕", "tiny", "sample", 1, math.nan, 0, 1.0, 40, 0, 1.0, 1.0)
    with pytest.raises(gr.Error, match="top_p must be a finite number"):
        next(cb.chat("안녕", [], [], "tiny", "sample", 1, 1.0, 0, math.inf, 40, 0, 1.0, 1.0))


def test_lone_surrogates_in_chat_are_cleaned_like_other_bad_characters(served, inputs):
    """JSON can carry a lone surrogate, UTF-8 cannot: /chat failed with unexpected_error (/reply coped)."""
    _, url, _ = served
    history = [{"role": "user", "content": _parts("\udc00안녕")}, {"role": "assistant", "content": _parts("응\ud800")}]
    status, out = post_event(url, *_chat(inputs, "\ud800오늘 너무 힘들었어", history))
    assert status == 200 and out["msg"] == "process_completed" and out["success"], out
    chat = out["output"]["data"][0]
    assert [m["content"][0]["text"] for m in chat[:3]] == ["\ufffd안녕", "응\ufffd", "\ufffd오늘 너무 힘들었어"]
    assert chat[-1]["content"][0]["text"]
    for api in ("reply", "compare"):
        fn, data = inputs[api]
        status, out = post_event(url, fn, ["\ud800안녕\udfff", *data[1:]])
        assert status == 200 and out["success"], (api, out)


@pytest.mark.parametrize("fn_index", [999, -1, "x", 1.5, True])
def test_a_bad_fn_index_is_a_clean_4xx(served, fn_index):
    """gradio answers an unknown fn_index with a bare 500 (KeyError in its queue)."""
    _, url, _ = served
    r = httpx.post(url + "/gradio_api/queue/join", json={"data": [], "fn_index": fn_index, "session_hash": "bad-fn"},
                   timeout=10)
    assert r.status_code == 422 and "fn_index" in r.json()["detail"], (r.status_code, r.text)


@pytest.mark.parametrize("path", ["/gradio_api/call/nonexistent", "/gradio_api/call/v2/nonexistent"])
def test_an_unknown_api_name_is_a_clean_404(served, path):
    _, url, _ = served
    r = httpx.post(url + path, json={"data": []}, timeout=10)
    assert r.status_code == 404 and "nonexistent" in r.json()["detail"], (r.status_code, r.text)


# ---------------------------------------------------------------- app.py with a damaged checkpoint
def test_app_refuses_a_damaged_checkpoint_quickly_without_a_traceback(tiny_checkpoint, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"junk")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "app.py", "--checkpoint", str(bad)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert time.perf_counter() - t0 < 30
    assert p.returncode != 0 and "model.safetensors" in p.stderr
    assert "Traceback" not in p.stderr
