"""Load test: concurrent gradio_client users against the demo on loopback only.

    python -m chatbot loadtest --clients 1,4,16,64 --requests 5   # shipped checkpoint
    python -m chatbot loadtest --checkpoint runs/tiny/best --clients 1,4 --requests 2

Serves the demo in a child process on 127.0.0.1 (a free port, the same ``launch`` limits as app.py), then
for each client count N (and 1, the baseline) starts N users at once, each with its own
``gradio_client.Client``: N - 1 stream ``--requests`` long sampled /chat replies, one sends /reply requests
back to back while they do. Every request has a hard timeout. Then 2,000 requests each from a new session
measure what a visitor costs the server's memory. Prints p50 / p95 latency, the errors by type, the
server's RSS and one verdict line per target; the last line printed is a JSON object.
"""
from __future__ import annotations

import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

MESSAGES = ["오늘 너무 힘들었어", "헤어진 지 한 달 됐어", "좋아하는 사람이 생겼어", "주말에 뭐 하지",
            "배고픈데 뭐 먹을까", "시험 망쳤어", "고백할까 말까", "잠이 안 와"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CHAT_DECODING = {"strategy": "sample", "temperature": 1.5, "max_len": 80}  # long sampled /chat replies
PROBE_REQUESTS = 20  # /reply requests at least, for a p95 worth the name
SESSION_FILL = 200  # new sessions sent before measuring memory: the session store (64) is full by then


@dataclass
class LoadResult:
    clients: int  # users sending at once
    requests: int  # requests sent in all
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    errors: Counter = field(default_factory=Counter)  # exception type name -> count
    wall_s: float = 0.0
    endpoint: str = "/reply"

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def quantile(self, q: float) -> float:
        """The q-quantile of the successful latencies in seconds (nan when none succeeded)."""
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[round(q * 100) - 1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (latencies in ms; None where nothing succeeded)."""
        def ms(seconds: float) -> float | None:
            return None if seconds != seconds else round(seconds * 1000, 1)  # NaN is not JSON

        return {"clients": self.clients, "requests": self.requests, "ok": self.ok, "errors": dict(self.errors),
                "p50_ms": ms(self.quantile(0.50)), "p95_ms": ms(self.quantile(0.95)),
                "max_ms": ms(max(self.latencies, default=float("nan"))),
                "throughput_rps": round(self.ok / self.wall_s, 2) if self.wall_s else 0.0,
                "wall_s": round(self.wall_s, 2), "endpoint": self.endpoint}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(checkpoints: Sequence[str | Path], *, queue_size: int | None = None, concurrency_limit: int | None = None,
          device: str = "cpu", bots: dict | None = None):
    """Load ``checkpoints`` (or use ``bots``), build the demo and launch it on 127.0.0.1 without blocking.

    Returns (demo, url, bots); call ``demo.close()`` when done.
    """
    from .demo import QUEUE_SIZE, build_demo, launch
    from .inference import ChatBot

    if bots is None:
        bots = {}
        for p in checkpoints:
            bot = ChatBot.from_checkpoint(p, device=device)
            bots[bot.name if bot.name not in bots else str(p)] = bot
    demo = build_demo(bots)
    _, url, _ = launch(demo, checkpoint_dirs=[b.path for b in bots.values() if b.path],
                       queue_size=queue_size or QUEUE_SIZE, concurrency_limit=concurrency_limit,
                       server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo, url, bots


def client(url: str):
    """A gradio_client.Client for ``url`` that sends no telemetry (its default would, whatever the env says)."""
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def endpoint_inputs(url: str) -> dict[str, tuple[int, list[Any]]]:
    """api_name (e.g. "chat") -> (fn_index, the default value of each input), read from the server's /config:
    what a raw client needs to send an event the way the page does."""
    import httpx

    config = httpx.get(url.rstrip("/") + "/config", timeout=30).json()
    values = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
    return {d["api_name"]: (d["id"], [values.get(i) for i in d["inputs"]])
            for d in config["dependencies"] if d.get("api_name")}


def post_event(url: str, fn_index: int, data: Sequence[Any] | str, *, session_hash: str | None = None,
               timeout: float = 60.0) -> tuple[int, Any]:
    """One event through the queue by raw HTTP, as the page sends it: join, then read the session's event
    stream to its end. ``data`` is the inputs (JSON-encoded here, NaN and lone surrogates included) or
    their JSON text; a new session unless ``session_hash``. Returns (join status, last message as a dict),
    or (status, response text) when the join is refused."""
    import httpx

    url = url.rstrip("/")
    session_hash = session_hash or uuid.uuid4().hex
    data_json = data if isinstance(data, str) else json.dumps(list(data))
    body = f'{{"data": {data_json}, "fn_index": {int(fn_index)}, "session_hash": {json.dumps(session_hash)}}}'
    with httpx.Client(timeout=timeout) as http:
        joined = http.post(f"{url}/gradio_api/queue/join", content=body.encode(),
                           headers={"content-type": "application/json"})
        if joined.status_code != 200:
            return joined.status_code, joined.text
        last: Any = None
        with http.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session_hash}) as events:
            for line in events.iter_lines():
                if line.startswith("data:"):
                    last = json.loads(line[5:])
                    if last.get("msg") in ("process_completed", "unexpected_error"):
                        break
        return joined.status_code, last


def run_load(url: str, clients: int, requests_per_client: int, messages: Sequence[str] = MESSAGES, *,
             timeout: float = 60.0, api_name: str = "/reply") -> LoadResult:
    """``clients`` users at once, each sending ``requests_per_client`` messages in turn to ``url``.

    Loopback only: this is a test of our own server, never a tool to aim at someone else's.
    Each request waits at most ``timeout`` seconds (a TimeoutError counts as an error).
    """
    _check_loopback(url)
    result = LoadResult(clients, clients * requests_per_client, endpoint=api_name)

    def user(c: Any, i: int) -> None:
        for k in range(requests_per_client):
            message = messages[(i * requests_per_client + k) % len(messages)]
            _timed(result, lambda: c.submit(message, api_name=api_name).result(timeout=timeout))

    _crowd(url, [(result, user)] * clients, deadline_s=timeout * requests_per_client + 5)
    return result


def run_mixed(url: str, clients: int, requests_per_client: int, *, timeout: float = 60.0,
              probe_requests: int = PROBE_REQUESTS) -> tuple[LoadResult, LoadResult]:
    """``clients`` users at once: ``clients - 1`` each stream ``requests_per_client`` long sampled /chat
    replies (CHAT_DECODING) while one sends greedy /reply requests back to back until they are done (and
    at least ``probe_requests``). With one client, /reply alone: its single-client latency.
    Returns (/reply result, /chat result)."""
    _check_loopback(url)
    chats = LoadResult(clients - 1, (clients - 1) * requests_per_client, endpoint="/chat")
    replies = LoadResult(1, 0, endpoint="/reply")
    chatting = threading.Semaphore(0)  # released once per chat user done
    deadline_s = timeout * (requests_per_client + probe_requests) + 5
    stop_at = time.monotonic() + deadline_s

    def chat_user(c: Any, i: int) -> None:
        for k in range(requests_per_client):
            message = MESSAGES[(i * requests_per_client + k) % len(MESSAGES)]
            _timed(chats, lambda: c.submit(message, **CHAT_DECODING, api_name="/chat").result(timeout=timeout))
        chatting.release()

    def reply_user(c: Any, i: int) -> None:
        done = 0
        while (replies.requests < probe_requests or done < clients - 1) and time.monotonic() < stop_at:
            message = MESSAGES[replies.requests % len(MESSAGES)]
            replies.requests += 1
            _timed(replies, lambda: c.submit(message, api_name="/reply").result(timeout=timeout))
            while chatting.acquire(blocking=False):
                done += 1

    _crowd(url, [(replies, reply_user)] + [(chats, chat_user)] * (clients - 1), deadline_s=deadline_s)
    return replies, chats


_LOCK = threading.Lock()  # guards LoadResult updates from the users' threads


def _timed(result: LoadResult, call: Callable[[], Any]) -> None:
    """Run ``call``; add its latency to ``result``, or its error by type (QueueError, TimeoutError ...)."""
    t0 = time.perf_counter()
    try:
        call()
    except Exception as e:
        with _LOCK:
            result.errors[type(e).__name__] += 1
    else:
        with _LOCK:
            result.latencies.append(time.perf_counter() - t0)


def _crowd(url: str, users: Sequence[tuple[LoadResult, Callable[[Any, int], None]]], deadline_s: float) -> None:
    """Start every user at once, each on its own thread with its own Client (connecting is not timed);
    wait up to ``deadline_s``. A user still running then counts as "Hung" in its result."""
    clients = [client(url) for _ in users]
    start = threading.Barrier(len(users) + 1)

    def run(i: int) -> None:
        start.wait()
        users[i][1](clients[i], i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(users))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(0.0, t0 + deadline_s - time.perf_counter()))
    wall = time.perf_counter() - t0
    for (result, _), t in zip(users, threads):
        result.wall_s = wall
        if t.is_alive():
            result.errors["Hung"] += 1
    close_all(clients)


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the load test only targets a server on this machine (127.0.0.1), not {host!r}")


def new_sessions(url: str, requests: int, *, timeout: float = 60.0) -> LoadResult:
    """``requests`` events one after another, each from a new session as each new visitor's page is:
    /reply and streamed /chat in turn, by raw HTTP so that the client side keeps nothing. What the
    server keeps per session is what this exercises (:func:`rss_mb` before and after)."""
    _check_loopback(url)
    endpoints = endpoint_inputs(url)
    result = LoadResult(1, requests, endpoint="/reply + /chat, a new session each")
    t0 = time.perf_counter()
    for k in range(requests):
        fn, data = endpoints["reply" if k % 2 == 0 else "chat"]
        start = time.perf_counter()
        try:
            status, out = post_event(url, fn, [MESSAGES[k % len(MESSAGES)], *data[1:]], timeout=timeout)
        except Exception as e:  # counted by type, like run_load's
            result.errors[type(e).__name__] += 1
            continue
        if status != 200 or not (isinstance(out, dict) and out.get("success")):
            result.errors[f"HTTP {status}" if status != 200 else "Failed"] += 1
        else:
            result.latencies.append(time.perf_counter() - start)
    result.wall_s = time.perf_counter() - t0
    return result


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of process ``pid`` (default: this one) in MB, from /proc (nan where there is none)."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def session_memory(url: str, pid: int | None, sessions: int, *, fill: int = SESSION_FILL,
                   timeout: float = 60.0) -> dict[str, Any]:
    """The server's RSS growth over ``sessions`` new-session requests (:func:`new_sessions`), measured after
    ``fill`` of them have filled its session store: what every further visitor costs."""
    new_sessions(url, fill, timeout=timeout)
    before = rss_mb(pid)
    r = new_sessions(url, sessions, timeout=timeout)
    after = rss_mb(pid)
    return {"sessions": sessions, "after_filling_with": fill, "ok": r.ok, "errors": dict(r.errors),
            "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "growth_mb": round(after - before, 1), "kb_per_session": round((after - before) * 1024 / sessions, 2)}


def close_all(clients: Sequence[Any]) -> None:
    """Close clients side by side (each close waits up to 1 s for its heartbeat thread)."""
    closers = [threading.Thread(target=c.close, daemon=True) for c in clients]
    for t in closers:
        t.start()
    for t in closers:
        t.join(5)


def table(results: Sequence[LoadResult]) -> str:
    rows = ["| clients | endpoint | requests | ok | errors | p50 ms | p95 ms | max ms | req/s |",
            "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        d = r.to_dict()
        errors = ", ".join(f"{k} {v}" for k, v in d["errors"].items()) or "0"
        rows.append(f"| {d['clients']} | {r.endpoint} | {d['requests']} | {d['ok']} | {errors} | {d['p50_ms']} "
                    f"| {d['p95_ms']} | {d['max_ms']} | {d['throughput_rps']} |")
    return "\n".join(rows)


def machine() -> str:
    """One line on where the figures were taken (cores and load average)."""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{os.cpu_count()} CPU cores, load average {load} (1 / 5 / 15 min) at the start"


# ---------------------------------------------------------------- the server in a child process
def serve_process(checkpoints: Sequence[str | Path], *, queue_size: int | None = None,
                  concurrency_limit: int | None = None, device: str = "cpu",
                  start_timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """:func:`serve` in a child process: its own interpreter, so the clients here do not share its GIL, and
    its RSS is the server's alone. Returns (process, url); :func:`stop_process` ends it (so does closing
    its stdin, or this process ending)."""
    spec = json.dumps({"checkpoints": [str(c) for c in checkpoints], "queue_size": queue_size,
                       "concurrency_limit": concurrency_limit, "device": device})
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-c", "from chatbot.loadtest import _serve_child; _serve_child()", spec],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    ready, _, _ = select.select([proc.stdout], [], [], start_timeout)
    url = proc.stdout.readline().strip() if ready else ""
    if not url.startswith("http://127.0.0.1:"):
        stop_process(proc)
        raise RuntimeError(f"the demo did not start within {start_timeout:.0f} s (exit status {proc.returncode})")
    return proc, url


def _serve_child() -> None:
    """The child of :func:`serve_process`: serve, print the URL, and close when stdin closes."""
    spec = json.loads(sys.argv[1])
    demo, url, _ = serve(spec["checkpoints"], queue_size=spec["queue_size"],
                         concurrency_limit=spec["concurrency_limit"], device=spec["device"])
    print(url, flush=True)
    sys.stdin.read()
    demo.close()


def stop_process(proc: subprocess.Popen) -> None:
    """End a :func:`serve_process` child: close its stdin, then terminate it if it lingers."""
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------- the whole run
def main(checkpoints: Sequence[str | Path], client_counts: Sequence[int], requests_per_client: int, *,
         queue_size: int | None = None, concurrency_limit: int | None = None, timeout: float = 60.0,
         device: str = "cpu", sessions: int = 2000) -> dict[str, Any]:
    """Serve in a child process; for each client count (and 1, the baseline) a :func:`run_mixed` round,
    the server's RSS before and after; then ``sessions`` new-session requests (:func:`session_memory`).
    Returns the JSON-ready figures, with ``verdict``: each target met or not."""
    from .inference import default_checkpoint

    where = machine()
    server, url = serve_process(checkpoints or [default_checkpoint()], queue_size=queue_size,
                                concurrency_limit=concurrency_limit, device=device)
    try:
        run_load(url, 1, 2, timeout=timeout)  # warm-up: first-call costs are not load
        rounds = []
        for n in sorted({1, *client_counts}):
            before = rss_mb(server.pid)
            replies, chats = run_mixed(url, n, requests_per_client, timeout=timeout)
            rounds.append({"clients": n, "reply": replies, "chat": chats,
                           "rss_mb": [round(before, 1), round(rss_mb(server.pid), 1)]})
        memory = session_memory(url, server.pid, sessions, timeout=timeout) if sessions else None
    finally:
        stop_process(server)
    results = [r[k] for r in rounds for k in ("reply", "chat") if r[k].requests]
    return {"checkpoint": [str(c) for c in checkpoints] or ["default"], "machine": where,
            "requests_per_client": requests_per_client, "chat_decoding": CHAT_DECODING,
            "rounds": [{**r, "reply": r["reply"].to_dict(), "chat": r["chat"].to_dict()} for r in rounds],
            "new_sessions": memory, "verdict": verdict(rounds, memory),
            "table": table(results) + "\n\n" + "\n".join(verdict(rounds, memory))}


def verdict(rounds: Sequence[dict[str, Any]], memory: dict[str, Any] | None) -> list[str]:
    """One line per target: every request served or refused as "queue full" (no join or result timed out,
    nothing hung); /reply p95 within 3x its single-client p95 while /chat runs; memory flat (20 MB per
    2,000 new sessions)."""
    single = next(r["reply"].quantile(0.95) for r in rounds if r["clients"] == 1)
    lines = []
    for r in rounds:
        other = {k: v for res in (r["reply"], r["chat"]) for k, v in res.errors.items() if k != "QueueError"}
        ratio = r["reply"].quantile(0.95) / single
        lines.append(f"{'ok' if not other and ratio <= 3 else 'FAIL'}: {r['clients']} clients: errors other than "
                     f"queue full: {other or 'none'}; /reply p95 {ratio:.2f}x single-client; "
                     f"server RSS {r['rss_mb'][0]} -> {r['rss_mb'][1]} MB")
    if memory:
        flat = memory["growth_mb"] <= 20 * memory["sessions"] / 2000 and not memory["errors"]
        lines.append(f"{'ok' if flat else 'FAIL'}: {memory['sessions']} new sessions: server RSS "
                     f"{memory['rss_before_mb']} -> {memory['rss_after_mb']} MB ({memory['kb_per_session']} KB each)")
    return lines
