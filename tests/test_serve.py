"""`nlmm serve`: the same results as an in-process search, a replaced checkpoint reloaded before
answering, concurrent clients, a bounded number of models, and clients that survive a server
that dies. Servers run as threads of the test process (real sockets) or as `nlmm serve`
processes where signals matter."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_inference_load import replace_checkpoint, scale_weights, write_checkpoint

import nlmm.search.client
from nlmm.data.cache import PreparedCache
from nlmm.errors import NlmmError
from nlmm.search.engine import run_search
from nlmm.search.types import SearchRequest
from nlmm.search.serve import SearchService, listening, serving_in_thread
from nlmm.search.client import ask_server, search, server_address
from nlmm.search.protocol import SOCKET_NAME, TCP_PORT_NAME

NLMM = Path(sys.executable).with_name("nlmm")
START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One runs folder for the module; torch on one thread, as the `nlmm` processes it starts
    (OMP_NUM_THREADS=1), so in-process and served results are computed alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path_factory.mktemp("serve") / "runs"
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_store(runs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Replaces conftest's per-test store: every test here uses the module's runs folder."""
    monkeypatch.setenv("NLMM_RUNS_DIR", str(runs))
    monkeypatch.delenv("NLMM_DB_URL", raising=False)
    return runs


@pytest.fixture(scope="module")
def model_a(runs: Path, tiny_cache: PreparedCache) -> Path:
    return write_checkpoint(runs / "a" / "checkpoints" / "best.pt", tiny_cache, seed=0)


@pytest.fixture(scope="module")
def model_b(runs: Path, tiny_cache: PreparedCache) -> Path:
    return write_checkpoint(runs / "b" / "checkpoints" / "best.pt", tiny_cache, seed=1)


@pytest.fixture
def served(runs: Path, model_a: Path, model_b: Path) -> Iterator[SearchService]:
    with serving_in_thread(runs) as service:
        yield service


def in_process(req: SearchRequest):
    return run_search(req)


def served_results(req: SearchRequest):
    answer = ask_server(req)
    assert answer is not None, "no server answered"
    return answer.results


def requests(checkpoint: Path, cache: PreparedCache) -> list[SearchRequest]:
    image = cache.image_path(int(cache.split_images("test")[0]))
    wav = cache.wav_path(int(cache.split_audio_captions("test")[0]))
    caption = cache.caption_text(int(cache.split_captions("test")[1]))
    return [SearchRequest(text=caption, checkpoint=checkpoint, device="cpu"),
            SearchRequest(text=caption, checkpoint=checkpoint, target="audio", k=3, split="all"),
            SearchRequest(image=image, checkpoint=checkpoint, target="text", k=4, device="cpu"),
            SearchRequest(audio=wav, checkpoint=checkpoint, device="cpu", ttt=True)]


def nlmm_env(runs: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NLMM_DB_URL"}
    env.update(NLMM_RUNS_DIR=str(runs), OMP_NUM_THREADS="1", COLUMNS="200")
    return env


# ------------------------------------------------------------------------------ same results

def test_served_results_are_the_in_process_results(served: SearchService, model_a: Path,
                                                   tiny_cache: PreparedCache):
    for req in requests(model_a, tiny_cache):
        assert served_results(req) == in_process(req), req
    assert served.answered == 4


def test_cli_prints_the_same_bytes_with_and_without_the_server(served: SearchService, runs: Path,
                                                               model_a: Path,
                                                               tiny_cache: PreparedCache):
    wav = tiny_cache.wav_path(int(tiny_cache.split_audio_captions("test")[2]))
    commands = [("a red circle", "--checkpoint", str(model_a), "--json", "-k", "40"),
                ("--audio", str(wav), "--checkpoint", str(model_a), "--in", "text")]
    outputs = {}
    for args in commands:
        for server in (True, False):
            extra = () if server else ("--no-server",)
            done = subprocess.run([str(NLMM), "search", *args, "--device", "cpu", *extra],
                                  capture_output=True, text=True, env=nlmm_env(runs),
                                  timeout=START_TIMEOUT_S)
            assert done.returncode == 0, done.stderr
            outputs[args, server] = (done.stdout, done.stderr)
        assert outputs[args, True] == outputs[args, False]
    assert served.answered == len(commands)  # each command went once through the server


def test_errors_come_back_as_the_in_process_sentence(served: SearchService,
                                                     monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(NlmmError) as served_error:
        ask_server(SearchRequest(text="a dog", run="nosuch"))
    with pytest.raises(NlmmError) as own_error:
        in_process(SearchRequest(text="a dog", run="nosuch"))
    assert str(served_error.value) == str(own_error.value)
    # A client of another store is not served: it searches in its own process.
    monkeypatch.setattr(nlmm.search.client, "default_db_url", lambda: "sqlite:////else/nlmm.db")
    assert ask_server(SearchRequest(text="a dog", run="nosuch")) is None
    assert served.answered == 0


# ------------------------------------------------------------------------------ freshness

@pytest.mark.parametrize("how", ["renamed_over", "rewritten_in_place_same_stamp"])
def test_a_replaced_checkpoint_is_loaded_before_the_next_answer(served: SearchService,
                                                                runs: Path, model_a: Path,
                                                                tiny_cache: PreparedCache,
                                                                how: str):
    path = runs / f"fresh-{how}" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    shutil.copy(model_a, path)
    req = SearchRequest(text=tiny_cache.caption_text(0), checkpoint=path, target="text", k=6)
    before = served_results(req)
    replace_checkpoint(path, scale_weights(path, 1.7), how)
    after = served_results(req)
    assert after == in_process(req)
    assert [h.score for h in after.hits] != [h.score for h in before.hits]


# ------------------------------------------------------------------------------ concurrency

def test_two_concurrent_clients_get_their_own_answers(served: SearchService, model_a: Path,
                                                      model_b: Path, tiny_cache: PreparedCache):
    mine = {"a": requests(model_a, tiny_cache)[:3], "b": requests(model_b, tiny_cache)[:3]}
    expected = {name: [in_process(req) for req in reqs] for name, reqs in mine.items()}
    assert expected["a"][0] != expected["b"][0]  # two models: a mixed-up answer would show
    start = threading.Barrier(2)
    wrong: list[str] = []

    def client(name: str) -> None:
        start.wait()
        for round_ in range(5):
            for req, want in zip(mine[name], expected[name]):
                if served_results(req) != want:
                    wrong.append(f"client {name}, round {round_}: {req}")

    threads = [threading.Thread(target=client, args=(name,)) for name in mine]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not wrong
    assert served.answered == 30


def test_least_recently_used_model_is_let_go_beyond_max_models(runs: Path, model_a: Path,
                                                               model_b: Path,
                                                               tiny_cache: PreparedCache):
    req_a, req_b = requests(model_a, tiny_cache)[0], requests(model_b, tiny_cache)[0]
    with serving_in_thread(runs, max_models=1) as service:
        first = served_results(req_a)
        assert service.pool.loaded() == [str(model_a)]
        assert served_results(req_b) == in_process(req_b)
        assert service.pool.loaded() == [str(model_b)]
        assert served_results(req_a) == first
        assert service.pool.loaded() == [str(model_a)]


def test_a_second_server_for_the_same_runs_folder_is_refused(served: SearchService, runs: Path):
    with pytest.raises(NlmmError, match="already answers on .*stop it"):
        with listening(served, runs):
            pass
    assert (runs / SOCKET_NAME).exists()  # the running server's socket is left alone


# ------------------------------------------------------------------------------ processes

@contextlib.contextmanager
def serve_process(runs: Path, *args: str) -> Iterator[subprocess.Popen]:
    """A real `nlmm serve`, once it answers a ping."""
    proc = subprocess.Popen([str(NLMM), "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=nlmm_env(runs))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ping(runs):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "nlmm serve did not start"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def ping(runs: Path) -> dict | None:
    address = server_address(runs)
    conn = nlmm.search.client.connect(address) if address is not None else None
    if conn is None:
        return None
    with conn:
        return nlmm.search.client.exchange(conn, {"op": "ping"})


@pytest.mark.parametrize(("transport", "stop"), [("unix", signal.SIGINT),
                                                 ("tcp", signal.SIGTERM)])
def test_a_signal_stops_the_server_and_removes_its_address(runs: Path, model_a: Path,
                                                           tiny_cache: PreparedCache,
                                                           transport: str, stop: signal.Signals):
    args = ("--tcp", "0") if transport == "tcp" else ()
    with serve_process(runs, *args) as proc:
        address = server_address(runs)
        assert isinstance(address, tuple) == (transport == "tcp")
        req = requests(model_a, tiny_cache)[0]
        assert served_results(req) == in_process(req)
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert out.rstrip().endswith("stopped")
    assert not (runs / SOCKET_NAME).exists() and not (runs / TCP_PORT_NAME).exists()
    assert server_address(runs) is None


def test_a_server_killed_mid_request_leaves_the_client_an_answer(runs: Path, model_a: Path,
                                                                 tiny_cache: PreparedCache,
                                                                 monkeypatch: pytest.MonkeyPatch):
    req = requests(model_a, tiny_cache)[0]
    sent = threading.Event()
    connect = nlmm.search.client.connect

    class Watched:
        """The client's connection, telling the test when the request is on its way."""

        def __init__(self, conn):
            self.conn = conn

        def sendall(self, data: bytes) -> None:
            self.conn.sendall(data)
            sent.set()

        def __getattr__(self, name):
            return getattr(self.conn, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.conn.close()

    def watched_connect(address):
        conn = connect(address)
        return None if conn is None else Watched(conn)

    monkeypatch.setattr(nlmm.search.client, "connect", watched_connect)
    notes = io.StringIO()
    with serve_process(runs) as proc:
        proc.send_signal(signal.SIGSTOP)  # it accepts no more work, yet its socket stays open
        got: list = []
        client = threading.Thread(target=lambda: got.append(
            search(req, console=Console(file=notes, width=200))))
        client.start()
        assert sent.wait(timeout=60), "the client never sent its request"
        proc.kill()  # SIGKILL: no clean-up, the socket file stays behind
        client.join(timeout=120)
    assert got == [in_process(req)]
    assert "the search server gave no answer" in notes.getvalue()
    assert "searching in this process instead" in notes.getvalue()
    # The socket the dead server left: no one listens, so the next search quietly runs here.
    assert (runs / SOCKET_NAME).exists()
    assert ask_server(req) is None
    quiet = io.StringIO()
    assert search(req, console=Console(file=quiet)) == in_process(req)
    assert quiet.getvalue() == ""
    # and a new server takes the place over
    with serve_process(runs):
        assert ping(runs)["answered"] == 0
    (runs / SOCKET_NAME).unlink(missing_ok=True)


def test_json_lines_protocol_answers_ping_and_refuses_garbage(served: SearchService, runs: Path):
    conn = nlmm.search.client.connect(str(runs / SOCKET_NAME))
    with conn:
        conn.sendall(b"not json\n" + json.dumps({"op": "ping"}).encode() + b"\n")
        with conn.makefile("rb") as reader:
            refused, pong = json.loads(reader.readline()), json.loads(reader.readline())
    assert refused["ok"] is False and refused["kind"] == "refused"
    assert pong["ok"] is True and pong["pid"] == os.getpid()


def test_a_log_reader_that_stops_reading_never_holds_up_an_answer():
    """`nlmm serve | reader` where the reader stops: the log thread waits, callers do not, and
    what does not fit is counted."""
    from nlmm.search.serve import LOG_QUEUE, BackgroundLog

    entered, release, written = threading.Event(), threading.Event(), []

    def stuck(line: str) -> None:  # a pipe nobody reads: the write blocks
        entered.set()
        release.wait()
        written.append(line)

    log = BackgroundLog(stuck)
    log("line 0")
    assert entered.wait(10)
    began = time.perf_counter()
    for i in range(1, LOG_QUEUE + 51):
        log(f"line {i}")
    assert time.perf_counter() - began < 5.0
    # the writer thread holds line 0, LOG_QUEUE lines wait, the rest are dropped
    assert log.dropped == 50
    release.set()
    deadline = time.monotonic() + 10
    while len(written) < LOG_QUEUE + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert written[:2] == ["line 0", "line 1"] and len(written) == LOG_QUEUE + 1
