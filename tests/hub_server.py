"""A stand-in for the Hugging Face hub on loopback, for the sharing tests: the HTTP routes huggingface_hub uses to
create a repository and a branch, commit files (regular, base64 in the commit payload: no LFS or Xet storage), and
list and download a revision. Repositories live in memory; every commit gets a new sha; nothing is authenticated.

Run as ``python hub_server.py PORT_FILE``: it serves on a free port of 127.0.0.1, writes the port to PORT_FILE and
serves until killed. What it does not do (so the tests do not cover it): LFS/Xet uploads of large files, auth and
private repositories' access rules, pull requests, tags, pagination of long file lists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

REPOS: dict[str, dict] = {}  # repo id -> {"branches": {name: sha}, "commits": {sha: {path: bytes}}}
LOCK = threading.Lock()
MODEL = r"/api/models/(?P<repo>[^/]+/[^/]+)"


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def reply(self, status: int, body=None, headers: dict | None = None, head: bool = False):
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def missing(self, code: str, message: str, head: bool = False):
        self.reply(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def revision(self, repo: str, revision: str):
        """(sha, files) of a branch or commit, or None."""
        entry = REPOS.get(repo)
        if entry is None:
            return None
        sha = entry["branches"].get(revision, revision)
        return (sha, entry["commits"][sha]) if sha in entry["commits"] else None

    def do_POST(self):  # noqa: N802 (http.server's naming)
        path = unquote(urlparse(self.path).path)
        data = self.body()
        with LOCK:
            if path == "/api/repos/create":
                request = json.loads(data)
                repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                if repo in REPOS:
                    return self.reply(409, {"error": "You already created this model repo", "url": f"/{repo}"})
                empty = hashlib.sha1(repo.encode()).hexdigest()
                REPOS[repo] = {"branches": {"main": empty}, "commits": {empty: {}}}
                return self.reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self.reply(200, {})
            if m := re.fullmatch(MODEL + r"/preupload/(?P<rev>.+)", path):
                files = json.loads(data)["files"]
                return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            if m := re.fullmatch(MODEL + r"/branch/(?P<branch>.+)", path):
                entry = REPOS.get(m["repo"])
                if entry is None:
                    return self.missing("RepoNotFound", "Repository not found")
                if m["branch"] in entry["branches"]:
                    return self.reply(409, {"error": "Reference already exists"})
                entry["branches"][m["branch"]] = entry["branches"]["main"]
                return self.reply(200, {})
            if m := re.fullmatch(MODEL + r"/commit/(?P<rev>.+)", path):
                entry = REPOS.get(m["repo"])
                if entry is None:
                    return self.missing("RepoNotFound", "Repository not found")
                parent = entry["branches"].get(m["rev"])
                if parent is None:
                    return self.missing("RevisionNotFound", f"Invalid rev id: {m['rev']}")
                files = dict(entry["commits"][parent])
                for line in data.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                sha = hashlib.sha1(parent.encode() + data).hexdigest()
                entry["commits"][sha] = files
                entry["branches"][m["rev"]] = sha
                host = self.headers["Host"]
                return self.reply(200, {"commitUrl": f"http://{host}/{m['repo']}/commit/{sha}", "commitOid": sha,
                                        "pullRequestUrl": None})
        self.missing("EntryNotFound", f"No route POST {path}")

    def do_GET(self):  # noqa: N802
        self.serve(head=False)

    def do_HEAD(self):  # noqa: N802
        self.serve(head=True)

    def serve(self, head: bool):
        path = unquote(urlparse(self.path).path)
        with LOCK:
            if m := re.fullmatch(MODEL + r"(?:/revision/(?P<rev>[^/]+))?", path):
                found = self.revision(m["repo"], m["rev"] or "main")
                if found is None:
                    code = "RepoNotFound" if m["repo"] not in REPOS else "RevisionNotFound"
                    return self.missing(code, "Repository or revision not found", head)
                sha, files = found
                return self.reply(200, {"id": m["repo"], "modelId": m["repo"], "sha": sha, "private": False,
                                        "siblings": [{"rfilename": p} for p in sorted(files)]}, head=head)
            if m := re.fullmatch(MODEL + r"/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path):
                found = self.revision(m["repo"], m["rev"])
                if found is None:
                    return self.missing("RevisionNotFound", "Revision not found", head)
                _, files = found
                entries = [{"type": "file", "oid": blob_id(data), "size": len(data), "path": name}
                           for name, data in sorted(files.items())]
                return self.reply(200, entries, head=head)
            if m := re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
                found = self.revision(m["repo"], m["rev"])
                if found is None:
                    code = "RepoNotFound" if m["repo"] not in REPOS else "RevisionNotFound"
                    return self.missing(code, "Repository or revision not found", head)
                sha, files = found
                if m["file"] not in files:
                    return self.missing("EntryNotFound", f"{m['file']} does not exist at {sha}", head)
                data = files[m["file"]]
                return self.reply(200, data, {"X-Repo-Commit": sha, "ETag": f'"{blob_id(data)}"'}, head=head)
        self.missing("EntryNotFound", f"No route {path}", head)


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
