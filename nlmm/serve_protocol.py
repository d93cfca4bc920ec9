"""How `nlmm serve` carries a search request and its results over a local socket.

Free of torch and numpy, so `nlmm search` can ask a running server in a fraction of the time
importing torch takes.

Transport: a stream socket, by default the Unix socket `<runs>/.serve.sock`; a server started
with `--tcp PORT` listens on 127.0.0.1:PORT and writes the port to `<runs>/.serve.tcp`. Each
message is one line of UTF-8 JSON; a connection may carry several requests, answered in order.

Requests:

    {"op": "search", "protocol": 1, "nlmm_version": "0.1.0", "store": "sqlite:///.../nlmm.db",
     "request": {"text": "a dog on grass", "image": null, "audio": null, "run": null,
                 "checkpoint": null, "target": null, "k": 5, "split": "test", "data": null,
                 "ttt": null, "device": "auto", "backend": "exact"}}
    {"op": "ping"}

`request` holds the fields of `SearchRequest` (paths absolute); `store` is the client's store
URL, which must be the server's, as must the protocol and nlmm versions.

Answers:

    {"ok": true, "server_ms": 4.1,
     "results": {"hits": [{"rank": 1, "score": 0.62, "modality": "image", "item": "x.jpg",
                           "caption": "a dog runs", "path": "/.../x.jpg", "image_id": "x.jpg"},
                          ...],
                 "query": "a dog on grass", "query_modality": "text", "target": "image",
                 "split": "test", "gallery_size": 1000, "k": 5,
                 "checkpoint": "/.../best.pt", "step": 1200, "run": "r1"}}
    {"ok": true, "pid": 1234, "nlmm_version": "0.1.0", "models": ["/.../best.pt"],
     "answered": 17}                                                            (ping)
    {"ok": false, "kind": "user", "error": "no run named x; ..."}

`results` holds the fields of `SearchResults`; `server_ms` is the time from reading the request
to writing the answer. `kind` is `user` for a request that cannot be answered (the error is the
sentence `nlmm search` prints), `refused` when the server does not serve this client (another
store, nlmm version or protocol; the client searches in-process without a word) and `internal`
when answering failed (the client says so in one line and searches in-process).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from nlmm.search_types import SearchHit, SearchRequest, SearchResults

PROTOCOL = 1
SOCKET_NAME = ".serve.sock"
TCP_PORT_NAME = ".serve.tcp"
MAX_REQUEST_BYTES = 1 << 20
_PATH_FIELDS = ("image", "audio", "checkpoint", "data")


def request_to_json(req: SearchRequest) -> dict[str, Any]:
    body = asdict(req)
    for name in _PATH_FIELDS:
        if body[name] is not None:
            body[name] = str(body[name])
    return body


def request_from_json(body: dict[str, Any]) -> SearchRequest:
    """The request a client sent; ValueError when it has fields SearchRequest does not."""
    known = {f.name for f in fields(SearchRequest)}
    unknown = set(body) - known
    if unknown:
        raise ValueError(f"unknown request fields {sorted(unknown)}")
    return SearchRequest(**{k: (Path(v) if k in _PATH_FIELDS and v is not None else v)
                            for k, v in body.items()})


def results_to_json(results: SearchResults) -> dict[str, Any]:
    body = asdict(results)
    body["checkpoint"] = str(results.checkpoint)
    return body


def results_from_json(body: dict[str, Any]) -> SearchResults:
    return SearchResults(**{**body, "hits": [SearchHit(**hit) for hit in body["hits"]],
                            "checkpoint": Path(body["checkpoint"])})


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message; ValueError when the line is not a JSON object."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message
