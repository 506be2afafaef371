"""A local stand-in for the part of the Hub API that `huggingface_hub.create_repo` and `upload_folder` use, so that
tests run the real client code over HTTP.

The endpoints and payloads follow huggingface_hub's own source (`hf_api.create_repo`, `_commit_api._fetch_upload_modes`
and `_send_commit`, `lfs.post_lfs_batch_info` and `lfs_upload`), on its non-Xet path (`HF_HUB_DISABLE_XET=1`):

    POST /api/validate-yaml                              {"content": README.md} -> errors or warnings
    POST /api/repos/create                               {"name", "organization"} -> {"url"}; 409 if it exists
    POST /api/models/{repo}/preupload/{revision}         {"files": [{path, size, sample}]} -> upload mode of each
    POST /{repo}.git/info/lfs/objects/batch              LFS objects -> a "basic" upload href for each
    PUT  /lfs/{oid}                                      the LFS file's bytes (sha256 checked)
    POST /api/models/{repo}/commit/{revision}            ndjson: header, file (base64), lfsFile (oid) -> commit
    GET  /api/models/{repo}/revision/{revision}          repo info (create_repo asks it after a 401/403)

Every request but the LFS upload (a presigned storage URL on the Hub) must carry `Authorization: Bearer {token}`;
anything else is answered 401, as the Hub does for a bad
token. Requests to any other path are recorded in `unexpected` and answered 404.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".png")  # the Hub's default .gitattributes, in short


class FakeHub:
    """`with FakeHub(token) as hub:` serves on `hub.endpoint` (127.0.0.1, a free port) until the block ends."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> committed path -> content
        self.lfs: dict[str, bytes] = {}  # sha256 -> uploaded content
        self.requests: list[str] = []
        self.unexpected: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    # --- the API ---

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        self.requests.append(f"{method} {path}")
        presigned = method == "PUT" and path.startswith("/lfs/")  # the Hub hands out storage URLs that need no token
        if headers.get("Authorization") != f"Bearer {self.token}" and not presigned:
            return 401, {"error": "Invalid credentials in Authorization header"}
        path = path.split("?")[0]
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
            self.repos[repo_id] = {}
            return 200, {"url": f"{self.endpoint}/{repo_id}"}
        if method == "POST" and path == "/api/validate-yaml":
            return self.validate_card(json.loads(body)["content"])
        if m := re.fullmatch(rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", path):
            if m["repo"] not in self.repos:
                return 404, {"error": "Repository not found"}
            return 200, {
                "id": m["repo"],
                "sha": "0" * 40,
                "siblings": [{"rfilename": p} for p in self.repos[m["repo"]]],
            }
        if method == "POST" and (m := re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path)):
            if m["repo"] not in self.repos:
                return 404, {"error": "Repository not found"}
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                      "shouldIgnore": False, "oid": None} for f in files]  # fmt: skip
            return 200, {"files": modes, "commitOid": "0" * 40}
        if method == "POST" and (m := re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path)):
            objects = json.loads(body)["objects"]
            actions = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                        "actions": {"upload": {"href": f"{self.endpoint}/lfs/{o['oid']}"}}} for o in objects]  # fmt: skip
            return 200, {"transfer": "basic", "objects": actions}
        if method == "PUT" and (m := re.fullmatch(r"/lfs/(?P<oid>[0-9a-f]{64})", path)):
            if hashlib.sha256(body).hexdigest() != m["oid"]:
                return 400, {"error": "sha256 mismatch"}
            self.lfs[m["oid"]] = body
            return 200, {}
        if method == "POST" and (m := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path)):
            if m["repo"] not in self.repos:
                return 404, {"error": "Repository not found"}
            files = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "lfsFile":
                    if item["value"]["oid"] not in self.lfs:
                        return 422, {"error": f"LFS object {item['value']['oid']} was never uploaded"}
                    files[item["value"]["path"]] = self.lfs[item["value"]["oid"]]
                elif item["key"] != "header":
                    return 400, {"error": f"unexpected commit operation {item['key']}"}
            self.repos[m["repo"]].update(files)
            return 200, {"commitUrl": f"{self.endpoint}/{m['repo']}/commit/{'1' * 40}", "commitOid": "1" * 40}
        self.unexpected.append(f"{method} {path}")
        return 404, {"error": f"not served by the fake Hub: {method} {path}"}

    @staticmethod
    def validate_card(readme: str) -> tuple[int, dict]:
        """What the Hub checks of a README.md before an upload: front matter that is a YAML mapping, with a list of
        string tags and a string license and library name."""
        if not readme.startswith("---\n") or "\n---\n" not in readme[3:]:
            return 200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(readme[4:].split("\n---\n")[0])
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"invalid yaml: {error}"}]}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "metadata is not a mapping"}]}
        tags = metadata.get("tags", [])
        if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            return 400, {"errors": [{"message": f"tags must be a list of strings, got {tags!r}"}]}
        for key in ("license", "library_name"):
            if not isinstance(metadata.get(key, ""), str):
                return 400, {"errors": [{"message": f"{key} must be a string"}]}
        return 200, {"warnings": []}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                if self.headers.get("Transfer-Encoding") == "chunked":  # a streamed file upload
                    body = b""
                    while size := int(self.rfile.readline().strip(), 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = hub.handle(self.command, self.path, self.headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        return Handler
