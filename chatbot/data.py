"""Corpus loading, checking, splitting and download.

The corpus is a CSV with columns ``Q`` (question), ``A`` (answer) and ``label`` (0 daily
talk, 1 breakup, 2 love), such as songys/Chatbot_data. ``load_corpus`` repairs what it
safely can, refuses what it cannot (with the line number), and counts everything it
changes or drops in ``Corpus.report``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .text import normalize

DEFAULT_URL = "https://raw.githubusercontent.com/songys/Chatbot_data/master/ChatbotData.csv"
LABELS = ("0", "1", "2")
_SHOWN_LINES = 5  # how many line numbers a report lists per problem


class CorpusError(ValueError):
    """The corpus file is missing or cannot be used as it is."""


@dataclass
class Corpus:
    pairs: pd.DataFrame  # columns Q, A (normalised str), label (int 0/1/2); index 0..n-1
    report: dict = field(default_factory=dict)  # counts of what was read, repaired, dropped


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
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
                f"{path}: line {start}: expected {len(header)} fields ({','.join(header)}), found "
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
        raise CorpusError(f"{path}: missing column(s) {missing}; found columns {header}; "
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
                    timeout: float = 60, progress: bool = True) -> Path:
    """Fetch the corpus to ``out``, atomically.

    The body is streamed into a temporary file next to ``out``, checked with
    ``load_corpus``, then moved over ``out`` with ``os.replace``: a failed or garbage
    download raises ``CorpusError`` and leaves any existing ``out`` untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    _copy(response, f, total, progress and total is not None, out.name)
            except urllib.error.HTTPError as e:
                raise CorpusError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                raise CorpusError(f"could not download {url}: {e.reason}") from None
            except (OSError, ValueError) as e:  # timeouts, resets, bad URLs
                raise CorpusError(f"could not download {url}: {type(e).__name__}: {e}") from None
        try:
            load_corpus(tmp, verbose=False)
        except CorpusError as e:
            kept = f"; {out} left unchanged" if out.exists() else ""
            raise CorpusError(f"the file downloaded from {url} is not a usable corpus ({e}){kept}") from None
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _copy(response, f, total: int | None, progress: bool, name: str) -> None:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=name, file=sys.stderr)
    try:
        while chunk := response.read(1 << 16):
            f.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
