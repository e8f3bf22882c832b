from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pandas as pd
import pytest

from chatbot.data import CorpusError, download_corpus, load_corpus, split_corpus


def _write(tmp_path: Path, content: str | bytes, name: str = "c.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# ------------------------------------------------------------------ load_corpus

def test_tiny_corpus_loads(tiny_corpus_csv):
    corpus = load_corpus(tiny_corpus_csv, verbose=False)
    assert list(corpus.pairs.columns) == ["Q", "A", "label"]
    assert len(corpus.pairs) == 200 == corpus.report["pairs"]
    assert corpus.pairs["label"].dtype.kind == "i"
    assert set(corpus.pairs["label"]) == {0, 1, 2}
    assert list(corpus.pairs.index) == list(range(200))


def test_missing_file_mentions_download(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.csv.*python -m chatbot download"):
        load_corpus(tmp_path / "nope.csv")


def test_bom_stripped_and_counted(tmp_path):
    corpus = load_corpus(_write(tmp_path, "\ufeffQ,A,label\n안녕,반가워요,0\n"), verbose=False)
    assert corpus.report["bom"] == 1
    assert corpus.pairs.loc[0, "Q"] == "안녕"


def test_missing_column(tmp_path):
    with pytest.raises(CorpusError, match=r"\['A'\].*found columns \['Q', 'B', 'label'\]"):
        load_corpus(_write(tmp_path, "Q,B,label\n안녕,반가워요,0\n"))


def test_missing_label_column(tmp_path, capsys):
    corpus = load_corpus(_write(tmp_path, "Q,A\n안녕,반가워요\n배고파,밥 드세요\n"))
    assert corpus.report["no_label_column"] == 1
    assert corpus.pairs["label"].tolist() == [0, 0]
    assert "no label column" in capsys.readouterr().err


def test_empty_cells_dropped_with_line_numbers(tmp_path):
    text = "Q,A,label\n안녕,반가워요,0\n,빈 질문,0\n빈 답,   ,1\n\u200b,\u200b,0\n배고파,밥 드세요,0\n"
    corpus = load_corpus(_write(tmp_path, text), verbose=False)
    assert corpus.report["empty"] == 3
    assert corpus.report["empty_lines"] == [3, 4, 5]
    assert corpus.pairs["Q"].tolist() == ["안녕", "배고파"]


def test_label_whitespace_repaired_and_bad_label(tmp_path):
    text = "Q,A,label\n안녕,반가워요,0\n헤어졌어,힘내요,2   \n좋아해,설레요, 2\n뭐해,쉬어요,x\n"
    corpus = load_corpus(_write(tmp_path, text), verbose=False)
    assert corpus.pairs["label"].tolist() == [0, 2, 2, 0]
    assert corpus.report["label_repaired"] == 2
    assert corpus.report["bad_label"] == 1
    assert corpus.report["bad_label_lines"] == [5]


def test_text_is_normalized(tmp_path):
    text = "Q,A,label\n\u1112\u1161\u11ab  글\u200b,\"ㅋㅋ\n웃겨\",0\n"
    corpus = load_corpus(_write(tmp_path, text), verbose=False)
    assert corpus.pairs.loc[0, "Q"] == "한 글"
    assert corpus.pairs.loc[0, "A"] == "ㅋㅋ 웃겨"
    assert corpus.report["normalized_cells"] == 2


def test_non_utf8_line_number(tmp_path):
    raw = "Q,A,label\n안녕,반가워요,0\n".encode() + "배고파,밥,0\n".encode("cp949") + b"x,y,0\n"
    with pytest.raises(CorpusError, match="line 3 is not valid UTF-8"):
        load_corpus(_write(tmp_path, raw))


@pytest.mark.parametrize("bad_row", ["하나,둘,0,넷", "하나 뿐"])
def test_malformed_row_line_number(tmp_path, bad_row):
    text = f'Q,A,label\n안녕,반가워요,0\n"여러\n줄",괜찮아요,0\n{bad_row}\n배고파,밥,0\n'
    with pytest.raises(CorpusError, match="line 5: expected 3 fields"):
        load_corpus(_write(tmp_path, text))


def test_duplicates(tmp_path):
    text = ("Q,A,label\n안녕,반가워요,0\n안녕,반가워요,0\n안녕, 반가워요 ,0\n"
            "안녕,오랜만이에요,0\n배고파,밥 드세요,0\n")
    corpus = load_corpus(_write(tmp_path, text), verbose=False)
    assert corpus.report["duplicates"] == 2
    assert corpus.report["duplicate_lines"] == [3, 4]
    assert corpus.report["duplicate_questions"] == 1
    assert corpus.pairs["A"].tolist() == ["반가워요", "오랜만이에요", "밥 드세요"]


def test_no_usable_rows(tmp_path):
    with pytest.raises(CorpusError, match="no usable"):
        load_corpus(_write(tmp_path, "Q,A,label\n,,0\n"))


# ------------------------------------------------------------------ split_corpus

def test_split_deterministic_disjoint_complete(tiny_corpus_csv):
    pairs = load_corpus(tiny_corpus_csv, verbose=False).pairs
    # Shared questions must stay together: add a second answer to some questions.
    pairs = pd.concat([pairs, pairs.iloc[::7].assign(A="다른 답이에요.")], ignore_index=True)
    splits = split_corpus(pairs, 0.1, 0.1)
    assert all(len(s) for s in splits.values())
    assert sum(len(s) for s in splits.values()) == len(pairs)
    questions = {name: set(s["Q"]) for name, s in splits.items()}
    assert not questions["train"] & questions["val"]
    assert not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]
    # Independent of row order.
    shuffled = split_corpus(pairs.sample(frac=1, random_state=1), 0.1, 0.1)
    for name in splits:
        assert sorted(map(tuple, shuffled[name].values.tolist())) == sorted(map(tuple, splits[name].values.tolist()))


def test_split_tiny_corpus_nonempty():
    pairs = pd.DataFrame({"Q": ["가", "나", "다"], "A": ["a", "b", "c"], "label": [0, 0, 0]})
    splits = split_corpus(pairs)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [1, 1, 1]


# ------------------------------------------------------------------ download

@pytest.fixture()
def server(tiny_corpus_csv, monkeypatch):
    """A local HTTP server: /good.csv (the tiny corpus), /garbage, anything else 404."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    bodies = {"/good.csv": tiny_corpus_csv.read_bytes(), "/garbage": b"<html>\x00\xff not a csv</html>"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_success(server, tmp_path, tiny_corpus_csv):
    out = tmp_path / "new" / "dir" / "ChatbotData.csv"
    assert download_corpus(f"{server}/good.csv", out, progress=False) == out
    assert out.read_bytes() == tiny_corpus_csv.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["ChatbotData.csv"]  # no temp file left


@pytest.mark.parametrize("path, match", [("/garbage", "not a usable corpus"), ("/missing", "HTTP 404")])
def test_download_failure_keeps_existing(server, tmp_path, path, match):
    out = _write(tmp_path, "Q,A,label\n기존,파일,0\n", "ChatbotData.csv")
    with pytest.raises(CorpusError, match=match):
        download_corpus(f"{server}{path}", out, progress=False)
    assert out.read_text(encoding="utf-8") == "Q,A,label\n기존,파일,0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ChatbotData.csv"]


def test_download_unreachable(tmp_path):
    with pytest.raises(CorpusError, match="could not download http://127.0.0.1:9/x"):
        download_corpus("http://127.0.0.1:9/x", tmp_path / "c.csv", timeout=5, progress=False)
