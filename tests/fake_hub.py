"""A local stand-in for the Hugging Face Hub HTTP API, for offline tests of uploads (huggingface_hub 2.4.0).

Endpoints (everything else answers 404), all read from the 2.4.0 client source:
  POST /api/repos/create                              create_repo; 409 + {"url"} if it exists (exist_ok reads "url")
  POST /api/{type}s/{ns}/{name}/branch/{branch}       create_branch; 409 if it exists
  POST /api/{type}s/{ns}/{name}/preupload/{rev}       upload modes: always "regular" (see below)
  POST /api/{type}s/{ns}/{name}/commit/{rev}          ndjson commit: header, file (base64), deletedFile/Folder;
                                                      a header's `parentCommit` that is not the branch's head
                                                      answers 412, as the Hub does (create_commit(parent_commit=…))
  GET  /api/{type}s/{ns}/{name}[/revision/{rev}]      repo_info (used when a re-upload changes nothing)
  POST /api/validate-yaml                             README.md metadata check made before every upload
  GET  /api/whoami-v2                                 whoami, so code that derives a namespace from it works

Upload path: in 2.4.0 the *client* picks Xet vs LFS, never the server: `upload_folder` goes through the
Xet pipeline when `hf_xet` is importable (it is, in .venv) unless HF_HUB_DISABLE_XET, and `create_commit`
uploads "lfs"-mode files through Xet the same way. The only mode that needs neither is "regular", which
the preupload response may choose per file, whatever the size. So this hub answers "regular" for every
file, the bytes come inline (base64) in the commit, and no Xet token, CAS or LFS batch endpoint is hit.
(The Xet pipeline still opens a local hf_xet session, which only writes a log under $HF_HOME/xet/logs.
It splits a folder into several commits, "msg (part 2)", past 256 files or 100 MB of inline content.)

Retries: the Xet pipeline (default here) sends the commit through `http_backoff`, which retries a 500
up to 5 times (sleeping 1, 2, 4, 8, 8 s), so `fail_commits=1` only delays `upload_folder` by ~1 s.
With `online(..., disable_xet=True)` upload_folder takes the legacy `create_commit` path, which posts
the commit once, so `fail_commits=1` makes that `upload_folder` raise HfHubHTTPError (500).

Offline mode: huggingface_hub reads HF_HUB_OFFLINE, HF_ENDPOINT, etc. into `huggingface_hub.constants`
at import time and checks `constants.HF_HUB_OFFLINE` in a request hook, so setting the environment
inside a test is not enough. `online(monkeypatch, url)` patches the constants (see there).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def online(monkeypatch, url: str | None = None, *, disable_xet: bool = False) -> None:
    """Let huggingface_hub make requests for the rest of a test, to `url` when given (e.g. FakeHub().url).

    `monkeypatch` is pytest's fixture (anything with setenv/setattr works); it undoes all of this.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import close_session

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Otherwise building headers fetches {ENDPOINT}/api/agent-harnesses and caches it under HF_HOME.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", disable_xet)
    if url is not None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        # `huggingface_hub.upload_folder` & co. are bound to a module-level HfApi built at import time.
        monkeypatch.setattr(hf_api.api, "endpoint", url)
        close_session()  # the shared httpx client read proxy settings when it was made


def _git_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    def __init__(self, fail_commits: int = 0, user: str = "test-user"):
        self.fail_commits = fail_commits
        self.user = user
        self.commit_attempts = 0
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "branches", "type"}
        self.commits: list[dict] = []  # {"repo_id", "revision", "message", "files": {path: bytes}, "oid"}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # header names lower-cased
        self._trees: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo_id, branch) -> files at its head
        self._heads: dict[tuple[str, str], str] = {}  # (repo_id, branch) -> commit oid
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Content of a branch after all commits so far."""
        return dict(self._trees[(repo_id, revision)])

    def head(self, repo_id: str, revision: str = "main") -> str:
        """The branch's head commit."""
        return self._heads[(repo_id, revision)]

    # -- routing; called with the lock held ------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return 200, {"errors": [], "warnings": []}
        if method == "GET" and parts == ["api", "whoami-v2"]:
            return 200, {"type": "user", "name": self.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
        if len(parts) < 4 or parts[0] != "api" or parts[1] not in ("models", "datasets", "spaces"):
            raise _Error(404, f"No route for {method} {path}")
        repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4:5], "/".join(parts[5:])
        if repo_id not in self.repos:
            raise _Error(404, f"Repository {repo_id} not found", "RepoNotFound")
        if method == "GET" and action in ([], ["revision"]):
            return self._info(repo_id, rest or "main")
        if method == "POST" and action == ["branch"]:
            return self._create_branch(repo_id, rest, json.loads(body or b"{}").get("startingPoint") or "main")
        if method == "POST" and action == ["preupload"]:
            return self._preupload(repo_id, rest, json.loads(body)["files"])
        if method == "POST" and action == ["commit"]:
            return self._commit(repo_id, rest, body)
        raise _Error(404, f"No route for {method} {path}")

    def _repo_url(self, repo_id: str, repo_type: str) -> str:
        return f"{self.url}/{repo_id}" if repo_type == "model" else f"{self.url}/{repo_type}s/{repo_id}"

    def _create_repo(self, payload: dict) -> tuple[int, object]:
        repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
        repo_type = payload.get("type") or "model"
        url = self._repo_url(repo_id, repo_type)
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        private = payload.get("visibility") == "private"
        self.repos[repo_id] = {"private": private, "branches": {"main"}, "type": repo_type}
        self._trees[(repo_id, "main")] = {}
        self._heads[(repo_id, "main")] = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def _create_branch(self, repo_id: str, branch: str, start: str) -> tuple[int, object]:
        if branch in self.repos[repo_id]["branches"]:
            raise _Error(409, f"Reference refs/heads/{branch} already exists")
        self._trees[(repo_id, branch)] = dict(self._tree(repo_id, start))
        self._heads[(repo_id, branch)] = self._heads[(repo_id, start)]
        self.repos[repo_id]["branches"].add(branch)
        return 200, {}

    def _tree(self, repo_id: str, revision: str) -> dict[str, bytes]:
        if (repo_id, revision) not in self._trees:
            raise _Error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self._trees[(repo_id, revision)]

    def _preupload(self, repo_id: str, revision: str, files: list[dict]) -> tuple[int, object]:
        tree = self._tree(repo_id, revision)
        answer = [
            # "oid" of an existing file lets the client drop it from the commit when unchanged, as on the Hub.
            {"path": p, "uploadMode": "regular", "shouldIgnore": False, "oid": _git_sha(tree[p]) if p in tree else None}
            for p in (f["path"] for f in files)
        ]
        return 200, {"files": answer, "commitOid": self._heads[(repo_id, revision)]}

    def _info(self, repo_id: str, revision: str) -> tuple[int, object]:
        tree = self._tree(repo_id, revision)
        siblings = [{"rfilename": p, "size": len(b), "blobId": _git_sha(b)} for p, b in sorted(tree.items())]
        info = {"id": repo_id, "private": self.repos[repo_id]["private"], "siblings": siblings}
        return 200, {**info, "sha": self._heads[(repo_id, revision)], "author": repo_id.split("/")[0]}

    def _commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, object]:
        self.commit_attempts += 1
        if self.commit_attempts <= self.fail_commits:
            raise _Error(500, f"Injected failure of commit attempt {self.commit_attempts}")
        tree = self._tree(repo_id, revision)
        message, files, deleted = "", {}, []
        for line in body.splitlines():
            item = json.loads(line) if line.strip() else {"key": None}
            key, value = item["key"], item.get("value")
            if key == "header":
                message = value["summary"]
                parent = value.get("parentCommit")
                if parent is not None and parent != self._heads[(repo_id, revision)]:
                    raise _Error(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/"))
            elif key is not None:  # "lfsFile" included: preupload never asks for LFS
                raise _Error(400, f"Unsupported commit item {key!r}")
        for gone in deleted:
            for p in [p for p in tree if p == gone or p.startswith(gone + "/")]:
                del tree[p]
        tree.update(files)
        oid = hashlib.sha1(f"{repo_id}@{revision}#{len(self.commits)}:{message}".encode()).hexdigest()
        self._heads[(repo_id, revision)] = oid
        self.commits.append({"repo_id": repo_id, "revision": revision, "message": message, "files": files, "oid": oid})
        url = f"{self._repo_url(repo_id, self.repos[repo_id]['type'])}/commit/{oid}"
        return 200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the per-hub subclass

    def _serve(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(headers.get("content-length") or 0))
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, headers))
            try:
                (status, payload), code = self.hub.handle(self.command, self.path, body), None
            except _Error as e:
                status, payload, code = e.status, {"error": e.message}, e.code
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code:  # hf_raise_for_status maps these to RepositoryNotFoundError / RevisionNotFoundError
            self.send_header("X-Error-Code", code)
        if status >= 400:
            self.send_header("X-Error-Message", payload["error"])
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args) -> None:  # keep pytest output clean
        pass
