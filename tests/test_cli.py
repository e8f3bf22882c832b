"""The command line, run as a user would: ``python -m chatbot ...`` in a subprocess."""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT


def run(*args, stdin="", env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "chatbot", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def test_reply_writes_exactly_one_line_per_input_line(tiny_checkpoint):
    lines = ["안녕", "", "   ", "헤어졌어 ㅠㅠ", "😀", "<b>굵게</b>", "x" * 3000]
    p = run("reply", "--checkpoint", str(tiny_checkpoint), stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout.split("\n")
    assert out[-1] == "" and len(out[:-1]) == len(lines)


def test_reply_json_and_beam(tiny_checkpoint):
    p = run("reply", "--checkpoint", str(tiny_checkpoint), "--json", "--beam", "3", "--n-best", "2",
            stdin="오늘 날씨 좋다\n고백할까\n")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert len(r["attention"]) == len(r["reply_tokens"])
        assert all(len(row) == len(r["source_tokens"]) and abs(sum(row) - 1) < 1e-3 for row in r["attention"])
        assert len(r["n_best"]) == 2
    plain = run("reply", "--checkpoint", str(tiny_checkpoint), "--beam", "3", "--n-best", "2",
                stdin="오늘 날씨 좋다\n고백할까\n")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == [r["reply"].replace("\n", " ") for r in rows]  # the best, one line each


@pytest.mark.parametrize("command", ["reply", "evaluate"])
def test_decoding_flags_come_from_decode_options(command):
    from chatbot.cli import _decoding, build_parser
    from chatbot.search import OPTIONS, STRATEGIES, DecodeOptions

    parser = build_parser()
    sub = parser.parse_args([command]).decoding_parser
    actions = {a.dest: a for a in sub._actions}
    for name, spec in OPTIONS.items():
        action = actions[name]
        assert "--" + name.replace("_", "-") in action.option_strings
        if name not in ("strategy", "beam_size"):  # those two follow each other (see _decoding)
            assert action.default == spec.default, name
        assert f"default {'none' if spec.default is None else spec.default}" in action.help
        if not spec.choices:
            assert spec.range_text() in action.help
    assert "--beam" in actions["beam_size"].option_strings
    assert "--json" in actions["n_best"].help
    assert DecodeOptions(**_decoding(parser.parse_args([command]))) == DecodeOptions()
    for strategy in STRATEGIES:
        assert DecodeOptions(**_decoding(parser.parse_args([command, "--strategy", strategy]))) == DecodeOptions(
            strategy=strategy)
    beam = _decoding(parser.parse_args([command, "--beam", "3", "--n-best", "2", "--top-k", "5"]))
    assert (beam["strategy"], beam["beam_size"], beam["n_best"]) == ("beam", 3, 2) and "top_k" not in beam
    sample = _decoding(parser.parse_args([command, "--strategy", "sample", "--seed", "3", "--n-best", "2"]))
    assert sample["seed"] == 3 and "n_best" not in sample and "beam_size" not in sample


@pytest.mark.parametrize("flags, says", [
    (["--max-len", "0"], "argument --max-len: must be in 1–80, got 0"),
    (["--beam", "11"], "must be in 1–10, got 11"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["--top-p", "inf"], "argument --top-p: must be a finite number"),
    (["--top-k", "two"], "argument --top-k: must be an integer"),
    (["--beam", "2", "--n-best", "3"], "n_best must be at most beam_size (2), got 3"),
])
def test_out_of_range_decoding_flags_are_a_one_line_usage_error(flags, says, capsys):
    from chatbot.cli import main

    with pytest.raises(SystemExit) as e:
        main(["reply", "--checkpoint", "does-not-exist", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


def test_evaluate_prints_model_and_baseline_figures(tiny_checkpoint, tiny_corpus_csv):
    p = run("evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_corpus_csv), "--markdown")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    keys = {"bleu", "chrf", "distinct_1", "distinct_2", "unique_reply_rate", "exact_match"}
    assert keys | {"perplexity"} <= set(result["model"]) and keys <= set(result["retrieval_baseline"])
    assert result["split"] == "test" and result["pairs"] > 0
    assert 1 < result["model"]["perplexity"] < 400
    assert "| chrf |" in p.stderr
    seen = result["chrf_by_answer_seen"]  # test pairs whose answer is / is not also a training answer
    assert seen["answer_in_train"]["pairs"] + seen["answer_new"]["pairs"] == result["pairs"]
    assert all(g["model_chrf"] is None or 0 <= g["model_chrf"] <= 100 for g in seen.values())
    assert "encoder_neighbour" not in result  # the probe runs only when asked
    p = run("evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_corpus_csv), "--probe")
    probe = json.loads(p.stdout)["encoder_neighbour"]  # training answers of the encoder's nearest training questions
    assert 0 <= probe["exact_match"] <= 1 and 0 < probe["chrf"] <= 100


def test_evaluate_plots_chrf_by_length_naming_each_checkpoint(tiny_checkpoint, tiny_corpus_csv, tmp_path):
    from chatbot.evaluate import series_name

    png = tmp_path / "by_length.png"
    p = run("evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_corpus_csv), "--plot", str(png))
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(p.stdout)
    assert series_name(result) == f"{tiny_checkpoint.name}: general attention"
    assert series_name({**result, "checkpoint": "checkpoints/none/", "attention": "none"}) == "none: no attention"
    assert series_name({**result, "checkpoint": "checkpoints/recall", "recall": {"gate_mean": 0.5}}) == "recall: recall + copy"


def test_corrupt_checkpoint_exits_non_zero_without_a_traceback(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"not weights")
    p = run("reply", "--checkpoint", str(bad), stdin="안녕\n")
    assert p.returncode != 0
    assert "model.safetensors" in p.stderr and "Traceback" not in p.stderr


def test_missing_corpus_names_the_download_command(tmp_path):
    p = run("train", "--config", "configs/tiny.yaml", "--data", str(tmp_path / "none.csv"),
            "--out", str(tmp_path / "run"))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "python -m chatbot download" in p.stderr


def test_train_command_with_overrides(tiny_corpus_csv, tmp_path):
    p = run("train", "--config", "configs/tiny.yaml", "--data", str(tiny_corpus_csv), "--out", str(tmp_path / "r"),
            "--train.epochs", "1", "--model.attention=additive")
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / "r" / "best" / "config.json").read_text())["config"]
    assert cfg["model"]["attention"] == "additive" and cfg["train"]["epochs"] == 1


@pytest.fixture
def corpus_server(tiny_corpus_csv):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_corpus_csv.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_command_against_a_local_server(corpus_server, tiny_corpus_csv, tmp_path):
    env = {"no_proxy": "*", "NO_PROXY": "*", "http_proxy": "", "HTTP_PROXY": ""}
    out = tmp_path / "data" / "ChatbotData.csv"
    p = run("download", "--url", f"{corpus_server}/{tiny_corpus_csv.name}", "--out", str(out), env=env)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == tiny_corpus_csv.read_bytes()
    p = run("download", "--url", f"{corpus_server}/missing.csv", "--out", str(out), env=env)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert out.read_bytes() == tiny_corpus_csv.read_bytes()  # the good copy is kept


def test_evaluate_writes_its_table_into_the_model_card(tiny_checkpoint, tiny_corpus_csv, tmp_path):
    from safetensors.torch import load_file

    from chatbot.checkpoint import load_checkpoint
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    before = load_file(ck / "model.safetensors")
    p = run("evaluate", "--checkpoint", str(ck), "--data", str(tiny_corpus_csv), "--write-card")
    assert p.returncode == 0, p.stderr
    assert "| chrf |" in (ck / "README.md").read_text() and "retrieval baseline" in (ck / "README.md").read_text()
    load_checkpoint(ck)  # the manifest was rewritten with the card
    after = load_file(ck / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_download_refuses_local_files_in_one_line(tmp_path):
    out = tmp_path / "ChatbotData.csv"
    p = run("download", "--url", "file:///etc/passwd", "--out", str(out))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "only http:// and https://" in p.stderr
    assert "root:" not in p.stderr and not out.exists()


def test_download_limits_are_flags(corpus_server, tiny_corpus_csv, tmp_path):
    env = {"no_proxy": "*", "NO_PROXY": "*", "http_proxy": "", "HTTP_PROXY": ""}
    out = tmp_path / "ChatbotData.csv"
    out.write_text("Q,A,label\n기존,파일,0\n", encoding="utf-8")
    p = run("download", "--url", f"{corpus_server}/{tiny_corpus_csv.name}", "--out", str(out), "--max-bytes", "1000",
            env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert "more than 1,000 bytes (--max-bytes)" in p.stderr
    assert out.read_text(encoding="utf-8") == "Q,A,label\n기존,파일,0\n"

    from chatbot.cli import build_parser
    args = build_parser().parse_args(["download"])
    assert (args.max_bytes, args.deadline) == (50_000_000, 120.0)
    for flag, value in (("--max-bytes", "0"), ("--deadline", "-1"), ("--deadline", "nan")):
        q = run("download", flag, value, "--out", str(out))
        assert q.returncode == 2 and f"argument {flag}: must be" in q.stderr and q.stderr.count("\n") == 1, q.stderr


def test_a_checkpoint_asking_for_an_absurd_model_is_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    from chatbot.checkpoint import sha256

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["config"]["model"]["hidden_dim"] = 1e7  # terabytes, if it were built
    (bad / "config.json").write_text(json.dumps(raw))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["config.json"] = {"sha256": sha256(bad / "config.json"), "bytes": (bad / "config.json").stat().st_size}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    p = run("reply", "--checkpoint", str(bad), stdin="안녕\n", timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "model.hidden_dim" in p.stderr, p.stderr


def test_loadtest_runs_its_rounds_and_prints_a_verdict_per_target(tiny_checkpoint, tmp_path):
    """The whole command on the tiny checkpoint: one round per client count (and 1, the baseline), the
    new-session memory check, a verdict line per target and the JSON, also written to --json."""
    out = tmp_path / "load.json"
    p = run("loadtest", "--checkpoint", str(tiny_checkpoint), "--clients", "2", "--requests", "1",
            "--sessions", "20", "--json", str(out), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert [r["clients"] for r in result["rounds"]] == [1, 2]
    assert result["rounds"][1]["chat"]["requests"] == 1 and result["new_sessions"]["sessions"] == 20
    assert len(result["verdict"]) == 3 and all(line.startswith(("ok:", "FAIL:")) for line in result["verdict"])
    assert result["new_sessions"]["ok"] == 20, result["new_sessions"]


def test_loadtest_refuses_bad_counts_in_one_line():
    p = run("loadtest", "--clients", "0", "--sessions", "5")
    assert p.returncode == 2 and "--clients needs positive counts" in p.stderr and "Traceback" not in p.stderr
