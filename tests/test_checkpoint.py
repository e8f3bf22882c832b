"""Checkpoint folders: round trip, verification, clear errors, atomic saves, nothing unpickled."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

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


# ------------------------------------------------------------------ crashes during saves (reliability round two)

class Crash(Exception):
    """The process dies here."""


def crash_at(monkeypatch, n: int) -> list[str]:
    """Make the n-th file-system step of the save protocol die (1-based: the weights written to the temporary
    folder, each os.replace, each shutil.rmtree; an rmtree dies half-way, after deleting one file). Returns the
    steps seen."""
    import os

    import chatbot.checkpoint as cp

    seen: list[str] = []
    real_replace, real_rmtree, real_save_file = os.replace, shutil.rmtree, cp.save_file

    def step(name: str) -> bool:
        seen.append(name)
        return len(seen) == n

    def replace(src, dst, *a, **k):
        if step(f"replace {os.path.basename(src)} -> {os.path.basename(dst)}"):
            raise Crash
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if step(f"rmtree {os.path.basename(path)}"):
            files = sorted(p for p in Path(path).glob("*") if p.is_file()) if Path(path).is_dir() else []
            if files:
                files[0].unlink()
            raise Crash
        return real_rmtree(path, *a, **k)

    def save_file(*a, **k):
        if step("write weights"):
            raise Crash
        return real_save_file(*a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(cp, "save_file", save_file)
    return seen


def marked(ck, value: float):
    """The checkpoint's model with a first weight that names the save it comes from."""
    with torch.no_grad():
        next(ck.model.parameters()).view(-1)[0] = value
    return ck.model


def mark_of(path) -> float:
    from chatbot.checkpoint import resolve
    return next(load_checkpoint(resolve(path)).model.parameters()).view(-1)[0].item()


def test_any_two_crashes_in_a_row_leave_a_loadable_checkpoint(ckpt, tmp_path, monkeypatch):
    """A crash at any step of a save, then at any step of the next save (which may start from the `.old`
    folder the first crash left): the folder always loads, with the weights it had before that save or the
    new ones; and a last, uncut save puts the newest weights in place with nothing left over."""
    ck = load_checkpoint(ckpt)
    save_checkpoint(tmp_path / "probe", marked(ck, 0.0), ck.tokenizer, ck.config)
    steps = crash_at(monkeypatch, 0)
    save_checkpoint(tmp_path / "probe", marked(ck, 0.0), ck.tokenizer, ck.config)
    monkeypatch.undo()
    n_steps = len(steps) + 1  # a save over an existing folder, and one more (a save that starts from .old)

    for first in range(1, n_steps + 1):
        for second in range(1, n_steps + 1):
            path = tmp_path / f"c{first}-{second}"
            save_checkpoint(path, marked(ck, 1.0), ck.tokenizer, ck.config)
            for value, n in ((2.0, first), (3.0, second)):
                before = mark_of(path)
                crash_at(monkeypatch, n)
                try:
                    save_checkpoint(path, marked(ck, value), ck.tokenizer, ck.config)
                    finished = True
                except Crash:
                    finished = False
                monkeypatch.undo()
                left = sorted(p.name for p in tmp_path.glob(f"{path.name}*"))
                assert mark_of(path) in ((value,) if finished else (before, value)), (first, second, left)
            save_checkpoint(path, marked(ck, 4.0), ck.tokenizer, ck.config)
            assert mark_of(path) == 4.0
            assert [p.name for p in tmp_path.glob(f"{path.name}*")] == [path.name], (first, second)


# ------------------------------------------------------------------ hostile checkpoints (reliability round two)

def resign(ckpt: Path, name: str) -> None:
    """Record ``name``'s current bytes in the manifest, as a forger would: only the content checks can object."""
    from chatbot.checkpoint import sha256

    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest[name] = {"sha256": sha256(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def set_manifest(ckpt: Path, how: str) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    if how == "empty":
        manifest = {}
    elif how == "list":
        manifest = [1, 2, 3]
    elif how == "string entries":
        manifest = {name: "abc" for name in manifest}
    elif how == "one string entry":
        manifest = {"model.safetensors": "abc"}
    elif how == "bad sizes":
        manifest["config.json"]["bytes"] = str(manifest["config.json"]["bytes"])
    elif how == "bad hash":
        manifest["config.json"]["sha256"] = 5
    elif how == "outside file":
        manifest["../" * 30 + "etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}  # /etc/passwd from any folder
    elif how == "absolute path":
        manifest["/etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    elif how == "subfolder":
        manifest["sub/x"] = {"sha256": "0" * 64, "bytes": 1}
    elif how == "backslash":
        manifest["..\\\\x"] = {"sha256": "0" * 64, "bytes": 1}
    elif how == "itself":
        manifest["manifest.json"] = {"sha256": "0" * 64, "bytes": 1}
    elif how == "unlisted file":
        (ckpt / "evil.py").write_text("print('hi')")
    elif how == "listed twice over":  # a listed name that is not in the folder
        manifest["gone.bin"] = {"sha256": "0" * 64, "bytes": 1}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


MANIFESTS = ["empty", "list", "string entries", "one string entry", "bad sizes", "bad hash", "outside file",
             "absolute path", "subfolder", "backslash", "itself", "unlisted file", "listed twice over"]


def one_line_error(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("how", MANIFESTS)
def test_the_manifest_must_list_exactly_the_checkpoints_files(ckpt, how):
    set_manifest(ckpt, how)
    msg = one_line_error(ckpt)
    assert "manifest" in msg
    if how in ("outside file", "absolute path"):
        import os
        assert str(os.stat("/etc/passwd").st_size) + " bytes" not in msg  # nothing was read outside the folder


def edit_config(ckpt: Path, section: str, key: str, value) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    raw["config"][section][key] = value
    (ckpt / "config.json").write_text(json.dumps(raw))
    resign(ckpt, "config.json")


@pytest.mark.parametrize("key, value", [("hidden_dim", 1e7), ("hidden_dim", 10_000_000), ("emb_dim", 100_000),
                                        ("vocab_size", 2_000_000), ("emb_dim", 0), ("enc_layers", -1),
                                        ("dec_layers", 1000), ("emb_dim", "64"), ("emb_dim", True)])
def test_absurd_model_sizes_in_the_config_are_refused_before_allocating(ckpt, key, value):
    import time

    edit_config(ckpt, "model", key, value)
    t0 = time.perf_counter()
    msg = one_line_error(ckpt)
    assert time.perf_counter() - t0 < 5
    assert f"model.{key}" in msg and "config.json" in msg


def edit_weights(ckpt: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    if how == "nan":
        name = next(iter(state))
        state[name] = state[name].clone()
        state[name].view(-1)[3] = float("nan")
    elif how == "inf":
        name = sorted(state)[-1]
        state[name] = state[name].clone().fill_(float("-inf"))
    else:  # int8 tensors where the model holds floats
        state = {k: (v * 100).to(torch.int8) for k, v in state.items()}
    save_file(state, str(ckpt / "model.safetensors"))
    resign(ckpt, "model.safetensors")


@pytest.mark.parametrize("how, says", [("nan", "non-finite"), ("inf", "non-finite"), ("int8", "int8")])
def test_non_finite_or_non_float_weights_are_refused(ckpt, how, says):
    edit_weights(ckpt, how)
    msg = one_line_error(ckpt)
    assert says in msg and "model.safetensors" in msg


@pytest.mark.parametrize("damage", ["manifest empty", "manifest outside file", "manifest list", "hidden 1e7",
                                    "nan", "int8"])
def test_a_hostile_checkpoint_through_the_cli_is_one_line_and_exit_2(ckpt, damage, capsys, monkeypatch):
    import io

    from chatbot.cli import main

    kind, _, what = damage.partition(" ")
    if kind == "manifest":
        set_manifest(ckpt, what)
    elif kind == "hidden":
        edit_config(ckpt, "model", "hidden_dim", 1e7)
    else:
        edit_weights(ckpt, damage)
    monkeypatch.setattr("sys.stdin", io.StringIO("안녕\n"))
    assert main(["reply", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
