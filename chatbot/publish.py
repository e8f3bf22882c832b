"""Publish the demo as a Hugging Face Space: ``python -m chatbot publish --space USER/NAME``.

The Space gets exactly what ``app.py`` needs to serve: ``app.py``, the ``chatbot`` package, every
shipped checkpoint folder (``checkpoints/*/`` with a ``model.safetensors``, as ``app.py`` loads
them), ``requirements.txt``, ``README.md`` (whose front matter is the Space's configuration),
``docs/chrf_by_length.png`` (the About tab shows it) and, when a checkpoint segments morphemes
(``tokenizer.morphemes: true``, konlpy needs Java), a ``packages.txt`` with a Java runtime. Never the
corpus, training runs, tests or git history.

The Hub refuses binary files pushed as plain git blobs, so the upload goes through huggingface_hub's
commit API (the way ``HfApi.upload_folder`` works), which stores binaries as the Hub requires (Xet, or
LFS without hf_xet): one commit that adds these files and deletes whatever else the Space holds
(``.gitattributes`` aside). No git, no git-lfs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
JAVA_PACKAGE = "default-jre-headless"  # konlpy's analysers run on the JVM
TOP_FILES = ("app.py", "requirements.txt", "README.md")
EXTRA_FILES = ("docs/chrf_by_length.png",)  # shipped where they exist
KEPT_ON_SPACE = (".gitattributes",)  # the Hub's own file: never deleted by a publish
NEEDED_KEYS = {"sdk": "gradio", "app_file": "app.py"}
COMMIT_MESSAGE = "Publish the demo (python -m chatbot publish)"


class PublishError(Exception):
    """Why nothing was published, in one line."""


@dataclass(frozen=True)
class SpaceFile:
    """One file of the Space: where it goes, and its bytes on disk (``local``) or made here (``content``)."""

    path: str  # path in the Space, with "/"
    local: Path | None = None
    content: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.local.stat().st_size


def checkpoint_dirs(root: Path = ROOT) -> list[Path]:
    """The shipped checkpoints: every ``checkpoints/*/`` with a model.safetensors (what app.py loads)."""
    folder = root / "checkpoints"
    return sorted(p for p in folder.glob("*") if (p / "model.safetensors").is_file()) if folder.is_dir() else []


def needs_java(checkpoint: Path) -> bool:
    """Whether the checkpoint's tokenizer segments morphemes first (konlpy, which needs a JVM)."""
    try:
        raw = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        return bool(raw["config"]["tokenizer"].get("morphemes", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PublishError(f"{checkpoint / 'config.json'} is not a readable checkpoint config ({e})") from None


def _files_under(folder: Path, root: Path) -> list[SpaceFile]:
    """Every file under ``folder`` but caches and hidden files, by path in the Space."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part == "__pycache__" or part.startswith(".") for part in rel.parts) \
                and p.suffix != ".pyc":
            out.append(SpaceFile(rel.as_posix(), local=p))
    return out


def _packages(root: Path) -> bytes:
    """packages.txt: the repository's own lines, if any, plus a Java runtime."""
    own = root / "packages.txt"
    lines = own.read_text(encoding="utf-8").split() if own.is_file() else []
    return "\n".join(dict.fromkeys([*lines, JAVA_PACKAGE])).encode() + b"\n"


def space_files(root: Path = ROOT) -> list[SpaceFile]:
    """What the Space needs, in upload order; PublishError when a required file is missing."""
    missing = [name for name in (*TOP_FILES, "chatbot/__init__.py") if not (root / name).is_file()]
    checkpoints = checkpoint_dirs(root)
    if missing or not checkpoints:
        what = ", ".join(missing + ([] if checkpoints else ["checkpoints/*/model.safetensors"]))
        raise PublishError(f"{root} lacks what the Space needs: {what}")
    files = [SpaceFile(name, local=root / name) for name in TOP_FILES]
    files += _files_under(root / "chatbot", root)
    for ckpt in checkpoints:
        files += _files_under(ckpt, root)
    files += [SpaceFile(name, local=root / name) for name in EXTRA_FILES if (root / name).is_file()]
    if any(needs_java(c) for c in checkpoints):
        files.append(SpaceFile("packages.txt", content=_packages(root)))
    return files


def front_matter(readme: Path) -> dict[str, Any]:
    """The Space configuration at the top of README.md, checked for what the demo relies on."""
    text = readme.read_text(encoding="utf-8")
    head, sep, _ = text.removeprefix("---\n").partition("\n---\n")
    meta = yaml.safe_load(head) if text.startswith("---\n") and sep else None
    if not isinstance(meta, dict):
        raise PublishError(f"{readme} has no front matter (--- ... ---): the Space would not know how to run")
    wrong = [f"{k}: {meta.get(k)!r} (needs {v!r})" for k, v in NEEDED_KEYS.items() if meta.get(k) != v]
    if not meta.get("sdk_version"):
        wrong.append("no sdk_version")
    if wrong:
        raise PublishError(f"{readme} front matter: {'; '.join(wrong)}")
    return meta


def human_size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def describe(space: str, files: list[SpaceFile], meta: dict[str, Any], private: bool) -> str:
    """The dry run's report: the Space's front matter, then every file with its size."""
    visibility = "private" if private else "the Hub's default (public)"
    lines = [f"Space {space}, visibility {visibility}; front matter of README.md:"]
    lines += [f"  {line}" for line in yaml.safe_dump(meta, allow_unicode=True, sort_keys=False).splitlines()]
    total = sum(f.size for f in files)
    lines.append(f"{len(files)} files, {human_size(total)}:")
    lines += [f"  {human_size(f.size):>9}  {f.path}" for f in files]
    return "\n".join(lines)


def publish(space: str, files: list[SpaceFile], private: bool = False, token: str | None = None) -> str:
    """Create the Space (Gradio SDK) if it is missing and commit ``files`` to it in one commit, deleting
    every other file it holds but .gitattributes; returns the commit's URL. ``token``: default, the
    usual huggingface_hub login (HF_TOKEN or ``hf auth login``); the Hub is ``HF_ENDPOINT`` if set."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    check_space_id(space)
    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        api.create_repo(space, repo_type="space", space_sdk="gradio", private=True if private else None,
                        exist_ok=True)  # an existing Space keeps its visibility
        ours = {f.path for f in files}
        stale = [p for p in api.list_repo_files(space, repo_type="space") if p not in ours and p not in KEPT_ON_SPACE]
        operations = [CommitOperationAdd(f.path, f.content if f.content is not None else str(f.local)) for f in files]
        operations += [CommitOperationDelete(p) for p in stale]
        return api.create_commit(space, operations, commit_message=COMMIT_MESSAGE, repo_type="space").commit_url
    except Exception as e:  # refused (HTTP errors), unreachable (connection errors), malformed answers
        raise PublishError(f"the Hub at {api.endpoint} refused or failed the upload to Space {space}: "
                           f"{one_line(e)}") from e


def check_space_id(space: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", space or ""):
        raise PublishError(f"--space must be USER/NAME (letters, digits, -, _, .), got {space!r}")


def one_line(error: BaseException) -> str:
    """An exception as one line: an HTTP error's status and the server's message, else its first line;
    then, for a wrapped error ("Error while uploading X"), the innermost cause the same way."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    line, cause = _line(error), _line(root)
    return line if line.startswith("HTTP ") or cause == line else f"{line} ({cause})"


def _line(error: BaseException) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    text = (getattr(error, "server_message", None) or str(error)).strip()
    first = text.splitlines()[0] if text else ""
    head = f"HTTP {status}" if status else type(error).__name__
    return f"{head}: {first}" if first else head
