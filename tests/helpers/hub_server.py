"""A local stand-in for the Hugging Face hub, on 127.0.0.1: the part of its HTTP protocol that huggingface_hub's
`HfApi.model_info`, `snapshot_download` and `hf_hub_download` use, answered the way the hub answers.

- `GET /api/models/{repo}/revision/{rev}` (`?blobs=True` adds sizes, blob ids and LFS sha256s): the commit a branch,
  tag or sha points at, and the file list.
- `GET /api/models/{repo}/tree/{rev}?recursive=...`: the files of a commit (one page).
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: a small (git) file is served here with its ETag (the git blob sha1),
  X-Repo-Commit and Content-Length; an LFS file (weights) is a 302 to a CDN address on another host name
  (`localhost` instead of `127.0.0.1`, so huggingface_hub treats it as off-hub and drops the Authorization header,
  as with the real CDN), with X-Linked-Etag (its sha256), X-Linked-Size and X-Repo-Commit.
- `GET /cdn/{sha256}`: the LFS content, with `Range: bytes=N-` answered 206.
- Errors as the hub gives them: an unknown or private repository without a valid token is 401 with
  `X-Error-Code: RepoNotFound` (404 when authenticated), an unknown revision 404 `RevisionNotFound`, an unknown file
  404 `EntryNotFound`, a token that is not valid 401 `Invalid credentials in Authorization header`.

Uploads, for `HfApi.create_repo`, `create_branch` and `create_commit` / `upload_folder` through git LFS (the path
huggingface_hub takes with HF_HUB_DISABLE_XET=1):
- `POST /api/repos/create` (409 when it exists), `POST /api/models/{repo}/branch/{branch}`;
- `POST /api/models/{repo}/preupload/{rev}`: each file's upload mode (weights by LFS) and its current oid, so that
  huggingface_hub skips unchanged files and makes no commit when nothing changed;
- `POST /{repo}.git/info/lfs/objects/batch`, `PUT /lfs-upload/{oid}` (the content, checked against its sha256;
  `cut_upload` = N drops the connection half-way through the next N), `POST /lfs-verify/{oid}`;
- `POST /api/models/{repo}/commit/{rev}`: the NDJSON commit (header, file, lfsFile lines);
- `POST /api/validate-yaml`: a card's front matter (accepted when there is one).
Writes need the token given as `token` (401 without one or with an unknown one); `readonly_token` may read but gets
403 on every write, as a user writing to someone else's repository does.

The server records every request (method, path, Range, Authorization) and the bytes it served per file, and can
cut a download short (close the connection after N bytes), hold one until released, or corrupt one, to test
resumes, kills and hash checks.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


@dataclass
class Repo:
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None


class FakeHub:
    """`with FakeHub(token=...) as hub:` serves until the block ends; `hub.url` is the HF_ENDPOINT to use."""

    def __init__(self, token: str | None = None, readonly_token: str | None = None):
        self.token = token
        self.readonly_token = readonly_token
        self.staged: dict[str, bytes] = {}  # sha256 -> content uploaded by LFS, not yet committed
        self.cut_upload = 0  # the next N LFS PUTs close the connection after half of their body
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (path, content), what the CDN serves
        self.seen: list[Seen] = []
        self.bytes_served: Counter[str] = Counter()  # path -> content bytes sent (GET bodies)
        self.cut_after: dict[str, int] = {}  # path -> the next GET of it closes the connection after N bytes
        self.hold: dict[str, threading.Event] = {}  # path -> the next GET of it sends half, then waits for this
        self.corrupt: set[str] = set()  # paths whose next GET serves other bytes (same length)
        self.holding = threading.Event()  # set when a held GET has sent its half
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- the repositories ---------------------------------------------------------------------------------------

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", private: bool = False) -> str:
        """Add a commit holding `files` at the head of `branch` (the branch moves to it); returns its sha."""
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        parent = repo.refs.get(branch, "")
        digest = hashlib.sha1(parent.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        for path, data in files.items():
            if path.endswith(LFS_SUFFIXES):
                self.blobs[hashlib.sha256(data).hexdigest()] = (path, data)
        return sha

    def requests(self, method: str | None = None, contains: str = "") -> list[Seen]:
        return [s for s in self.seen if (method is None or s.method == method) and contains in s.path]

    # --- serving -----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for event in self.hold.values():
            event.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the test reads `fake.seen`
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def do_POST(self) -> None:
        self._write_route()

    def do_PUT(self) -> None:
        self._write_route()

    # --- routing -----------------------------------------------------------------------------------------------

    def _route(self, body: bool) -> None:
        fake = self.fake
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        with fake._lock:
            fake.seen.append(
                Seen(self.command, unquote(path), self.headers.get("Range"), self.headers.get("Authorization"))
            )
        segments = path.strip("/").split("/")
        if segments[:2] == ["api", "models"] and len(segments) == 4:  # repo_info without a revision
            return self._api("/".join(segments[2:4]), "revision", "main", query, body)
        if segments[:2] == ["api", "models"] and len(segments) >= 6 and segments[4] in ("revision", "tree"):
            repo_id, kind, rev = "/".join(segments[2:4]), segments[4], unquote(segments[5])
            return self._api(repo_id, kind, rev, query, body)
        if len(segments) >= 5 and segments[2] == "resolve":
            repo_id, rev, file = "/".join(segments[:2]), unquote(segments[3]), unquote("/".join(segments[4:]))
            return self._resolve(repo_id, rev, file, body)
        if len(segments) == 2 and segments[0] == "cdn":
            return self._cdn(segments[1], body)
        self._error(404, None, "Not found", body)

    def _authorised(self, repo: Repo | None, body: bool) -> bool:
        """The hub's answers for a missing or private repository and for tokens, before anything else."""
        auth = self.headers.get("Authorization")
        if auth is not None and auth not in (f"Bearer {self.fake.token}", f"Bearer {self.fake.readonly_token}"):
            self._error(401, None, "Invalid credentials in Authorization header", body)
            return False
        if repo is None or (repo.private and auth is None):
            # The hub does not say whether a repository exists to a caller who may not see it.
            self._error(404 if auth else 401, "RepoNotFound", "Repository not found", body)
            return False
        return True

    def _commit(self, repo: Repo, rev: str, body: bool) -> str | None:
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
        return sha

    def _api(self, repo_id: str, kind: str, rev: str, query: dict, body: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        if not self._authorised(repo, body) or (sha := self._commit(repo, rev, body)) is None:
            return
        files = repo.commits[sha]
        if kind == "revision":
            siblings = []
            for path, data in sorted(files.items()):
                entry = {"rfilename": path}
                if query.get("blobs", [""])[0].lower() == "true":
                    lfs = path.endswith(LFS_SUFFIXES)
                    pointer = lfs_pointer(data) if lfs else data
                    entry.update(size=len(data), blobId=git_blob_sha1(pointer))
                    if lfs:
                        entry["lfs"] = {
                            "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "pointerSize": len(pointer),
                        }
                siblings.append(entry)
            answer = {"_id": repo_id, "id": repo_id, "modelId": repo_id, "private": repo.private, "sha": sha}
            answer["siblings"] = siblings
        else:
            answer = []
            for path, data in sorted(files.items()):
                lfs = path.endswith(LFS_SUFFIXES)
                pointer = lfs_pointer(data) if lfs else data
                entry = {"type": "file", "oid": git_blob_sha1(pointer), "size": len(data), "path": path}
                if lfs:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
                    entry["lfs"]["pointerSize"] = len(pointer)
                answer.append(entry)
        self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"}, body)

    def _resolve(self, repo_id: str, rev: str, file: str, body: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        if not self._authorised(repo, body) or (sha := self._commit(repo, rev, body)) is None:
            return
        data = repo.commits[sha].get(file)
        if data is None:
            self._error(404, "EntryNotFound", f"{file} does not exist on {rev}", body, {"X-Repo-Commit": sha})
            return
        if file.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            port = self.server.server_address[1]
            headers = {
                "Location": f"http://localhost:{port}/cdn/{sha256}",
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "X-Repo-Commit": sha,
                "ETag": f'"{git_blob_sha1(lfs_pointer(data))}"',
            }
            self._send(302, b"", headers, body)
            return
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": sha}
        self._send_content(file, data, headers, body)

    def _cdn(self, sha256: str, body: bool) -> None:
        if sha256 not in self.fake.blobs:
            self._error(404, None, "NoSuchKey", body)
            return
        file, data = self.fake.blobs[sha256]
        self._send_content(file, data, {"ETag": f'"{sha256}"'}, body)

    # --- uploads -----------------------------------------------------------------------------------------------

    def _write_route(self) -> None:
        fake = self.fake
        path = urlsplit(self.path).path
        with fake._lock:
            fake.seen.append(Seen(self.command, unquote(path), None, self.headers.get("Authorization")))
        segments = path.strip("/").split("/")
        if segments[0] == "lfs-upload":
            return self._lfs_put(segments[1])
        payload = self._body()
        if segments[0] == "lfs-verify":
            return self._send(200, b"{}", {"Content-Type": "application/json"}, True)
        if segments == ["api", "validate-yaml"]:  # the card's front matter, checked before a commit that adds it
            ok = payload and json.loads(payload).get("content", "").startswith("---")
            return self._send(200 if ok else 400, b'{"warnings": []}', {"Content-Type": "application/json"}, True)
        if not self._may_write():
            return
        if segments == ["api", "repos", "create"]:
            return self._create_repo(json.loads(payload))
        if path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(json.loads(payload))
        repo_id = "/".join(segments[2:4])
        repo = fake.repos.get(repo_id)
        if segments[:2] != ["api", "models"] or len(segments) < 6 or repo is None:
            return self._error(404, "RepoNotFound" if repo is None else None, "Not found", True)
        rev = unquote("/".join(segments[5:]))
        if segments[4] == "preupload":
            return self._preupload(repo, rev, json.loads(payload))
        if segments[4] == "commit":
            return self._commit_upload(repo_id, repo, rev, payload)
        if segments[4] == "branch":
            if rev in repo.refs:
                return self._error(409, None, "Reference already exists", True)
            repo.refs[rev] = repo.refs["main"]
            return self._send(200, b"{}", {"Content-Type": "application/json"}, True)
        self._error(404, None, "Not found", True)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _may_write(self) -> bool:
        auth = self.headers.get("Authorization")
        if auth == f"Bearer {self.fake.readonly_token}" and auth is not None:
            self._error(403, None, "You don't have the rights to write to this repository", True)
            return False
        if auth != f"Bearer {self.fake.token}" or self.fake.token is None:
            self._error(401, None, "Invalid credentials in Authorization header", True)
            return False
        return True

    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.fake.url}/{repo_id}"
        if repo_id in self.fake.repos:  # the hub's 409 also names the repository's url
            answer = json.dumps({"error": "You already created this model repo", "url": url}).encode()
            return self._send(409, answer, {"Content-Type": "application/json"}, True)
        self.fake.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         private=payload.get("visibility") == "private" or bool(payload.get("private")))  # fmt: skip
        self._send(200, json.dumps({"url": url}).encode(), {"Content-Type": "application/json"}, True)

    def _preupload(self, repo: Repo, rev: str, payload: dict) -> None:
        files = repo.commits.get(repo.refs.get(rev, ""), {})
        answer = []
        for entry in payload["files"]:
            lfs = entry["path"].endswith(LFS_SUFFIXES)
            current = files.get(entry["path"])
            oid = None
            if current is not None:
                oid = hashlib.sha256(current).hexdigest() if lfs else git_blob_sha1(current)
            mode = "lfs" if lfs else "regular"
            answer.append({"path": entry["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, json.dumps({"files": answer}).encode(), {"Content-Type": "application/json"}, True)

    def _lfs_batch(self, payload: dict) -> None:
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.fake.blobs and obj["oid"] not in self.fake.staged:
                entry["actions"] = {
                    "upload": {"href": f"{self.fake.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.fake.url}/lfs-verify/{obj['oid']}"},
                }
            objects.append(entry)
        headers = {"Content-Type": "application/vnd.git-lfs+json"}
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), headers, True)

    def _lfs_put(self, oid: str) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        with fake._lock:
            cut, fake.cut_upload = fake.cut_upload > 0, max(0, fake.cut_upload - 1)
        if cut and length:
            self.rfile.read(length // 2)
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-upload
            return
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, None, "sha256 of the content does not match the oid", True)
        fake.staged[oid] = data
        self._send(200, b"", {}, True)

    def _commit_upload(self, repo_id: str, repo: Repo, rev: str, payload: bytes) -> None:
        import base64

        if rev not in repo.refs:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", True)
        files = dict(repo.commits[repo.refs[rev]])
        for line in payload.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self.fake.staged.get(value["oid"]) or self.fake.blobs.get(value["oid"], (None, None))[1]
                if data is None:
                    return self._error(400, None, f"LFS object {value['oid']} was not uploaded", True)
                files[value["path"]] = data
            elif item["key"] in ("deletedFile", "deletedFolder"):
                files.pop(value["path"], None)
        sha = self.fake.commit(repo_id, files, branch=rev)
        answer = {"commitUrl": f"{self.fake.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"}, True)

    # --- answers -----------------------------------------------------------------------------------------------

    def _send_content(self, file: str, data: bytes, headers: dict, body: bool) -> None:
        start = 0
        requested = self.headers.get("Range")
        if requested:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Accept-Ranges"] = "bytes"
        part = data[start:]
        status = 206 if requested else 200
        if not body:
            self._send(status, b"", {**headers, "Content-Length": str(len(part))}, body=False)
            return
        fake = self.fake
        with fake._lock:
            cut = fake.cut_after.pop(file, None)
            hold = fake.hold.pop(file, None)
            if file in fake.corrupt:
                fake.corrupt.discard(file)
                part = bytes([part[0] ^ 0xFF]) + part[1:]
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(part))}.items():
            self.send_header(key, value)
        self.end_headers()
        if hold is not None:
            half = part[: len(part) // 2]
            self._write(file, half)
            fake.holding.set()
            hold.wait(timeout=60)
            self.close_connection = True
            return
        if cut is not None:
            self._write(file, part[:cut])
            self.close_connection = True  # a dropped connection: the client got fewer bytes than Content-Length
            return
        self._write(file, part)

    def _write(self, file: str, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        with self.fake._lock:
            self.fake.bytes_served[file] += len(data)

    def _error(self, status: int, code: str | None, message: str, body: bool, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, body)

    def _send(self, status: int, payload: bytes, headers: dict, body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)
