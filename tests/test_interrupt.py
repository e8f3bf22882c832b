"""Ctrl-C and damaged resume state: training always leaves last/ resumable, or says which file is bad."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from chatbot.checkpoint import MANIFEST, load_checkpoint, read_metrics, sha256
from chatbot.config import load_config
from chatbot.train import TRAIN_STATE, TrainingError, train
from conftest import ROOT, train_tiny

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def progress(last) -> dict:
    return json.loads(torch.load(last / TRAIN_STATE, weights_only=True)["progress"])


def train_args(corpus, out) -> list[str]:
    return [sys.executable, "-m", "chatbot", "train", "--config", "configs/tiny.yaml", "--data", str(corpus),
            "--out", str(out)]


def test_ctrl_c_leaves_a_resumable_checkpoint(tiny_corpus_csv, tmp_path):
    out, err_file = tmp_path / "run", tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        p = subprocess.Popen([*train_args(tiny_corpus_csv, out), "--train.epochs", "50", "--train.patience", "100"],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 90
            while not any("val_loss" in r for r in read_metrics(out / "metrics.jsonl")):
                assert p.poll() is None, err_file.read_text()
                assert time.monotonic() < deadline, "no epoch finished within 90 s"
                time.sleep(0.2)
            p.send_signal(signal.SIGINT)
            rc = p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    stderr = err_file.read_text()
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("interrupted") and "--resume" in last_line, last_line

    load_checkpoint(out / "last")  # verifies every file, train_state.pt included (it is in the manifest)
    assert TRAIN_STATE in json.loads((out / "last" / MANIFEST).read_text())
    stopped = progress(out / "last")
    epochs = stopped["epoch"] + 1  # finish the epoch it was in (or one more if it stopped on a boundary)
    r = subprocess.run([*train_args(tiny_corpus_csv, out), "--resume", "--train.epochs", str(epochs)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    done = progress(out / "last")
    # Ctrl-C may land mid-epoch or after an epoch's last batch (during its validation): either way the resumed run
    # does exactly the batches that were left, and then that epoch's validation.
    per_epoch = next(r["step"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r)
    assert done["epoch"] == epochs and done["batch"] == 0
    assert done["step"] == epochs * per_epoch >= stopped["step"], (stopped, done)
    assert any(r.get("epoch") == epochs and "val_loss" in r for r in read_metrics(out / "metrics.jsonl"))
    load_checkpoint(out / "last")
    load_checkpoint(out / "best")


def test_a_second_ctrl_c_during_the_save_keeps_the_previous_last(tiny_corpus_csv, tmp_path, monkeypatch):
    """Ctrl-C mid-save (weights already written), then again inside the interrupt handler's own save:
    last/ is still the previous whole checkpoint, weights and train_state.pt from the same step."""
    train_tiny(tiny_corpus_csv, tmp_path, **{"train.epochs": "1"})
    last = tmp_path / "last"
    manifest, step = (last / MANIFEST).read_text(), progress(last)["step"]
    import chatbot.checkpoint as cp

    calls = []

    def ctrl_c(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(cp, "model_card", ctrl_c)  # runs after the weights, before the manifest and the swap
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"data.path": str(tiny_corpus_csv),
                                                       "train.out_dir": str(tmp_path), "train.epochs": "3"})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume=True, log=lambda s: None)
    assert len(calls) == 2  # the save in the loop, then the handler's save: both cut short
    assert (last / MANIFEST).read_text() == manifest
    load_checkpoint(last)
    assert progress(last)["step"] == step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler put Ctrl-C back

    monkeypatch.undo()
    cfg.train.epochs = 2
    train(cfg, resume=True, log=lambda s: None)
    assert progress(last)["epoch"] == 2 and not (tmp_path / "last.tmp").exists()


@pytest.fixture(scope="module")
def resumable(tiny_corpus_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("resumable")
    train_tiny(tiny_corpus_csv, out, **{"train.epochs": "1"})
    return out


def damage(run, how: str) -> None:
    f = run / "last" / TRAIN_STATE
    if how == "zeros":
        torch.save({"x": torch.zeros(2)}, f)  # a valid torch file, but not a training state
    else:
        f.write_bytes(b"\x00garbage" * 64)
    if how != "garbage":  # as if the manifest were rewritten too: the file itself must be judged
        manifest = json.loads((run / "last" / MANIFEST).read_text())
        manifest[TRAIN_STATE] = {"sha256": sha256(f), "bytes": f.stat().st_size}
        (run / "last" / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how,says", [("garbage", "SHA-256"), ("unreadable", "not a readable training state"),
                                      ("zeros", "not a training state")])
def test_damaged_train_state_is_one_clear_error_naming_the_file(resumable, tmp_path, tiny_corpus_csv, how, says):
    run = tmp_path / "run"
    shutil.copytree(resumable, run)
    damage(run, how)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"data.path": str(tiny_corpus_csv), "train.out_dir": str(run)})
    with pytest.raises(TrainingError) as e:
        train(cfg, resume=True, log=lambda s: None)
    msg = str(e.value)
    assert str(run / "last" / TRAIN_STATE) in msg and says in msg and "\n" not in msg
    assert "without --resume" in msg and "restore" in msg


def test_damaged_train_state_through_the_cli(resumable, tmp_path, tiny_corpus_csv):
    run = tmp_path / "run"
    shutil.copytree(resumable, run)
    damage(run, "unreadable")
    p = subprocess.run([*train_args(tiny_corpus_csv, run), "--resume"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    last_line = p.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(run / "last" / TRAIN_STATE) in last_line
