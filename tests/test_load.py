"""Crowds on loopback: 1 / 4 / 16 concurrent API users all succeed within the queue bound; past it,
clients get a clean "queue full" and the server answers normally afterwards. ``pytest -s`` prints figures."""
from __future__ import annotations

import os
import threading
import time

import pytest

from chatbot.demo import QUEUE_SIZE
from chatbot.inference import ChatBot
from chatbot.loadtest import client, machine, run_load, serve, table

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REQUESTS = 3  # per client: 1 + 4 + 16 clients -> 63 requests


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    demo, url, _ = serve([tiny_checkpoint])
    run_load(url, 1, 1, timeout=30)  # warm-up
    yield url
    demo.close()


@pytest.mark.parametrize("clients", [1, 4, 16])
def test_within_the_queue_bound_every_request_succeeds(url, clients):
    assert clients <= QUEUE_SIZE  # each user has one request in flight at a time
    r = run_load(url, clients, REQUESTS, timeout=30)
    print(f"\n[load] tiny checkpoint, /reply, {machine()}\n{table([r])}")
    assert r.ok == r.requests == clients * REQUESTS, dict(r.errors)
    assert not r.errors
    assert r.quantile(0.95) < 20  # seconds: generous, the 2 cores may be busy with other work


def test_run_load_refuses_other_hosts():
    with pytest.raises(ValueError, match="127.0.0.1"):
        run_load("http://example.com:7860/", 1, 1)


def test_past_the_queue_bound_clients_get_queue_full_and_the_server_recovers(tiny_checkpoint):
    """Queue of 2, one worker held busy by a gate in the model's step: of 12 concurrent requests only
    those running or queued are served; the rest get gradio_client's QueueError at once."""
    from gradio_client.utils import QueueError

    bot = ChatBot.from_checkpoint(tiny_checkpoint, device="cpu")
    gate = threading.Event()

    class Gated(type(bot.model)):
        def step(self, *args, **kwargs):
            gate.wait(30)  # bounded: the test never hangs on a lost release
            return super().step(*args, **kwargs)

    bot.model.__class__ = Gated
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
