"""``python -m chatbot publish``: what a Space gets (dry run), and a real upload through huggingface_hub
against a stand-in for the Hub on 127.0.0.1 (``HF_ENDPOINT``).

The stand-in answers the requests huggingface_hub's commit API makes (read in its source:
``HfApi.create_repo``, ``list_repo_files``, ``create_commit`` -> ``_validate_yaml``, ``_fetch_upload_modes``,
``post_lfs_batch_info`` / ``lfs_upload`` and ``_send_commit``) the way the Hub does: a file whose first
bytes hold a NUL is binary and must come as LFS, never as a git blob. hf_xet is turned off
(``HF_HUB_DISABLE_XET``) so binaries take the LFS protocol, which a stand-in can speak; on the real Hub
with hf_xet installed they go through Xet instead (not exercised here).
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chatbot import publish
from conftest import ROOT

SPACE = "someone/korean-chatbot"
TOKEN = "hf_test_write"
READ_ONLY = "hf_test_read"  # accepted for reading, refused for writing
NEVER = ("runs/", "data/", "tests/", "artifacts/", ".git/", "configs/", "benchmarks/")


class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub endpoints a Space upload uses, just enough of each; every request is logged."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.spaces: dict[str, dict[str, bytes]] = {}  # id -> path -> content
        self.created: list[dict] = []  # create_repo payloads
        self.blobs: dict[str, bytes] = {}  # LFS uploads by sha256
        self.commits: list[list[dict]] = []  # each commit's NDJSON lines
        self.log: list[tuple[str, str]] = []  # (method, endpoint name or unknown path)


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                out += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, data=None) -> None:
        payload = json.dumps(data if data is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def route(self, method: str) -> None:
        path = self.path.split("?")[0]
        hub = self.server
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = self.body()
        routes = [
            (r"/api/repos/create", self.create),
            (r"/api/spaces/([^/]+/[^/]+)", self.info),
            (r"/api/spaces/([^/]+/[^/]+)/tree/main", self.tree),
            (r"/api/validate-yaml", self.validate_yaml),
            (r"/api/spaces/([^/]+/[^/]+)/preupload/main", self.preupload),
            (r"/spaces/([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            (r"/lfs/([0-9a-f]{64})", self.lfs_put),
            (r"/lfs/verify", self.lfs_verify),
            (r"/api/spaces/([^/]+/[^/]+)/commit/main", self.commit),
        ]
        for pattern, handler in routes:
            m = re.fullmatch(pattern, path)
            if m:
                hub.log.append((method, handler.__name__))
                if handler == self.lfs_put:  # the Hub hands out a signed storage URL: no token goes there
                    return handler(method, body, *m.groups())
                if token not in (TOKEN, READ_ONLY):
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                if token == READ_ONLY and method != "GET":
                    return self.reply(403, {"error": f"You don't have the rights to write to {SPACE}"})
                return handler(method, body, *m.groups())
        hub.log.append((method, path))
        self.reply(404, {"error": f"no route {method} {path}"})

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    # ------------------------------------------------------------ the endpoints
    def create(self, method, body):
        payload = json.loads(body)
        space = f"{payload['organization']}/{payload['name']}"
        self.server.created.append(payload)
        if space in self.server.spaces:
            return self.reply(409, {"error": "You already created this space repo", "url": f"/spaces/{space}"})
        self.server.spaces[space] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                     "README.md": b"---\nsdk: gradio\n---\n"}  # what the Hub starts a Space with
        self.reply(200, {"url": f"{self.server.url}/spaces/{space}", "name": space})

    def info(self, method, body, space):
        if space not in self.server.spaces:
            return self.reply(404, {"error": "Repository not found"})
        self.reply(200, {"id": space, "sha": "0" * 40, "siblings": []})

    def tree(self, method, body, space):
        files = self.server.spaces[space]
        self.reply(200, [{"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                         for p, c in sorted(files.items())])

    def validate_yaml(self, method, body):
        self.reply(200, {"errors": [], "warnings": []})

    def preupload(self, method, body, space):
        files = json.loads(body)["files"]
        modes = ["lfs" if b"\0" in base64.b64decode(f["sample"]) or f["size"] > 10_000_000 else "regular"
                 for f in files]
        self.reply(200, {"files": [{"path": f["path"], "uploadMode": m, "shouldIgnore": False, "oid": None}
                                   for f, m in zip(files, modes)]})

    def lfs_batch(self, method, body, space):
        objects = json.loads(body)["objects"]
        url = self.server.url
        self.reply(200, {"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"],
             "actions": {"upload": {"href": f"{url}/lfs/{o['oid']}"}, "verify": {"href": f"{url}/lfs/verify"}}}
            for o in objects]})

    def lfs_put(self, method, body, oid):
        assert hashlib.sha256(body).hexdigest() == oid
        self.server.blobs[oid] = body
        self.reply(200)

    def lfs_verify(self, method, body):
        o = json.loads(body)
        ok = o["oid"] in self.server.blobs and len(self.server.blobs[o["oid"]]) == o["size"]
        self.reply(200 if ok else 404)

    def commit(self, method, body, space):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        files = self.server.spaces[space]
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                content = base64.b64decode(value["content"])
                if b"\0" in content[:512]:
                    return self.reply(400, {"error": f"Your push was rejected because it contains binary files: "
                                                     f"{value['path']}. Please use LFS or Xet"})
                files[value["path"]] = content
            elif line["key"] == "lfsFile":
                files[value["path"]] = self.server.blobs[value["oid"]]
            elif line["key"] == "deletedFile":
                del files[value["path"]]
        self.server.commits.append(lines)
        self.reply(200, {"commitUrl": f"{self.server.url}/spaces/{space}/commit/{'1' * 40}",
                         "commitOid": "1" * 40, "pullRequestUrl": None})


@pytest.fixture
def hub():
    server = FakeHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def run_publish(*args: str, hub: FakeHub, token: str | None = TOKEN, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "no_proxy": "*", "NO_PROXY": "*", "http_proxy": "", "HTTP_PROXY": ""})
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "chatbot", "publish", "--space", SPACE, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def expected_files() -> dict[str, bytes]:
    """What the Space must hold: the serving files of this repository, read from disk."""
    names = ["app.py", "requirements.txt", "README.md", "docs/chrf_by_length.png"]
    names += [p.relative_to(ROOT).as_posix() for p in (ROOT / "chatbot").glob("*.py")]
    for ckpt in (ROOT / "checkpoints").iterdir():
        if (ckpt / "model.safetensors").is_file():
            names += [p.relative_to(ROOT).as_posix() for p in ckpt.iterdir() if p.is_file()]
    return {name: (ROOT / name).read_bytes() for name in names}


# ---------------------------------------------------------------- what a Space gets
def test_dry_run_lists_the_files_with_sizes_and_the_front_matter_and_sends_nothing(hub, tmp_path):
    p = run_publish("--dry-run", hub=hub, token=None, home=tmp_path)
    assert p.returncode == 0, p.stderr
    listed = {path: size for size, path in re.findall(r"^\s+(\d[\d.]* [kM]?B)\s+(\S+)$", p.stdout, re.M)}
    assert set(listed) == set(expected_files())
    assert listed["checkpoints/default/model.safetensors"] == publish.human_size(
        (ROOT / "checkpoints/default/model.safetensors").stat().st_size)
    assert not any(path.startswith(NEVER) or "__pycache__" in path for path in listed)
    assert "packages.txt" not in listed  # no shipped checkpoint segments morphemes
    for line in ("sdk: gradio", "sdk_version: 6.31.0", "app_file: app.py", "python_version: '3.11'"):
        assert f"  {line}\n" in p.stdout
    assert "nothing was sent" in p.stdout and hub.log == []  # no network, not even a token was needed


def test_the_file_list_adds_java_for_a_morpheme_checkpoint_and_leaves_out_everything_else(tmp_path):
    root = tmp_path / "repo"
    for name in ("app.py", "requirements.txt", "chatbot/__init__.py", "chatbot/demo.py",
                 "chatbot/__pycache__/demo.cpython-311.pyc", "runs/x/best/model.safetensors", "data/ChatbotData.csv",
                 "tests/test_x.py", "artifacts/a.png", ".git/config", "checkpoints/plain/model.safetensors",
                 "checkpoints/plain/.hidden", "checkpoints/notes/README.md", "packages.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "README.md").write_text("---\nsdk: gradio\nsdk_version: 6.31.0\napp_file: app.py\n---\n# hi\n")
    (root / "packages.txt").write_text("fonts-nanum\n")
    for name, morphemes in (("plain", False), ("morph", True)):
        (root / "checkpoints" / name).mkdir(exist_ok=True)
        (root / "checkpoints" / name / "model.safetensors").write_bytes(b"\0weights")
        (root / "checkpoints" / name / "config.json").write_text(
            json.dumps({"config": {"tokenizer": {"morphemes": morphemes}}}))
    files = {f.path: f for f in publish.space_files(root)}
    assert set(files) == {"app.py", "requirements.txt", "README.md", "chatbot/__init__.py", "chatbot/demo.py",
                          "checkpoints/morph/config.json", "checkpoints/morph/model.safetensors",
                          "checkpoints/plain/config.json", "checkpoints/plain/model.safetensors", "packages.txt"}
    assert files["packages.txt"].content == b"fonts-nanum\ndefault-jre-headless\n"  # the repository's, plus Java
    assert publish.front_matter(root / "README.md")["sdk_version"] == "6.31.0"
    (root / "README.md").write_text("# no front matter\n")
    with pytest.raises(publish.PublishError, match="no front matter"):
        publish.front_matter(root / "README.md")
    (root / "README.md").write_text("---\nsdk: docker\napp_file: app.py\n---\n")
    with pytest.raises(publish.PublishError, match="sdk: 'docker' .needs 'gradio'.; no sdk_version"):
        publish.front_matter(root / "README.md")


# ---------------------------------------------------------------- a real upload
def test_publish_creates_the_space_and_commits_exactly_its_files_binaries_by_lfs(hub, tmp_path):
    p = run_publish("--private", hub=hub, home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"published {len(expected_files())} files to Space {SPACE}" in p.stdout
    calls = [name for _, name in hub.log]
    assert [name for i, name in enumerate(calls) if name not in calls[:i]] == [
        "create", "tree", "validate_yaml", "preupload", "lfs_batch", "lfs_put", "lfs_verify", "commit"], calls
    assert calls.count("commit") == 1 and calls.count("lfs_put") == calls.count("lfs_verify") > 0
    (created,) = hub.created
    assert created == {"name": "korean-chatbot", "organization": "someone", "type": "space", "sdk": "gradio",
                       "visibility": "private"}
    (commit,) = hub.commits
    kinds = {line["value"]["path"]: line["key"] for line in commit[1:]}
    expected = expected_files()
    binary = {path for path, content in expected.items() if b"\0" in content[:512]}
    assert {"checkpoints/default/model.safetensors", "checkpoints/default/tokenizer.model",
            "docs/chrf_by_length.png"} <= binary
    assert {path for path, kind in kinds.items() if kind == "lfsFile"} == binary  # never a binary git blob
    assert hub.spaces[SPACE] == {**expected, ".gitattributes": hub.spaces[SPACE][".gitattributes"]}


def test_publishing_again_replaces_the_space_files_and_deletes_stale_ones(hub, tmp_path):
    assert run_publish(hub=hub, home=tmp_path).returncode == 0
    hub.spaces[SPACE]["tests/test_old.py"] = b"pushed by hand once"
    hub.spaces[SPACE]["app.py"] = b"an older app"
    p = run_publish(hub=hub, home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert hub.created[-1]["name"] == "korean-chatbot" and "visibility" not in hub.created[-1]  # 409: it exists
    deleted = [line["value"]["path"] for line in hub.commits[-1] if line["key"] == "deletedFile"]
    assert deleted == ["tests/test_old.py"]
    assert set(hub.spaces[SPACE]) == {*expected_files(), ".gitattributes"}
    assert hub.spaces[SPACE]["app.py"] == (ROOT / "app.py").read_bytes()


def test_a_missing_token_is_one_line_and_sends_nothing(hub, tmp_path):
    p = run_publish(hub=hub, token=None, home=tmp_path)
    assert p.returncode == 1 and hub.log == []
    assert p.stderr.strip().count("\n") == 0 and "no Hugging Face token" in p.stderr and "HF_TOKEN" in p.stderr


def test_a_refused_upload_is_one_line(hub, tmp_path):
    p = run_publish(hub=hub, token=READ_ONLY, home=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert "HTTP 403" in p.stderr and "rights to write" in p.stderr and SPACE in p.stderr
    assert SPACE not in hub.spaces  # nothing was created


def test_an_unreachable_hub_is_one_line(tmp_path):
    class Gone:
        url = "http://127.0.0.1:9"  # the discard port: nothing listens

    p = run_publish(hub=Gone(), home=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "refused or failed the upload" in p.stderr, p.stderr
