"""`nlmm serve` under a burst: connections beyond socketserver's old backlog of 5 queue instead
of being refused, a client waits for a full backlog instead of giving up, and a real server
answers N clients x M searches at once, cold (no model loaded yet) and then warm, every answer
the in-process one. Latencies are measured by `bench/serve_load.py`, not asserted here."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_inference_load import write_checkpoint
# the module's runs folder, shared by this process and the server it starts
from test_serve import isolated_store, nlmm_env, runs  # noqa: F401 (fixtures)

from nlmm.data.cache import PreparedCache
from nlmm.search.engine import run_search
from nlmm.search.types import SearchRequest
from nlmm.search.serve import listen_backlog
from nlmm.search.client import connect, exchange, server_address

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from serve_load import burst, ping, serve_process  # noqa: E402

CLIENTS, QUERIES = 8, 5
BEYOND_OLD_BACKLOG = 64  # socketserver's default backlog of 5 refused the 7th


@pytest.fixture(scope="module")
def server(runs: Path, tiny_cache: PreparedCache) -> Iterator[subprocess.Popen]:
    """One real `nlmm serve` for the module, started before any model is written or loaded."""
    with serve_process(runs, nlmm_env(runs)) as proc:
        yield proc


def unix_listener(path: Path) -> socket.socket:
    """A Unix socket that queues a single connection and accepts none until told to."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    return listener


def fill_backlog(path: Path) -> list[socket.socket]:
    """Connections queued on `path` until its backlog refuses the next one."""
    queued = []
    for _ in range(100):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.setblocking(False)
        try:
            conn.connect(str(path))
        except BlockingIOError:
            conn.close()
            return queued
        queued.append(conn)
    raise AssertionError("the backlog never filled")


def test_a_client_waits_for_room_in_a_full_backlog(tmp_path: Path):
    path = tmp_path / "s.sock"
    with unix_listener(path) as listener:
        queued = fill_backlog(path)
        assert connect(str(path), timeout_s=0.3) is None  # nothing accepted: it gives up
        accepted: list[socket.socket] = []
        timer = threading.Timer(0.3, lambda: accepted.append(listener.accept()[0]))
        start = time.monotonic()
        timer.start()
        conn = connect(str(path), timeout_s=20)
        waited = time.monotonic() - start
        timer.join()
        assert conn is not None, "refused although the server made room within the timeout"
        assert waited >= 0.3  # it connected once the queue had room, not before
        for sock in [conn, *queued, *accepted]:
            sock.close()


def test_a_socket_nobody_listens_on_is_not_waited_for(tmp_path: Path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(str(path))  # a killed server's file: connecting is refused, not queued
    start = time.monotonic()
    assert connect(str(path), timeout_s=20) is None
    assert time.monotonic() - start < 10  # refused at once, not retried until the timeout


def test_the_listen_backlog_is_the_systems_maximum():
    assert listen_backlog() >= socket.SOMAXCONN
    somaxconn = Path("/proc/sys/net/core/somaxconn")
    if somaxconn.exists():
        assert listen_backlog() == max(socket.SOMAXCONN, int(somaxconn.read_text()))


def test_a_stopped_server_queues_a_burst_and_answers_it(server: subprocess.Popen, runs: Path):
    address = server_address(runs)
    assert isinstance(address, str)
    server.send_signal(signal.SIGSTOP)  # it accepts nothing: every connection must queue
    conns = []
    try:
        for _ in range(BEYOND_OLD_BACKLOG):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.setblocking(False)
            conn.connect(address)  # BlockingIOError (EAGAIN) when the backlog is full
            conn.setblocking(True)
            conns.append(conn)
    finally:
        server.send_signal(signal.SIGCONT)
    for conn in conns:
        with conn:
            assert exchange(conn, {"op": "ping"})["ok"] is True


def test_a_burst_is_answered_in_full_cold_then_warm(server: subprocess.Popen, runs: Path,
                                                    tiny_cache: PreparedCache):
    checkpoint = write_checkpoint(runs / "burst" / "checkpoints" / "best.pt", tiny_cache)
    captions = [tiny_cache.caption_text(int(r)) for r in tiny_cache.split_captions("test")[:6]]
    reqs = [SearchRequest(text=text, checkpoint=checkpoint, target=target, k=5, device="cpu")
            for text, target in zip(captions, ["image", "audio"] * 3)]
    address = server_address(runs)
    assert address is not None and ping(runs)["models"] == []  # cold: nothing loaded
    results = {label: burst(reqs, CLIENTS, QUERIES, address) for label in ("cold", "warm")}
    expected = {i: run_search(req) for i, req in enumerate(reqs)}
    for label, result in results.items():
        assert result.errors == [], label
        assert result.refused == 0, label
        assert len(result.answers) == CLIENTS * QUERIES, label
        wrong = [i for i, results in result.answers if results != expected[i]]
        assert wrong == [], f"{label}: wrong answers to requests {sorted(set(wrong))}"
    assert ping(runs)["answered"] == 2 * CLIENTS * QUERIES  # every search went to the server
