"""Shared fixtures: a hand-written Flickr8k + FACC corpus and its prepared cache, and the
device the device-aware tests run on."""

from __future__ import annotations

import os
import signal

import pytest
from corpus_factory import PublicCorpus, write_public_corpus

from nlmm.config import DataConfig

TINY_VOCAB = 300
DEVICES = ("cpu", "cuda")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on CI's two cores: one thread each, for the processes the
    # tests start too, and threads that sleep while they wait instead of spinning.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# A script that starts the suite in the background (`make test &`) starts it with SIGINT ignored,
# and an ignored signal stays ignored in every process started from it, so nlmm would never see
# the Ctrl-C the signal tests send. A handler (unlike SIG_IGN) is reset to the default on exec.
signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("NLMM_TEST_DEVICE", "cpu"),
                     help="device of the tests that take the `device` fixture: cpu or cuda "
                          "(default: $NLMM_TEST_DEVICE, else cpu); `-m device` selects them")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: runs on the --device of the session (set for "
                                       "every test that takes the `device` fixture)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config):
    """The torch device named by --device / NLMM_TEST_DEVICE. On CUDA, TF32 is off for the
    session: these tests compare fp32 results at fp32 tolerances."""
    import torch

    name = pytestconfig.getoption("--device")
    if name not in DEVICES:
        pytest.exit(f"--device (or NLMM_TEST_DEVICE) must be cpu or cuda, got {name!r}.",
                    returncode=4)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda was asked for but torch sees no CUDA GPU; run on a GPU "
                    "machine or pass --device cpu.", returncode=4)
    if name == "cpu":
        yield torch.device("cpu")
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def tiny_data_config() -> DataConfig:
    """Small images and short clips: the whole cache builds in about a second."""
    return DataConfig(image_size=32, max_audio_seconds=2.0, text_max_len=16)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> PublicCorpus:
    """13 images (6 train / 3 dev / 3 test / 1 in no split), 5 captions each, a wav per caption
    of the 12 split images. Read-only: tests that break files copy it first."""
    return write_public_corpus(tmp_path_factory.mktemp("tiny") / "flickr8k")


@pytest.fixture(scope="session")
def tiny_cache(tiny_corpus: PublicCorpus, tmp_path_factory: pytest.TempPathFactory):
    """The prepared cache of `tiny_corpus` (kept outside the corpus folder)."""
    from nlmm.data.cache import prepare

    return prepare(tiny_corpus.root, tiny_data_config(), TINY_VOCAB,
                   cache_dir=tmp_path_factory.mktemp("tiny_cache") / "cache", workers=1,
                   progress=False)


SYNTH_IMAGES = 240


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory):
    """The offline synthetic corpus (builtin voice, same bytes on every machine)."""
    from nlmm.data.synth import synth_corpus

    root = tmp_path_factory.mktemp("synth") / "corpus"
    synth_corpus(root, n_images=SYNTH_IMAGES, seed=0, engine="builtin", progress=False)
    return root


@pytest.fixture(scope="session")
def synth_cache(synth_root):
    """`synth_root` prepared with the tiny_cpu data settings."""
    from nlmm.config import resolve_config
    from nlmm.data.cache import prepare

    cfg = resolve_config("tiny_cpu")
    return prepare(synth_root, cfg.data, cfg.vocab_size, progress=False)


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    """Every test gets its own runs/ folder and SQLite store, so nothing leaks into ./runs."""
    monkeypatch.setenv("NLMM_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("NLMM_DB_URL", raising=False)
    return tmp_path / "runs"


@pytest.fixture
def pg_url():
    """A new, empty PostgreSQL database for one test (dropped afterwards), on the server that
    NLMM_TEST_PG_URL names (`.ci/run` starts one on 127.0.0.1). Without a reachable server the
    test is skipped, and the skip says why."""
    import os
    import uuid

    from sqlalchemy import make_url

    admin = os.environ.get("NLMM_TEST_PG_URL")
    if not admin:
        pytest.skip("no PostgreSQL server: NLMM_TEST_PG_URL is not set (.ci/run starts one)")
    try:
        import psycopg
    except ImportError:
        pytest.skip("no PostgreSQL driver: install psycopg (pip install -e '.[dev]')")
    server = make_url(admin).set(drivername="postgresql")
    name = f"nlmm_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(server.render_as_string(hide_password=False), autocommit=True,
                             connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL at {server.render_as_string(hide_password=True)} is not "
                    f"usable: {str(exc).strip().splitlines()[0]}")
    yield server.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(server.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
