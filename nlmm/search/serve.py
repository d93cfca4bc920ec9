"""`nlmm serve`: models and gallery indexes kept warm, answering searches over a local socket.

The server listens on the Unix socket `<runs>/.serve.sock` (or on 127.0.0.1 with `--tcp`), and
`nlmm search` in the same runs folder uses it on its own; the messages are described in
`nlmm.search.protocol`. A request is answered by the same `Searcher` code as an in-process
search, so its results are the same, byte for byte (with the same torch thread settings). The
Unix socket takes connections from its owner only (its file mode); a TCP port from every local
user.

- Every request resolves its run's checkpoint again and compares the key of the file's content
  (`checkpoint_key`) with that of the loaded weights: a replaced checkpoint is loaded before
  the request is answered, never answered from the old model.
- Several runs and checkpoints are served; beyond `max_models` loaded searchers the least
  recently used one is let go before another is loaded.
- One thread per connection. A model answers one query at a time (its lock); models are loaded
  one at a time, after the ones beyond `max_models` are let go (one let go mid-query is freed
  when that query ends).
- Connections not accepted yet wait in a listen backlog at the system's maximum (somaxconn), so
  a burst of clients queues, even while the first query of a model waits for it to load.
- SIGTERM or Ctrl-C stops accepting, removes the socket (or port) file and returns; a client
  whose request was in flight searches in its own process instead.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import socketserver
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nlmm
from nlmm.devices import resolve_device
from nlmm.errors import NlmmError
from nlmm.inference.load import checkpoint_for
from nlmm.paths import default_db_url, runs_dir
from nlmm.search.engine import Searcher, check_request
from nlmm.search.types import SearchRequest
from nlmm.search.client import connect
from nlmm.search.protocol import (MAX_REQUEST_BYTES, PROTOCOL, SOCKET_NAME, TCP_PORT_NAME, decode,
                                 encode, request_from_json, results_to_json)
from nlmm.inference.weights_cache import checkpoint_key

DEFAULT_MAX_MODELS = 2
UNIX_PATH_MAX = 107  # bytes of a Unix socket path, sun_path less its terminating NUL
SOMAXCONN_FILE = "/proc/sys/net/core/somaxconn"  # Linux's cap on a listen backlog
LOG_QUEUE = 1000  # log lines waiting for a slow reader before new ones are dropped

Log = Callable[[str], None]


@dataclass
class Warm:
    searcher: Searcher
    lock: threading.Lock  # one query at a time per model


class ModelPool:
    """Loaded searchers by (checkpoint, device, data, backend), least recently used first."""

    def __init__(self, max_models: int = DEFAULT_MAX_MODELS, log: Log = print) -> None:
        if max_models < 1:
            raise NlmmError(f"--max-models must be at least 1, got {max_models}.")
        self.max_models = max_models
        self.log = log
        self._warm: OrderedDict[tuple[str, ...], Warm] = OrderedDict()
        self._lock = threading.Lock()  # guards _warm
        self._load_lock = threading.Lock()  # one load at a time

    def get(self, req: SearchRequest) -> Warm:
        """The searcher for the request's model, loaded again when its checkpoint changed."""
        path = checkpoint_for(req.model).absolute()
        device = str(resolve_device(req.device))
        key = (str(path), device, str(req.data) if req.data is not None else "", req.backend)
        source = checkpoint_key(path)
        warm = self._current(key, source)
        if warm is not None:
            return warm
        with self._load_lock:
            warm = self._current(key, source)  # loaded by another request meanwhile
            if warm is not None:
                return warm
            self._make_room(key)
            start = time.perf_counter()
            searcher = Searcher(path, device=device, data=req.data, backend=req.backend)
            warm = Warm(searcher, threading.Lock())
            with self._lock:
                self._warm[key] = warm
            self.log(f"loaded {path} on {device} in {time.perf_counter() - start:.1f} s")
            return warm

    def _current(self, key: tuple[str, ...], source: str | None) -> Warm | None:
        with self._lock:
            warm = self._warm.get(key)
            if warm is None or source is None or warm.searcher.loaded.source_key != source:
                return None
            self._warm.move_to_end(key)
            return warm

    def _make_room(self, key: tuple[str, ...]) -> None:
        """Let go of the stale searcher of `key` and the least recently used ones beyond
        max_models - 1, before the next one is loaded."""
        with self._lock:
            if self._warm.pop(key, None) is not None:
                self.log(f"{key[0]} changed; loading it again")
            while len(self._warm) >= self.max_models:
                old, _ = self._warm.popitem(last=False)
                self.log(f"let go of {old[0]} (--max-models {self.max_models})")

    def loaded(self) -> list[str]:
        with self._lock:
            return [key[0] for key in self._warm]


class SearchService:
    """Answers protocol messages, one per call, whatever carried them."""

    def __init__(self, pool: ModelPool, log: Log = print) -> None:
        self.pool = pool
        self.log = log
        self.answered = 0  # searches answered with results
        self._count_lock = threading.Lock()

    def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "nlmm_version": nlmm.__version__,
                    "models": self.pool.loaded(), "answered": self.answered}
        if op != "search":
            return _refused(f"unknown op {op!r}")
        for field, mine in (("protocol", PROTOCOL), ("nlmm_version", nlmm.__version__),
                            ("store", default_db_url())):
            if message.get(field) != mine:
                return _refused(f"this server has {field} {mine!r}, the client "
                                f"{message.get(field)!r}")
        start = time.perf_counter()
        try:
            req = request_from_json(message.get("request") or {})
            check_request(req)
            warm = self.pool.get(req)
            with warm.lock:
                results = warm.searcher.answer(req)
        except NlmmError as exc:
            return {"ok": False, "kind": "user", "error": str(exc)}
        except (TypeError, ValueError) as exc:
            return _refused(f"malformed request ({exc})")
        except Exception as exc:  # the server outlives one failed request
            self.log(traceback.format_exc().rstrip())
            return {"ok": False, "kind": "internal", "error": f"{type(exc).__name__}: {exc}"}
        ms = (time.perf_counter() - start) * 1e3
        with self._count_lock:
            self.answered += 1
        self.log(f"{ms:7.1f} ms  {req.model or 'latest run'}: {len(results.hits)} hits")
        return {"ok": True, "results": results_to_json(results), "server_ms": ms}


def _refused(why: str) -> dict[str, Any]:
    return {"ok": False, "kind": "refused", "error": why}


class _Handler(socketserver.StreamRequestHandler):
    server: _UnixServer | _TCPServer

    def handle(self) -> None:
        while line := self.rfile.readline(MAX_REQUEST_BYTES):
            try:
                answer = self.server.service.answer(decode(line))
            except ValueError as exc:
                answer = _refused(f"not a JSON message ({exc})")
            self.wfile.write(encode(answer))
            self.wfile.flush()


def listen_backlog() -> int:
    """The system's largest listen backlog. A burst of clients connecting while every thread is
    busy (a model loading, say) waits in it to be accepted: a Unix socket refuses a connection
    its backlog cannot hold (EAGAIN), where socketserver's default of 5 refused some of eight
    clients."""
    with contextlib.suppress(OSError, ValueError):
        return max(socket.SOMAXCONN, int(Path(SOMAXCONN_FILE).read_text()))
    return socket.SOMAXCONN


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = listen_backlog()
    service: SearchService


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = listen_backlog()
    service: SearchService


@contextlib.contextmanager
def listening(service: SearchService, runs: Path,
              tcp_port: int | None = None) -> Iterator[tuple[socketserver.BaseServer, str]]:
    """A server bound for the runs folder, and where it listens (for people); on exit the
    socket or port file is removed."""
    runs.mkdir(parents=True, exist_ok=True)
    if tcp_port is None:
        server, where, mark = _bind_unix(runs / SOCKET_NAME)
    else:
        server, where, mark = _bind_tcp(runs / TCP_PORT_NAME, tcp_port)
    server.service = service
    try:
        yield server, where
    finally:
        server.server_close()
        path, stamp = mark
        with contextlib.suppress(OSError):
            if _stamp(path) == stamp:  # still ours, not a newer server's
                path.unlink()


@contextlib.contextmanager
def serving_in_thread(runs: Path, max_models: int = DEFAULT_MAX_MODELS
                      ) -> Iterator[SearchService]:
    """A server for the runs folder answering from a background thread of this process (for
    benchmarks and tests: the same service, pool and socket as `nlmm serve`)."""
    service = SearchService(ModelPool(max_models, log=lambda line: None), log=lambda line: None)
    with listening(service, runs) as (server, _):
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield service
        finally:
            server.shutdown()
            thread.join()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _bind_unix(path: Path) -> tuple[_UnixServer, str, tuple[Path, tuple[int, int]]]:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise NlmmError(f"the socket path {path} is longer than the {UNIX_PATH_MAX} bytes a Unix "
                        "socket allows; serve a runs folder with a shorter path or use --tcp PORT.")
    if path.exists():
        conn = connect(str(path))
        if conn is not None:
            conn.close()
            raise NlmmError(f"a search server already answers on {path}; stop it (Ctrl-C in its "
                            "terminal) before starting another.")
        path.unlink()  # left by a server that was killed
    server = _UnixServer(str(path), _Handler)
    return server, f"unix socket {path}", (path, _stamp(path))


def _bind_tcp(port_file: Path, port: int) -> tuple[_TCPServer, str, tuple[Path, tuple[int, int]]]:
    try:
        server = _TCPServer(("127.0.0.1", port), _Handler)
    except OSError as exc:
        raise NlmmError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); pick "
                        "another --tcp port.") from None
    bound = server.server_address[1]
    tmp = port_file.with_name(f"{port_file.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{bound}\n")
    os.replace(tmp, port_file)
    return server, f"127.0.0.1:{bound}", (port_file, _stamp(port_file))


class BackgroundLog:
    """A log whose lines are written on a thread of its own, so that a reader which stops
    reading the server's output (a full pipe) holds up that thread only, never an answer. Lines
    that find LOG_QUEUE lines waiting are dropped and counted."""

    def __init__(self, log: Log, size: int = LOG_QUEUE) -> None:
        self._log = log
        self._lines: queue.Queue[str] = queue.Queue(size)
        self.dropped = 0
        threading.Thread(target=self._write, name="nlmm-serve-log", daemon=True).start()

    def __call__(self, line: str) -> None:
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while True:
            line = self._lines.get()
            with contextlib.suppress(OSError):  # a reader gone (EPIPE) costs its lines only
                self._log(line)


def serve(tcp_port: int | None = None, max_models: int = DEFAULT_MAX_MODELS,
          log: Log = print) -> None:
    """`nlmm serve`: answer searches for the runs folder until SIGTERM or Ctrl-C."""
    background = BackgroundLog(log)
    service = SearchService(ModelPool(max_models, background), background)
    with listening(service, runs_dir(), tcp_port) as (server, where):
        def stop(signum: int, frame: Any) -> None:
            # shutdown() waits for serve_forever, which runs in this (the signalled) thread
            threading.Thread(target=server.shutdown, daemon=True).start()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        log(f"nlmm serve (pid {os.getpid()}) answers searches on {where}; Ctrl-C stops it")
        try:
            server.serve_forever()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    log(f"stopped ({background.dropped} log lines dropped: nothing read the output)"
        if background.dropped else "stopped")
