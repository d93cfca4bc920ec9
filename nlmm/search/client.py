"""`nlmm search` through a running `nlmm serve`, and in this process when there is none.

Imports neither torch nor numpy until it has to search in-process: asking a warm server costs
the interpreter's start-up and one round trip.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nlmm
from nlmm.errors import NlmmError
from nlmm.paths import default_db_url, runs_dir
from nlmm.search.types import SearchRequest, SearchResults
from nlmm.search.protocol import (PROTOCOL, SOCKET_NAME, TCP_PORT_NAME, decode, encode,
                                 request_to_json, results_from_json)

if TYPE_CHECKING:
    from rich.console import Console

CONNECT_TIMEOUT_S = 2.0
RETRY_PAUSE_S = 0.005  # first pause before connecting again to a full backlog; it doubles
MAX_RETRY_PAUSE_S = 0.1

Address = str | tuple[str, int]  # a Unix socket path, or (host, port)


class ServerLost(Exception):
    """The server took the request but gave no answer (it stopped, or failed answering)."""


@dataclass
class ServerAnswer:
    results: SearchResults
    server_ms: float  # time the server spent on the request
    total_ms: float  # the round trip as the client saw it


def server_address(runs: Path | None = None) -> Address | None:
    """Where a server for the runs folder listens: its Unix socket, else the port written by a
    `--tcp` server; None when neither is there."""
    runs = runs or runs_dir()
    sock = runs / SOCKET_NAME
    if sock.exists():
        return str(sock)
    with contextlib.suppress(OSError, ValueError):
        return ("127.0.0.1", int((runs / TCP_PORT_NAME).read_text().strip()))
    return None


def connect(address: Address, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket | None:
    """A connection to the server, or None when nothing listens there (a stale socket file) or
    it accepted none within `timeout_s`.

    A Unix socket whose listen backlog is full refuses at once (EAGAIN) instead of queueing the
    connection as TCP does: the server is alive and accepting, so the connection is tried again
    until `timeout_s` rather than sent to a seconds-slower in-process search."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    deadline = time.monotonic() + timeout_s
    pause = RETRY_PAUSE_S
    while True:
        conn = socket.socket(family, socket.SOCK_STREAM)
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            conn.connect(address)
        except OSError as exc:
            conn.close()
            if exc.errno != errno.EAGAIN or time.monotonic() + pause > deadline:
                return None
            time.sleep(pause)
            pause = min(2 * pause, MAX_RETRY_PAUSE_S)
            continue
        conn.settimeout(None)  # building a gallery index for a first query may take minutes
        return conn


def exchange(conn: socket.socket, message: dict[str, Any]) -> dict[str, Any]:
    """Send one message and read its answer; ServerLost when the connection ends first."""
    try:
        conn.sendall(encode(message))
        with conn.makefile("rb") as reader:
            line = reader.readline()
    except OSError as exc:
        raise ServerLost(f"the connection broke ({exc.strerror or exc})") from None
    if not line.endswith(b"\n"):
        raise ServerLost("it stopped before answering")
    try:
        return decode(line)
    except ValueError:
        raise ServerLost("its answer was not JSON") from None


def search_message(req: SearchRequest) -> dict[str, Any]:
    return {"op": "search", "protocol": PROTOCOL, "nlmm_version": nlmm.__version__,
            "store": default_db_url(), "request": request_to_json(req)}


def servable(req: SearchRequest) -> SearchRequest | None:
    """The request with absolute paths, as a server (running elsewhere) reads them; None when a
    file it names is missing, so the in-process search reports that in its own words."""
    files = {}
    for name in ("image", "audio", "checkpoint"):
        value = getattr(req, name)
        if value is not None:
            if not Path(value).is_file():
                return None
            files[name] = Path(value).absolute()
    if req.data is not None:
        files["data"] = Path(req.data).absolute()
    return replace(req, **files)


def ask_server(req: SearchRequest, address: Address | None = None) -> ServerAnswer | None:
    """The server's results for `req`; None when no server is listening, it does not serve this
    client (another store or version), or the request names a missing file. NlmmError for a
    request the server cannot answer; ServerLost when it stopped or failed while answering."""
    address = address or server_address()
    sendable = servable(req)
    if address is None or sendable is None:
        return None
    start = time.perf_counter()
    conn = connect(address)
    if conn is None:
        return None
    with conn:
        answer = exchange(conn, search_message(sendable))
    if answer.get("ok"):
        results = results_from_json(answer["results"])
        if req.checkpoint is not None:
            # the file the user named, as they wrote it (the server was sent its absolute path)
            results = replace(results, checkpoint=req.checkpoint)
        return ServerAnswer(results, float(answer["server_ms"]),
                            (time.perf_counter() - start) * 1e3)
    kind, error = answer.get("kind"), str(answer.get("error"))
    if kind == "user":
        raise NlmmError(error)
    if kind == "refused":
        return None
    raise ServerLost(f"it failed answering ({error})")


def search(req: SearchRequest, console: Console | None = None,
           use_server: bool = True) -> SearchResults:
    """`nlmm search`: answered by the `nlmm serve` of this runs folder when one is running, else
    (or with `use_server` False) in this process. A server that stops or fails mid-request is
    reported on `console` in one line, and the search runs here instead."""
    if use_server:
        try:
            answer = ask_server(req)
        except ServerLost as exc:
            if console is not None:
                console.print(f"[yellow]the search server gave no answer: {exc}; searching in "
                              "this process instead[/]")
        else:
            if answer is not None:
                return answer.results
    from nlmm.search.engine import run_search

    return run_search(req, console=console)
