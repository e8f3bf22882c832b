"""Time `python app.py` (every shipped checkpoint, as a user starts it) from process start to its first
answered /reply through gradio_client, 3 runs. From the repository root: python benchmarks/app_start.py"""
import subprocess, sys, time, os, socket
from gradio_client import Client
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
for run in range(3):
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                time.sleep(0.1)
        t_up = time.perf_counter() - t0
        out = client.predict("오늘 너무 힘들었어", api_name="/reply")
        t_first = time.perf_counter() - t0
        print(f"run {run}: server up {t_up:.2f} s, first /reply answered {t_first:.2f} s after start: {out['reply']}")
    finally:
        proc.terminate(); proc.wait()
