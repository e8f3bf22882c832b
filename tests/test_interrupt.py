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
from safetensors.torch import load_file

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


# ------------------------------------------------------------------ Ctrl-C at any instant of a step (round two)

EXACT = {"train.epochs": "3", "model.dropout": "0.3", "train.patience": "10", "train.word_dropout": "0.2",
         "train.subword_alpha": "0.1", "train.max_steps": "14"}


@pytest.fixture(scope="module")
def straight(tiny_corpus_csv, tmp_path_factory):
    """The weights of 14 uninterrupted steps (word dropout and sampled segmentations: the RNG matters)."""
    out = tmp_path_factory.mktemp("straight")
    train_tiny(tiny_corpus_csv, out, **EXACT)
    return load_file(out / "last" / "model.safetensors")


def ctrl_c(monkeypatch, point: str, step: int) -> list[int]:
    """Send this process SIGINT at ``point`` of optimiser step ``step`` (1-based); returns a list that gets the
    step once the signal is sent."""
    import chatbot.train as tr

    sent: list[int] = []
    steps = {"n": 0}

    def fire(now: int) -> None:
        if now == step and not sent:
            sent.append(now)
            os.kill(os.getpid(), signal.SIGINT)

    if point == "batch":  # the batch is built and its word dropout drawn from the RNG; no gradient yet
        real_drop = tr.drop_words

        def drop_words(src, p):
            out = real_drop(src, p)
            steps["n"] += 1
            fire(steps["n"])
            return out
        monkeypatch.setattr(tr, "drop_words", drop_words)
    elif point in ("before update", "after update"):  # gradients computed; the weights not yet / just changed
        real_make = tr.make_optimizer

        def make_optimizer(*args, **kwargs):
            optimizer = real_make(*args, **kwargs)

            def hook(*_):
                if point == "after update":
                    steps["n"] += 1
                fire(steps["n"] if point == "after update" else steps["n"] + 1)
            (optimizer.register_step_post_hook if point == "after update" else optimizer.register_step_pre_hook)(hook)
            if point == "before update":
                optimizer.register_step_post_hook(lambda *_: steps.__setitem__("n", steps["n"] + 1))
            return optimizer
        monkeypatch.setattr(tr, "make_optimizer", make_optimizer)
    elif point == "scheduler":  # the update is done, the learning rate moves on; the counters not yet
        real_lambda = tr.lr_lambda

        def lr_lambda(*args):
            f = real_lambda(*args)

            def g(s: int) -> float:
                fire(s)
                return f(s)
            return g
        monkeypatch.setattr(tr, "lr_lambda", lr_lambda)
    elif point == "bookkeeping":  # the counters have moved on, the epoch statistics not yet
        real_add = tr._EpochStats.add

        def add(self, loss, tokens):
            steps["n"] += 1
            fire(steps["n"])
            return real_add(self, loss, tokens)
        monkeypatch.setattr(tr._EpochStats, "add", add)
    else:  # "validation": the epoch's batches are done, its validation loss is being computed
        real_loss = tr.corpus_cross_entropy

        def corpus_cross_entropy(*args, **kwargs):
            fire(step)
            return real_loss(*args, **kwargs)
        monkeypatch.setattr(tr, "corpus_cross_entropy", corpus_cross_entropy)
    return sent


@pytest.mark.parametrize("point, step", [("batch", 3), ("before update", 5), ("after update", 6), ("scheduler", 8),
                                         ("bookkeeping", 9), ("validation", 0)])
def test_ctrl_c_at_any_point_of_a_step_resumes_exactly(tiny_corpus_csv, tmp_path, monkeypatch, straight, point, step):
    """Wherever in a step Ctrl-C lands, last/ holds one consistent state (the optimiser has made exactly the
    updates the progress counts), and --resume ends with the weights of the uninterrupted run."""
    cfg = lambda: load_config(ROOT / "configs" / "tiny.yaml", {  # noqa: E731
        "data.path": str(tiny_corpus_csv), "train.out_dir": str(tmp_path), **EXACT})
    sent = ctrl_c(monkeypatch, point, step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), log=lambda s: None)
    assert sent, f"the signal was never sent at {point}"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    state = torch.load(tmp_path / "last" / TRAIN_STATE, weights_only=True)
    updates = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert updates == {json.loads(state["progress"])["step"]}, point  # one count for weights and progress
    train(cfg(), resume=True, log=lambda s: None)
    resumed = load_file(tmp_path / "last" / "model.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=f"{point}: {k}")


def test_a_resume_in_a_new_process_draws_the_same_segmentations(tiny_corpus_csv, tmp_path):
    """--resume always runs in a new process: with sampled segmentations (train.subword_alpha), stopping at step
    7 and resuming to 14 from the command line ends with the weights of 14 steps in one go (sentencepiece's own
    sampler drew other segmentations in every process, whatever the seed)."""
    args = [f"--{k}={v}" for k, v in EXACT.items() if k != "train.max_steps"]

    def cli(out, steps, *extra):
        subprocess.run([*train_args(tiny_corpus_csv, out), *args, "--train.max_steps", str(steps), *extra],
                       cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)

    cli(tmp_path / "straight", 14)
    cli(tmp_path / "resumed", 7)
    assert progress(tmp_path / "resumed" / "last")["step"] == 7
    cli(tmp_path / "resumed", 14, "--resume")
    straight = load_file(tmp_path / "straight" / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "last" / "model.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)
