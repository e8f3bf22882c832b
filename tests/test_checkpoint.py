"""Checkpoint folders: round trip, verification, clear errors, atomic saves, nothing unpickled."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from chatbot.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_round_trip_gives_identical_replies(ckpt, tmp_path):
    ck = load_checkpoint(ckpt)
    again = save_checkpoint(tmp_path / "again", ck.model, ck.tokenizer, ck.config, meta=ck.meta)
    ck2 = load_checkpoint(again)
    for (k, a), (_, b) in zip(ck.model.state_dict().items(), ck2.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert ck2.tokenizer.encode("헤어졌어") == ck.tokenizer.encode("헤어졌어")


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "missing", "flip"])
@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.model", "config.json"])
def test_damaged_files_give_one_clear_error_naming_the_file(ckpt, damage, name):
    f = ckpt / name
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "garbage":
        f.write_bytes(b"\x00garbage" * 10)
    elif damage == "missing":
        f.unlink()
    else:  # same size, one byte changed: only the hash can tell
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert name in str(e.value)


def test_config_that_does_not_match_the_weights_says_so(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["config"]["model"]["hidden_dim"] = 32
    (ckpt / "config.json").write_text(json.dumps(raw))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    from chatbot.checkpoint import sha256
    manifest["config.json"] = {"sha256": sha256(ckpt / "config.json"), "bytes": (ckpt / "config.json").stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(ckpt)


def test_missing_folder_and_manifest(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        verify(ckpt)


def test_a_crash_during_save_keeps_the_previous_checkpoint(ckpt, monkeypatch):
    """Kill the save half-way (after the weights are written): the old folder must still load."""
    ck = load_checkpoint(ckpt)
    before = (ckpt / "manifest.json").read_bytes()
    import chatbot.checkpoint as cp

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cp, "model_card", crash)
    with pytest.raises(OSError):
        save_checkpoint(ckpt, ck.model, ck.tokenizer, ck.config)
    assert (ckpt / "manifest.json").read_bytes() == before
    load_checkpoint(ckpt)
    assert not any(p.name == "model.safetensors" for p in ckpt.parent.glob("ckpt/*.tmp"))
