"""The served demo's settings and what it refuses: bind address, files, queue, MCP, monitoring, threads,
inference mode in the callback thread, and hostile messages through the API."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import httpx
import pytest
import torch

from chatbot import demo as demo_module
from chatbot.inference import ChatBot
from chatbot.loadtest import client, serve
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
    assert demo.max_file_size == 1024 * 1024
    assert demo.api_open is False  # a direct REST call cannot skip the queue and its bounds
    assert demo.mcp_server is False and demo.enable_monitoring is False and demo.analytics_enabled is False
    # concurrency limit x torch threads <= cores
    assert q.default_concurrency_limit == demo_module.concurrency()
    assert torch.get_num_threads() == demo_module.TORCH_THREADS
    limits = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values() if fn.queue}
    assert all(v == "default" for v in limits.values()), limits  # none raises its own limit
    assert q.default_concurrency_limit * demo_module.TORCH_THREADS <= (os.cpu_count() or 1)


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
    assert r.status_code in (400, 413), r.status_code


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
