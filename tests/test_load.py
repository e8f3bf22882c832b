"""Crowds on loopback: 1 / 4 / 16 concurrent API users all succeed within the queue bound; past it,
clients get a clean "queue full" and the server answers normally afterwards. ``pytest -s`` prints figures."""
from __future__ import annotations

import gc
import os
import threading
import time
import uuid

import httpx
import pytest

from chatbot.demo import QUEUE_SIZE
from chatbot.inference import ChatBot
from chatbot.loadtest import (PROBE_REQUESTS, client, close_all, endpoint_inputs, machine, new_sessions, post_event,
                              rss_mb, run_load, run_mixed, serve, table)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REQUESTS = 3  # per client: 1 + 4 + 16 clients -> 63 requests


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    demo, url, _ = serve([tiny_checkpoint])
    run_load(url, 1, 1, timeout=30)  # warm-up
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def url(served):
    return served[1]


def hold_at_gate(bot: ChatBot) -> threading.Event:
    """Make every decoder step of ``bot`` wait until the returned event is set (at most 30 s a step, so a
    test never hangs on a lost release): its requests hold their workers as long as a test needs."""
    gate = threading.Event()

    class Gated(type(bot.model)):
        def step(self, *args, **kwargs):
            gate.wait(30)
            return super().step(*args, **kwargs)

    bot.model.__class__ = Gated
    return gate


@pytest.mark.parametrize("clients", [1, 4, 16])
def test_within_the_queue_bound_every_request_succeeds(url, clients):
    assert clients <= QUEUE_SIZE  # each user has one request in flight at a time
    r = run_load(url, clients, REQUESTS, timeout=30)
    print(f"\n[load] tiny checkpoint, /reply, {machine()}\n{table([r])}")
    assert r.ok == r.requests == clients * REQUESTS, dict(r.errors)
    assert not r.errors
    assert r.quantile(0.95) < 20  # seconds: generous, the 2 cores may be busy with other work


def test_streamed_chats_beside_reply_all_succeed_and_reply_stays_quick(url):
    """A small run_mixed: three users stream long sampled /chat replies while one sends /reply; chats
    and replies run in worker groups of their own, so /reply keeps close to its single-client p95."""
    single, _ = run_mixed(url, 1, 1, timeout=30)
    replies, chats = run_mixed(url, 4, 2, timeout=30)
    ratio = replies.quantile(0.95) / single.quantile(0.95)
    print(f"\n[load] tiny checkpoint, mixed, {machine()}\n{table([single, replies, chats])}\n"
          f"/reply p95 {ratio:.2f}x its single-client value")
    assert chats.ok == chats.requests == 6 and not chats.errors, dict(chats.errors)
    assert replies.ok == replies.requests >= PROBE_REQUESTS and not replies.errors, dict(replies.errors)
    assert replies.quantile(0.95) < 3 * single.quantile(0.95) + 0.2  # seconds of slack: 2 cores shared with others


def test_a_crowd_of_streamed_chats_leaves_room_for_reply(tiny_checkpoint):
    """Chats may hold only CHAT_QUEUE_SHARE of the queue: with chats held at a gate (one running, the rest
    waiting), a further chat gets "queue full" at once while /reply is still answered at once."""
    from gradio_client.utils import QueueError

    from chatbot.demo import CHAT_QUEUE_SHARE

    free, held = (ChatBot.from_checkpoint(tiny_checkpoint, device="cpu") for _ in range(2))
    gate = hold_at_gate(held)
    demo, url, _ = serve([], bots={"free": free, "held": held}, queue_size=8)
    share = max(1, int(8 * CHAT_QUEUE_SHARE))
    users = [client(url) for _ in range(share + 3)]
    try:
        jobs = [u.submit("안녕", model="held", api_name="/chat") for u in users[:share + 1]]
        deadline = time.monotonic() + 30
        while len(demo._queue) < share:  # one chat running (held at the gate), `share` waiting
            refused = [job.exception() for job in jobs if job.done()]  # joined together: none may be refused
            assert not refused and time.monotonic() < deadline, refused or "the chats never filled their share"
            time.sleep(0.05)
        with pytest.raises(QueueError, match="(?i)queue is full"):
            users[share + 1].submit("안녕", model="held", api_name="/chat").result(timeout=30)
        t0 = time.perf_counter()
        assert users[share + 2].predict("안녕", model="free", api_name="/reply")["generated"]
        assert time.perf_counter() - t0 < 10
        gate.set()
        assert all(job.result(timeout=60)[0] for job in jobs)
    finally:
        gate.set()
        close_all(users)
        demo.close()


def test_run_load_refuses_other_hosts():
    with pytest.raises(ValueError, match="127.0.0.1"):
        run_load("http://example.com:7860/", 1, 1)


def test_past_the_queue_bound_clients_get_queue_full_and_the_server_recovers(tiny_checkpoint):
    """Queue of 2, one worker held busy by a gate in the model's step: of 12 concurrent requests only
    those running or queued are served; the rest get gradio_client's QueueError at once."""
    from gradio_client.utils import QueueError

    bot = ChatBot.from_checkpoint(tiny_checkpoint, device="cpu")
    gate = hold_at_gate(bot)
    demo, url, _ = serve([], bots={"tiny": bot}, queue_size=2, concurrency_limit=1)
    crowd = {}
    try:
        runner = threading.Thread(target=lambda: crowd.setdefault("r", run_load(url, 12, 1, timeout=60)))
        runner.start()
        deadline = time.monotonic() + 30
        while len(demo._queue) < 2:  # one running (held at the gate), two waiting
            assert time.monotonic() < deadline, "the queue never filled"
            time.sleep(0.05)
        late = client(url)
        with pytest.raises(QueueError, match="(?i)queue is full"):
            late.submit("안녕", api_name="/reply").result(timeout=30)
        late.close()
        time.sleep(1.0)  # let the rest of the crowd's submissions land while the queue is still full
        gate.set()
        runner.join(90)
        assert not runner.is_alive()
        r = crowd["r"]
        print(f"\n[load] past the bound: queue max_size 2, concurrency 1, 12 concurrent requests\n{table([r])}")
        assert set(r.errors) == {"QueueError"}, dict(r.errors)
        assert r.ok >= 2 and r.errors["QueueError"] >= 6 and r.ok + r.errors["QueueError"] == 12

        after = run_load(url, 2, 2, timeout=30)  # the server answers normally afterwards
        assert after.ok == 4 and not after.errors and len(demo._queue) == 0
    finally:
        gate.set()
        demo.close()


def test_memory_stays_flat_over_new_sessions(served):
    """Each new session cost ~200 KB (/reply) to ~500 KB (/chat) that was never given back: gradio keeps
    10,000 sessions by default, each with its own copy of the page's config. Once the session store is
    full, more new sessions must not grow what the server keeps (target: 20 MB per 2,000). Measured after
    a garbage collection every 40: what is retained, not the cyclic garbage Python has yet to collect."""
    demo, url = served
    cap = demo.state_session_capacity
    new_sessions(url, min(cap, 100) + 16)  # fill the store (and warm up)
    gc.collect()
    before, errors = rss_mb(), {}
    for _ in range(4):
        errors.update(new_sessions(url, 40).errors)
        gc.collect()
    after = rss_mb()
    print(f"\n[load] 160 new sessions (/reply and /chat in turn): RSS {before:.1f} -> {after:.1f} MB, "
          f"{(after - before) * 1024 / 160:.1f} KB a session; {len(demo.state_holder.session_data)} kept (cap {cap})")
    assert not errors, errors
    assert after - before < 1.6, (before, after)  # 10 KB a session: 20 MB per 2,000
    assert len(demo.state_holder.session_data) <= cap <= 100


def test_a_closed_page_drops_its_session_at_once(served):
    """When a page's heartbeat ends (tab closed), its session goes now; gradio would keep it an hour."""
    demo, url = served
    fn, data = endpoint_inputs(url)["reply"]
    session = uuid.uuid4().hex
    with httpx.stream("GET", f"{url.rstrip('/')}/gradio_api/heartbeat/{session}", timeout=30) as beat:
        lines = beat.iter_lines()  # kept: a dropped line iterator would close the stream at once
        next(lines)  # connected
        assert post_event(url, fn, ["안녕", *data[1:]], session_hash=session)[1]["success"]
        assert session in demo.state_holder.session_data
    deadline = time.monotonic() + 10
    while session in demo.state_holder.session_data:
        assert time.monotonic() < deadline, "the closed page's session is still held"
        time.sleep(0.1)
