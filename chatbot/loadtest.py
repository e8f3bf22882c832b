"""Load test: concurrent gradio_client users against the demo's ``/reply`` endpoint, on loopback only.

    python -m chatbot loadtest                               # shipped checkpoint, 1 / 4 / 16 clients
    python -m chatbot loadtest --checkpoint runs/tiny/best --clients 1,4,16 --requests 5

Serves the demo in this process on 127.0.0.1 (a free port, the same ``launch`` limits as app.py),
then for each client count starts that many users at once, each with its own ``gradio_client.Client``
sending ``--requests`` messages one after another. Every request has a hard timeout. Prints p50 / p95
latency and the errors by type; the last line printed is a JSON object.
"""
from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

MESSAGES = ["오늘 너무 힘들었어", "헤어진 지 한 달 됐어", "좋아하는 사람이 생겼어", "주말에 뭐 하지",
            "배고픈데 뭐 먹을까", "시험 망쳤어", "고백할까 말까", "잠이 안 와"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LoadResult:
    clients: int  # users sending at once
    requests: int  # requests sent in all
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    errors: Counter = field(default_factory=Counter)  # exception type name -> count
    wall_s: float = 0.0

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
        return {"clients": self.clients, "requests": self.requests, "ok": self.ok, "errors": dict(self.errors),
                "p50_ms": round(self.quantile(0.50) * 1000, 1), "p95_ms": round(self.quantile(0.95) * 1000, 1),
                "max_ms": round(max(self.latencies, default=float("nan")) * 1000, 1),
                "throughput_rps": round(self.ok / self.wall_s, 2) if self.wall_s else 0.0,
                "wall_s": round(self.wall_s, 2)}


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


def run_load(url: str, clients: int, requests_per_client: int, messages: Sequence[str] = MESSAGES, *,
             timeout: float = 60.0, api_name: str = "/reply") -> LoadResult:
    """``clients`` users at once, each sending ``requests_per_client`` messages in turn to ``url``.

    Loopback only: this is a test of our own server, never a tool to aim at someone else's.
    Each request waits at most ``timeout`` seconds (a TimeoutError counts as an error).
    """
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"run_load only targets a server on this machine (127.0.0.1), not {host!r}")
    result = LoadResult(clients, clients * requests_per_client)
    lock = threading.Lock()
    users = [client(url) for _ in range(clients)]  # connecting is not part of the timed requests
    start = threading.Barrier(clients + 1)

    def user(i: int) -> None:
        start.wait()
        for k in range(requests_per_client):
            message = messages[(i * requests_per_client + k) % len(messages)]
            t0 = time.perf_counter()
            try:
                users[i].submit(message, api_name=api_name).result(timeout=timeout)
            except Exception as e:  # counted by type: QueueError, TimeoutError, AppError ...
                with lock:
                    result.errors[type(e).__name__] += 1
            else:
                with lock:
                    result.latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    deadline = t0 + timeout * requests_per_client + 5
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    result.wall_s = time.perf_counter() - t0
    hung = sum(t.is_alive() for t in threads)
    if hung:
        result.errors["Hung"] += hung
    close_all(users)
    return result


def close_all(clients: Sequence[Any]) -> None:
    """Close clients side by side (each close waits up to 1 s for its heartbeat thread)."""
    closers = [threading.Thread(target=c.close, daemon=True) for c in clients]
    for t in closers:
        t.start()
    for t in closers:
        t.join(5)


def table(results: Sequence[LoadResult]) -> str:
    rows = ["| clients | requests | ok | errors | p50 ms | p95 ms | max ms | req/s |",
            "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        d = r.to_dict()
        errors = ", ".join(f"{k} {v}" for k, v in d["errors"].items()) or "0"
        rows.append(f"| {d['clients']} | {d['requests']} | {d['ok']} | {errors} | {d['p50_ms']} | {d['p95_ms']} "
                    f"| {d['max_ms']} | {d['throughput_rps']} |")
    return "\n".join(rows)


def machine() -> str:
    """One line on where the figures were taken (cores and load average)."""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{os.cpu_count()} CPU cores, load average {load} (1 / 5 / 15 min) at the start"


def main(checkpoints: Sequence[str | Path], client_counts: Sequence[int], requests_per_client: int, *,
         queue_size: int | None = None, concurrency_limit: int | None = None, timeout: float = 60.0,
         device: str = "cpu") -> dict[str, Any]:
    """Serve, run each client count in turn, close; returns the JSON-ready figures."""
    from .inference import default_checkpoint

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    where = machine()
    demo, url, bots = serve(checkpoints or [default_checkpoint()], queue_size=queue_size,
                            concurrency_limit=concurrency_limit, device=device)
    try:
        run_load(url, 1, 1, timeout=timeout)  # warm-up: first-call costs are not load
        results = [run_load(url, n, requests_per_client, timeout=timeout) for n in client_counts]
    finally:
        demo.close()
    q = demo._queue
    return {"checkpoint": [str(b.path) for b in bots.values()], "machine": where,
            "queue_size": q.max_size, "concurrency_limit": q.default_concurrency_limit,
            "requests_per_client": requests_per_client, "results": [r.to_dict() for r in results],
            "table": table(results)}
