"""How `nlmm serve` carries a search request and its results over a local socket.

Free of torch and numpy, so `nlmm search` can ask a running server in a fraction of the time
importing torch takes. One line of UTF-8 JSON per message over a Unix socket (or 127.0.0.1 with
`--tcp`); the message shapes: bench/DESIGN.md, "The search server's wire protocol".
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from nlmm.search.types import SearchHit, SearchRequest, SearchResults

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
