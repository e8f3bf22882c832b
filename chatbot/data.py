"""Corpus loading, checking, splitting and download.

The corpus is a CSV with columns ``Q`` (question), ``A`` (answer) and ``label`` (0 daily
talk, 1 breakup, 2 love), such as songys/Chatbot_data. ``load_corpus`` repairs what it
safely can, refuses what it cannot (with the line number), and counts everything it
changes or drops in ``Corpus.report``.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import http.client
import io
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl  # marks a download's .part file as in use (POSIX)
except ImportError:  # pragma: no cover - Windows: stale .part files are removed without the check
    fcntl = None

import pandas as pd

from .text import normalize

DEFAULT_URL = "https://raw.githubusercontent.com/songys/Chatbot_data/master/ChatbotData.csv"
DEFAULT_MAX_BYTES = 50_000_000  # the largest body `download` accepts; the real corpus is under 1 MB
DEFAULT_DEADLINE = 120.0  # seconds a whole download may take (slow servers included)
LABELS = ("0", "1", "2")
_SHOWN_LINES = 5  # how many line numbers a report lists per problem
_EXCERPT = 60  # characters of file or server text an error message may quote


class CorpusError(ValueError):
    """The corpus file is missing or cannot be used as it is."""


@dataclass
class Corpus:
    pairs: pd.DataFrame  # columns Q, A (normalised str), label (int 0/1/2); index 0..n-1
    report: dict = field(default_factory=dict)  # counts of what was read, repaired, dropped


def _excerpt(text: str, limit: int = _EXCERPT) -> str:
    """``text`` as a message may quote it: control and other non-printable characters escaped (no
    terminal escape sequence gets through), cut at ``limit`` characters."""
    shown = repr(text[:limit])[1:-1]
    return shown + ("..." if len(text) > limit else "")


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            if number == len(lines) and e.end == len(line) and e.reason == "unexpected end of data":
                raise CorpusError(f"{path}: the file ends in the middle of a UTF-8 character (line {number}): "
                                  "it was cut short (an interrupted download or copy?); fetch or copy it again"
                                  ) from None
            raise CorpusError(
                f"{path}: line {number} is not valid UTF-8 (byte {line[e.start]:#04x} at column "
                f"{e.start + 1}); re-save the file as UTF-8 (e.g. `iconv -f cp949 -t utf-8`)"
            ) from None
    raise CorpusError(f"{path}: not valid UTF-8")  # a sequence split across lines; unreachable in practice


def _read_rows(text: str, path: Path) -> tuple[list[str], list[list[str]], list[int], int]:
    """Header, data rows, each row's first line number (1-based) and the blank-line count."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise CorpusError(f"{path}: the file is empty (expected a header Q,A,label)") from None
    except csv.Error as e:
        raise CorpusError(f"{path}: line 1: malformed CSV header: {e}") from None
    header = [h.strip() for h in header]
    rows, lines, blank = [], [], 0
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise CorpusError(f"{path}: line {start}: malformed CSV: {e}") from None
        if not row:
            blank += 1
        elif len(row) != len(header):
            raise CorpusError(
                f"{path}: line {start}: expected {len(header)} fields ({_excerpt(','.join(header))}), found "
                f"{len(row)}; quote fields that contain commas, e.g. \"a, b\""
            )
        else:
            rows.append(row)
            lines.append(start)
        start = reader.line_num + 1
    return header, rows, lines, blank


def load_corpus(path: str | Path, *, verbose: bool = True) -> Corpus:
    """Read and check a Q,A,label CSV.

    Refused (``CorpusError``, with the line number where there is one): a missing file,
    bytes that are not UTF-8, rows with the wrong number of fields, a missing Q or A
    column, a corpus with no usable row. Repaired and counted in ``report``: a UTF-8 BOM
    (``bom``), a missing label column (``no_label_column``, label 0), labels with stray
    whitespace (``label_repaired``), labels other than 0/1/2 (``bad_label``, set to 0),
    cells changed by ``normalize`` (``normalized_cells``). Dropped and counted: blank
    lines (``blank_lines``), rows with an empty Q or A after normalising (``empty``),
    repeated (Q, A) pairs (``duplicates``). Kept but counted: rows repeating an earlier
    question with another answer (``duplicate_questions``). ``*_lines`` list the first
    few CSV line numbers of a problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus not found: {path} (run `python -m chatbot download` to fetch "
                          f"the public corpus, or set data.path / $CHATBOT_DATA)")
    raw = path.read_bytes()
    report: dict = {"path": str(path), "bom": 0}
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        report["bom"] = 1
    header, rows, lines, blank = _read_rows(_decode(raw, path), path)
    missing = [c for c in ("Q", "A") if c not in header]
    if missing:
        shown = repr(header)  # quoted and escaped; cut, since it may be any file's first line
        raise CorpusError(f"{path}: missing column(s) {missing}; found columns "
                          f"{shown[:2 * _EXCERPT] + '...' if len(shown) > 2 * _EXCERPT else shown}; "
                          f"expected a header Q,A,label")
    df = pd.DataFrame(rows, columns=header, dtype=str)
    df["line"] = lines
    report.update(rows_read=len(df), blank_lines=blank, no_label_column=int("label" not in header))
    if "label" not in header:
        df["label"] = "0"
    df = df[["Q", "A", "label", "line"]]

    q, a = df["Q"].map(normalize), df["A"].map(normalize)
    report["normalized_cells"] = int((q != df["Q"]).sum() + (a != df["A"]).sum())
    df = df.assign(Q=q, A=a)
    empty = (df["Q"] == "") | (df["A"] == "")
    report.update(empty=int(empty.sum()), empty_lines=df.loc[empty, "line"].head(_SHOWN_LINES).tolist())
    df = df[~empty]

    label = df["label"].str.strip()
    bad = ~label.isin(LABELS)
    report.update(
        label_repaired=int(((label != df["label"]) & ~bad).sum()),
        bad_label=int(bad.sum()),
        bad_label_lines=df.loc[bad, "line"].head(_SHOWN_LINES).tolist(),
    )
    df = df.assign(label=label.where(~bad, "0").astype(int))

    dup = df.duplicated(["Q", "A"])
    report.update(duplicates=int(dup.sum()), duplicate_lines=df.loc[dup, "line"].head(_SHOWN_LINES).tolist())
    df = df[~dup]
    report["duplicate_questions"] = int(df["Q"].duplicated().sum())
    report["pairs"] = len(df)
    report["labels"] = {int(k): int(v) for k, v in df["label"].value_counts().sort_index().items()}
    if df.empty:
        raise CorpusError(f"{path}: no usable (Q, A) pair ({report['rows_read']} rows read, "
                          f"{report['empty']} with an empty Q or A)")
    pairs = df[["Q", "A", "label"]].reset_index(drop=True)
    if verbose:
        print(format_report(report), file=sys.stderr)
    return Corpus(pairs=pairs, report=report)


def format_report(report: dict) -> str:
    """A short English summary of a ``load_corpus`` report."""
    parts = [f"corpus {report['path']}: {report['pairs']} pairs from {report['rows_read']} rows"]
    notes = [
        ("bom", "UTF-8 BOM stripped"),
        ("no_label_column", "no label column (all labels 0)"),
        ("blank_lines", "blank lines skipped"),
        ("normalized_cells", "cells changed by normalisation"),
        ("empty", "rows dropped for an empty Q or A (lines {empty_lines})"),
        ("label_repaired", "labels with stray whitespace repaired"),
        ("bad_label", "labels not in 0/1/2 set to 0 (lines {bad_label_lines})"),
        ("duplicates", "duplicate (Q, A) pairs dropped (lines {duplicate_lines})"),
        ("duplicate_questions", "repeated questions with another answer kept"),
    ]
    for key, text in notes:
        if report.get(key):
            count = "" if key in ("bom", "no_label_column") else f"{report[key]} "
            parts.append("  " + count + text.format(**report))
    parts.append(f"  labels: {report['labels']}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- split

def _bucket(question: str) -> float:
    """A stable position in [0, 1) for a question, independent of order, seed and versions."""
    digest = hashlib.sha1(normalize(question).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_corpus(pairs: pd.DataFrame, val_fraction: float = 0.05,
                 test_fraction: float = 0.05) -> dict[str, pd.DataFrame]:
    """Split into ``train``/``val``/``test`` by unique (normalised) question.

    All pairs sharing a question land in the same split, so no test question is seen in
    training. A question's split depends only on its text (sha1 bucket: test below
    ``test_fraction``, val below ``test_fraction + val_fraction``). With at least 3 unique
    questions every split is non-empty: an empty one takes the lowest-bucket question of
    the largest other split. Row order within each split is kept; indexes are reset.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and a sum < 1, got {val_fraction}, {test_fraction}")
    keys = pairs["Q"].map(normalize)
    buckets = {q: _bucket(q) for q in keys.unique()}
    members: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for q in sorted(buckets, key=lambda q: (buckets[q], q)):
        b = buckets[q]
        members["test" if b < test_fraction else "val" if b < test_fraction + val_fraction else "train"].append(q)
    if len(buckets) >= 3:
        for name in ("test", "val", "train"):
            if not members[name]:
                donor = max((n for n in members if n != name), key=lambda n: len(members[n]))
                members[name].append(members[donor].pop(0))  # lists are in bucket order
    where = {q: name for name, qs in members.items() for q in qs}
    split_of = keys.map(where)
    return {name: pairs[split_of == name].reset_index(drop=True) for name in ("train", "val", "test")}


# --------------------------------------------------------------------------- download

def download_corpus(url: str = DEFAULT_URL, out: str | Path = "data/ChatbotData.csv", *,
                    timeout: float = 60, progress: bool = True, max_bytes: int = DEFAULT_MAX_BYTES,
                    deadline: float = DEFAULT_DEADLINE) -> Path:
    """Fetch the corpus to ``out``, atomically and within limits.

    The body is streamed in 64 KiB pieces into a ``.part`` file next to ``out``, checked,
    then moved over ``out`` with ``os.replace``. Refused with ``CorpusError``, leaving any
    existing ``out`` untouched: a URL that is not http(s) (after redirects too); a body
    over ``max_bytes``; a download not finished ``deadline`` seconds after it started
    (``timeout`` bounds each wait for the server); a body shorter than its Content-Length;
    a file ``load_corpus`` refuses; columns other than those of the current ``out``.
    Text from the server is quoted only as a short escaped excerpt. ``.part`` files that
    a killed run left beside ``out`` are removed first.
    """
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as e:  # e.g. an unclosed [IPv6 address
        raise CorpusError(f"will not download {_excerpt(url)}: not a valid URL ({e})") from None
    if scheme not in ("http", "https"):
        raise CorpusError(f"will not download {_excerpt(url)}: only http:// and https:// URLs are allowed")
    if max_bytes <= 0 or not deadline > 0:
        raise ValueError(f"need max_bytes > 0 and deadline > 0, got {max_bytes}, {deadline}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(out)
    kept = f"; {out} left unchanged" if out.exists() else ""
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:  # held open (and locked) until the move: the file is in use
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            _fetch(url, f, timeout=timeout, max_bytes=max_bytes, deadline=deadline,
                   progress=progress, name=out.name, kept=kept)
            f.flush()
            os.fsync(f.fileno())
            try:
                load_corpus(tmp, verbose=False)
            except CorpusError as e:
                raise CorpusError(f"the file downloaded from {url} is not a usable corpus ({e}){kept}") from None
            _check_columns(tmp, out, url)
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _remove_stale_parts(out: Path) -> None:
    """Delete the ``.part`` files of downloads to ``out`` that were killed (no process holds their lock)."""
    for part in out.parent.glob(f".{glob.escape(out.name)}.*.part"):
        try:
            with open(part, "rb") as f:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a running download's
                part.unlink()
        except OSError:
            continue


def _columns(path: Path) -> list[str] | None:
    """The header of a CSV file, or None if it has none that can be read."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [h.strip() for h in next(csv.reader(f))]
    except (OSError, UnicodeDecodeError, csv.Error, StopIteration):
        return None


def _check_columns(new: Path, out: Path, url: str) -> None:
    """Refuse a download whose columns differ from those of the corpus it would replace."""
    current = _columns(out) if out.is_file() else None
    if current is None or not {"Q", "A"} <= set(current):
        return  # nothing usable to compare with
    columns = _columns(new)
    if columns != current:
        shown = repr(columns)
        raise CorpusError(f"the file downloaded from {url} has columns {shown[:2 * _EXCERPT]}"
                          f"{'...' if len(shown) > 2 * _EXCERPT else ''}, the current {out} has {current}; "
                          f"{out} left unchanged (move it away to accept the new layout)")


class _Deadline:
    """Shuts a download's sockets down when ``seconds`` have passed, whatever call is waiting on them
    (connecting, reading the headers or the body), so a server that drips bytes cannot hold it forever."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv on this socket
    except OSError:
        pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib for http(s) only (a redirect to file:, ftp: or data: fails), each socket given to ``deadline``."""

    def tracked(connection_class):
        class Tracked(connection_class):
            def connect(self):
                super().connect()
                deadline.track(self.sock)
        return Tracked

    class Track:
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(tracked(http_class), req, **kwargs)

    class HTTP(Track, urllib.request.HTTPHandler):
        pass

    class HTTPS(Track, urllib.request.HTTPSHandler):
        pass

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), HTTP(), HTTPS(), urllib.request.UnknownHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _fetch(url: str, f: BinaryIO, *, timeout: float, max_bytes: int, deadline: float, progress: bool,
           name: str, kept: str) -> None:
    """Stream the body of ``url`` into ``f``: at most ``max_bytes``, within ``deadline`` seconds, and all
    of its Content-Length."""
    end = time.monotonic() + deadline
    too_slow = CorpusError(f"could not download {url}: not finished within the {deadline:g} s deadline "
                           f"(--deadline){kept}")
    with _Deadline(deadline) as watch:
        try:
            with _opener(watch).open(url, timeout=min(timeout, deadline)) as response:
                total = response.length  # None: no (valid) Content-Length, or a chunked body
                if total is not None and total > max_bytes:
                    raise CorpusError(f"{url} announces {total:,} bytes, more than {max_bytes:,} bytes "
                                      f"(--max-bytes){kept}")
                got = _copy(response, f, total, max_bytes, end, progress and total is not None, name)
        except CorpusError:
            raise
        except urllib.error.HTTPError as e:
            raise CorpusError(f"could not download {url}: HTTP {e.code} {_excerpt(str(e.reason))}{kept}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            if watch.expired:
                raise too_slow from None
            reason = e.reason if isinstance(e, urllib.error.URLError) else f"{type(e).__name__}: {e}"
            raise CorpusError(f"could not download {url}: {_excerpt(str(reason))}{kept}") from None
    if watch.expired or time.monotonic() > end:  # the body may look complete when the deadline cut it
        raise too_slow
    if got > max_bytes:
        raise CorpusError(f"{url} sent more than {max_bytes:,} bytes (--max-bytes){kept}")
    if total is not None and got != total:
        raise CorpusError(f"the download from {url} was truncated: {got:,} of the {total:,} bytes its "
                          f"Content-Length announced{kept}")


def _copy(response, f: BinaryIO, total: int | None, max_bytes: int, end: float, progress: bool, name: str) -> int:
    """Bytes copied; stops once past ``max_bytes`` or the ``end`` of the deadline (``time.monotonic``)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=name, file=sys.stderr)
    got = 0
    try:
        while chunk := response.read1(1 << 16):  # whatever has arrived, up to 64 KiB: never more in memory
            got += len(chunk)
            if got > max_bytes or time.monotonic() > end:
                break
            f.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return got
