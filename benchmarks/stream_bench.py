"""Stream one 80-piece sampled reply through /chat (gradio_client), or through headless Chromium.
Prints server CPU seconds (the server process's utime+stime) and wall times.

Usage, from the repository root: python benchmarks/stream_bench.py api|browser 0 (docs/performance.md)"""
import json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, ".")
import httpx
from chatbot.loadtest import free_port, client as loopback_client
MSG = "주말에 뭐 하지 그리고 내일은 뭐 하지 너무 심심해서 아무거나 하고 싶어"
TICK = os.sysconf("SC_CLK_TCK")

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK

def start(seed):
    port = free_port()
    p = subprocess.Popen([sys.executable, str(Path(__file__).with_name("stream_bench_server.py")), str(port), str(seed)],
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            if httpx.get(url, timeout=2).status_code == 200: break
        except Exception: pass
        time.sleep(0.5)
    return p, url

def api(seed):
    p, url = start(seed)
    try:
        c = loopback_client(url)
        c.predict("안녕", strategy="greedy", api_name="/chat")  # warm-up (no RNG use)
        time.sleep(1)
        c0, t0 = cpu(p.pid), time.perf_counter()
        job = c.submit(MSG, strategy="sample", max_len=80, temperature=1.5, api_name="/chat")
        updates = list(job)
        history, plot = job.result()
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        server = cpu(p.pid) - c0
        rows = len(json.loads(plot["plot"])["data"][0]["z"])
        print(f"API /chat: rows {rows}, updates {len(updates)}, wall {wall:.2f} s, server CPU {server:.2f} s", flush=True)
    finally:
        p.terminate(); p.wait()

def bot_source(msg):
    from chatbot.inference import ChatBot
    return ChatBot.from_checkpoint("checkpoints/default", device="cpu").read(msg).ids

READ = """() => { const d = document.querySelector('#heatmap .js-plotly-plot');
  return d && d.data && d.data.length && d.data[0].type === 'heatmap' ? d.data[0].z.length * 1000 + d.data[0].x.length : 0; }"""

def browser(seed):
    from playwright.sync_api import sync_playwright
    p, url = start(seed)
    try:
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#msg textarea")
            box = page.locator("#msg textarea")
            box.fill("안녕"); box.press("Enter")  # warm-up: sampling too, so seed sequence is fixed
            page.wait_for_function(f"() => ({READ})() > 0", timeout=120_000)
            page.wait_for_selector("#msg textarea:not([disabled])", timeout=300_000)
            page.wait_for_timeout(3000)
            SRC = len(bot_source(MSG))
            c0, t0 = cpu(p.pid), time.perf_counter()
            box.fill(MSG); box.press("Enter")
            page.wait_for_function(f"() => ({READ})() === 80000 + {SRC}", timeout=300_000, polling=50)
            final = time.perf_counter() - t0
            page.wait_for_selector("#msg textarea:not([disabled])", timeout=300_000)
            page.wait_for_function("() => !document.querySelector('.progress-text, .eta-bar')", timeout=60_000)
            settled = time.perf_counter() - t0
            time.sleep(0.5)
            print(f"Chromium: 80-row heatmap after {final:.2f} s, no progress shown after {settled:.2f} s, "
                  f"server CPU {cpu(p.pid) - c0:.2f} s", flush=True)
            page.screenshot(path="artifacts/stream_bench_final.png", timeout=120_000)
            b.close()
    finally:
        p.terminate(); p.wait()

if __name__ == "__main__":
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    {"api": api, "browser": browser}[sys.argv[1]](seed)
