"""DistributedDataParallel under torchrun: 2 CPU processes (gloo) on the tiny recipe.

The replicas must end with identical weights, only rank 0 may write, and the result must
equal one process trained on the union of the two ranks' batches (the loss is weighted by
the global token count, so DDP's gradient averaging gives the same update).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from chatbot.batching import batch_order, collate, encode_pairs
from chatbot.checkpoint import load_checkpoint
from chatbot.config import load_config
from chatbot.data import load_corpus, split_corpus
from chatbot.loadtest import free_port
from chatbot.model import build_model
from chatbot.train import lr_lambda, make_optimizer, seed_everything, train_step
from conftest import ROOT

STEPS, EPOCHS = 7, 2  # 5 steps per rank per epoch on the tiny corpus: crosses an epoch boundary
OVERRIDES = {"model.dropout": "0", "train.max_steps": str(STEPS), "train.epochs": str(EPOCHS),
             "train.threads": "1", "train.patience": "10", "train.samples": "1"}



def single_process_on_union_batches(cfg, csv, tokenizer) -> dict[str, torch.Tensor]:
    """What train() does, in one process, with each step's batch = rank 0's + rank 1's batch."""
    corpus = load_corpus(csv)
    train_df = split_corpus(corpus.pairs, cfg.data.val_fraction, cfg.data.test_fraction)["train"]
    pairs = encode_pairs(tokenizer, train_df["Q"], train_df["A"], train_df["label"],
                         cfg.data.max_source_len, cfg.data.max_target_len)
    cfg.model.vocab_size = tokenizer.vocab_size
    t = cfg.train
    seed_everything(t.seed)
    model = build_model(cfg.model).train()
    per_rank = len(batch_order(pairs, t.batch_size, t.seed, 0, rank=0, world_size=2))
    optimizer = make_optimizer(model, t.lr, t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, EPOCHS * per_rank,
                                                                       t.min_lr_ratio))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = 0
    for epoch in range(EPOCHS):
        shards = [batch_order(pairs, t.batch_size, t.seed, epoch, rank=r, world_size=2) for r in (0, 1)]
        for a, b in zip(*shards):
            train_step(model, collate(pairs, a + b), optimizer, scaler, label_smoothing=t.label_smoothing,
                       grad_clip=t.grad_clip)
            scheduler.step()
            step += 1
            if step == STEPS:
                return model.state_dict()
    raise AssertionError("ran out of batches")


def test_torchrun_two_cpu_processes_equal_one_process_on_the_global_batch(tiny_corpus_csv, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "chatbot", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--data", str(tiny_corpus_csv), "--out", str(out)]
    for k, v in OVERRIDES.items():
        cmd += [f"--{k}", v]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 replicas hold identical weights" in proc.stderr  # all-gathered parameter hashes agree

    # rank 0 alone wrote: one metrics row per epoch, world size recorded
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1, 2]
    meta = json.loads((out / "last" / "config.json").read_text())["meta"]
    assert meta["world_size"] == 2 and meta["steps"] == STEPS
    assert not list(out.glob("**/*.tmp"))

    cfg = load_config(ROOT / "configs" / "tiny.yaml", {"data.path": str(tiny_corpus_csv), **OVERRIDES})
    torch.set_num_threads(1)
    reference = single_process_on_union_batches(cfg, tiny_corpus_csv, load_checkpoint(out / "last").tokenizer)
    ddp = load_file(out / "last" / "model.safetensors")
    assert ddp.keys() <= reference.keys()
    for k, v in ddp.items():
        torch.testing.assert_close(v, reference[k], rtol=1e-3, atol=1e-4, msg=k)
    # and training moved the weights (the comparison is not vacuous)
    seed_everything(cfg.train.seed)
    init = build_model(cfg.model).state_dict()
    assert any(not torch.allclose(init[k], ddp[k], atol=1e-3) for k in ddp)
