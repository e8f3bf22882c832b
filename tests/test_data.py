from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from typing import Callable

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


# ------------------------------------------------------------------ download under attack (reliability round two)

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture()
def routes(monkeypatch):
    """A local server whose answers the test writes: ``routes[path] = write(handler)`` writes the raw response
    (status line, headers, body) to ``handler.wfile``. Yields (base URL, routes)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    table: dict[str, Route] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            write = table.get(self.path)
            if write is None:
                self.send_error(404)
                return
            try:
                write(self)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up: what some tests want
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", table
    httpd.shutdown()
    httpd.server_close()


def body_of(data: bytes, length: int | None = None, *, status: int = 200, reason: str | None = None) -> Route:
    """An answer with ``data`` as its body; Content-Length ``length`` (default: the true one; -1: none)."""
    def write(h):
        h.send_response(status, reason)
        if length != -1:
            h.send_header("Content-Length", str(len(data) if length is None else length))
        h.end_headers()
        h.wfile.write(data)
    return write


CURRENT = "Q,A,label\n기존,파일,0\n"


def existing(tmp_path: Path) -> Path:
    return _write(tmp_path, CURRENT, "ChatbotData.csv")


def untouched(out: Path) -> None:
    assert out.read_text(encoding="utf-8") == CURRENT
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no .part left behind


def test_download_shorter_than_its_content_length_is_refused(routes, tmp_path, tiny_corpus_csv):
    """The body stops at a row boundary half-way: a valid CSV, but not what the server announced."""
    base, table = routes
    full = tiny_corpus_csv.read_bytes()
    half = full[: full.index(b"\n", len(full) // 2) + 1]
    table["/short.csv"] = body_of(half, len(full))
    out = existing(tmp_path)
    with pytest.raises(CorpusError, match=rf"truncated.*{len(half):,} of the {len(full):,} bytes.*left unchanged"):
        download_corpus(f"{base}/short.csv", out, progress=False)
    untouched(out)


def test_download_with_a_chunked_body_cut_short_is_refused(routes, tmp_path, tiny_corpus_csv):
    base, table = routes
    data = tiny_corpus_csv.read_bytes()[:2000]

    def chunked_then_gone(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))  # no terminating 0-chunk: the connection just ends

    table["/cut.csv"] = chunked_then_gone
    out = existing(tmp_path)
    with pytest.raises(CorpusError, match="could not download"):
        download_corpus(f"{base}/cut.csv", out, progress=False)
    untouched(out)


def test_download_with_other_columns_than_the_current_file_is_refused(routes, tmp_path):
    base, table = routes
    table["/two.csv"] = body_of("Q,A\n안녕,반가워요\n".encode())  # a usable corpus, but the label column is gone
    out = existing(tmp_path)
    with pytest.raises(CorpusError, match=r"columns \['Q', 'A'\].*\['Q', 'A', 'label'\]"):
        download_corpus(f"{base}/two.csv", out, progress=False)
    untouched(out)
    fresh = tmp_path / "fresh" / "c.csv"  # with no current file there is nothing to compare with
    assert download_corpus(f"{base}/two.csv", fresh, progress=False) == fresh


def big_csv(total: int) -> Route:
    """A valid corpus of ``total`` bytes sent in 64 KiB pieces without a Content-Length (the same block again
    and again: the server allocates nothing per piece)."""
    block = "".join(f"질문 {i},대답 {i},0\n" for i in range(4000)).encode()[: 1 << 16]
    block = block[: block.rindex(b"\n") + 1]

    def write(h):
        h.send_response(200)
        h.end_headers()
        h.wfile.write(b"Q,A,label\n")
        for _ in range(total // len(block)):
            h.wfile.write(block)
    return write


def test_download_over_max_bytes_is_refused_in_bounded_memory(routes, tmp_path):
    import tracemalloc

    base, table = routes
    table["/big.csv"] = big_csv(12_000_000)
    table["/announced.csv"] = body_of(b"Q,A,label\n" + b"x" * 10, 3_000_000_000)  # says 3 GB: refused at once
    out = existing(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(CorpusError, match=r"more than 4,000,000 bytes \(--max-bytes\)"):
            download_corpus(f"{base}/big.csv", out, progress=False, max_bytes=4_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"peak {peak:,} bytes: the body must be streamed, not held"
    untouched(out)
    with pytest.raises(CorpusError, match=r"3,000,000,000 bytes.*--max-bytes"):
        download_corpus(f"{base}/announced.csv", out, progress=False, max_bytes=4_000_000)
    untouched(out)


def drip(head: bytes, body: bytes, every: float) -> Route:
    """Send ``head`` at once, then ``body`` one byte every ``every`` seconds."""
    def write(h):
        h.wfile.write(head)
        h.wfile.flush()
        for byte in body:
            time.sleep(every)
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
    return write


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_dripping_server_is_cut_off_at_the_deadline(routes, tmp_path, where):
    base, table = routes
    head = b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n"
    table["/drip"] = (drip(head, b"Q,A,label\n" * 100, 0.2) if where == "body"
                      else drip(b"HTTP/1.0 200 OK\r\n", b"X-Slow: " + b"a" * 200 + b"\r\n\r\n", 0.2))
    out = existing(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(CorpusError, match=r"not finished within the 1\.5 s deadline \(--deadline\)"):
        download_corpus(f"{base}/drip", out, progress=False, timeout=30, deadline=1.5)
    assert time.monotonic() - t0 < 5
    untouched(out)


def test_stale_part_files_from_a_killed_run_are_removed(routes, tmp_path, tiny_corpus_csv):
    import fcntl

    base, table = routes
    table["/good.csv"] = body_of(tiny_corpus_csv.read_bytes())
    out = existing(tmp_path)
    stale = _write(tmp_path, "Q,A,label\n반쯤,받", f".{out.name}.k1ll3d.part")  # what kill -9 leaves
    running = _write(tmp_path, "Q,A,label\n", f".{out.name}.runn1ng.part")  # another download, still going
    other = _write(tmp_path, "x", ".other.csv.abc.part")  # not ours
    with open(running, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        download_corpus(f"{base}/good.csv", out, progress=False)
    assert out.read_bytes() == tiny_corpus_csv.read_bytes()
    assert not stale.exists() and running.exists() and other.exists()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.csv", "/etc/passwd", "data:,Q%2CA"])
def test_only_http_urls_are_fetched(tmp_path, url):
    out = existing(tmp_path)
    with pytest.raises(CorpusError, match="only http:// and https:// URLs") as e:
        download_corpus(url, out, progress=False)
    assert "root:" not in str(e.value)
    untouched(out)


def test_a_redirect_to_a_local_file_is_refused(routes, tmp_path):
    base, table = routes

    def to_file(h):
        h.send_response(302)
        h.send_header("Location", "file:///etc/passwd")
        h.send_header("Content-Length", "0")
        h.end_headers()

    table["/redirect"] = to_file
    out = existing(tmp_path)
    with pytest.raises(CorpusError) as e:
        download_corpus(f"{base}/redirect", out, progress=False)
    assert "root:" not in str(e.value)
    untouched(out)


HOSTILE = "\x1b]0;pwned\x07\x1b[2J" + "secret-" * 200


@pytest.mark.parametrize("answer", ["body", "reason"])
def test_fetched_text_is_quoted_only_as_a_short_escaped_excerpt(routes, tmp_path, answer):
    base, table = routes
    table["/hostile"] = (body_of(f"{HOSTILE},{HOSTILE}\nx,y\n".encode()) if answer == "body"
                         else body_of(b"", status=500, reason=HOSTILE))
    out = existing(tmp_path)
    with pytest.raises(CorpusError) as e:
        download_corpus(f"{base}/hostile", out, progress=False)
    msg = str(e.value)
    assert "\x1b" not in msg and "\x07" not in msg and "\\x1b" in msg  # shown, escaped
    assert msg.count("secret-") < 20, msg
    untouched(out)


def test_a_file_cut_mid_character_is_called_truncated(tmp_path):
    raw = "Q,A,label\n안녕,반가워요,0\n".encode()
    with pytest.raises(CorpusError, match="ends in the middle of a UTF-8 character.*cut short") as e:
        load_corpus(_write(tmp_path, raw[:-4]))  # cut after the first two of the three bytes of the last "요"
    assert "iconv" not in str(e.value) and "cp949" not in str(e.value)


def test_a_download_cut_mid_character_without_a_length_is_called_truncated(routes, tmp_path):
    base, table = routes
    table["/cut"] = body_of("Q,A,label\n안녕,반가워요,0\n배고파,밥".encode()[:-1], -1)  # close-delimited
    out = existing(tmp_path)
    with pytest.raises(CorpusError, match="ends in the middle of a UTF-8 character") as e:
        download_corpus(f"{base}/cut", out, progress=False)
    assert "iconv" not in str(e.value)
    untouched(out)
