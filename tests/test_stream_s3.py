"""A pack on an S3-compatible object store, for real over HTTP: a moto server in its own
process, boto3 to create the bucket, nlmm to pack into s3://bucket/packed and to stream from it
(chunks downloaded into a per-rank cache), resumed mid-epoch."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nlmm.data.pack_index import read_manifest, verify_pack
from nlmm.data.packed import pack
from nlmm.data.stream import StreamTrainLoader, iter_split
from nlmm.errors import NlmmError

pytest.importorskip("moto", reason="moto[server] is not installed, so there is no S3 server to "
                                   "test against (pip install 'moto[server]')")
sys.path.insert(0, str(Path(__file__).parent))
from test_packed import CFG, CHUNK, VOCAB, tiny_corpus  # noqa: E402

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def pack_cache(tmp_path, monkeypatch) -> None:
    """Remote chunks and sha256 memos of each test in its own folder, never in ~/.cache."""
    monkeypatch.setenv("NLMM_PACK_CACHE", str(tmp_path / "pack-cache"))


@pytest.fixture(scope="module")
def s3_endpoint():
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(server).exists():
        pytest.skip("moto_server is not on PATH (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, "moto_server exited at start"
            assert time.monotonic() < deadline, "moto_server did not listen within 30 s"
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDS.items():
            mp.setenv(k, v)
        yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_pack(s3_endpoint, tmp_path_factory):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="bucket")
    corpus = tiny_corpus(tmp_path_factory.mktemp("corpus"))
    opts = {"endpoint_url": s3_endpoint}
    pack(corpus, "s3://bucket/packed", vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK,
         workers=2, progress=False, storage_options=opts)
    local = tmp_path_factory.mktemp("local") / "p"
    pack(corpus, local, vocab_size=VOCAB, data_cfg=CFG, chunk_bytes=CHUNK, workers=2,
         progress=False)
    return opts, local, tmp_path_factory.mktemp("cache")


def loader(url, opts, cache, **kw) -> StreamTrainLoader:
    return StreamTrainLoader(url, batch_size=4, seed=5, data_cfg=CFG, num_workers=2, crop=True,
                             storage_options=opts, cache_dir=str(cache), **kw)


def caption_ids(batches) -> list[list[int]]:
    return [b["caption_ids"].tolist() for b in batches]


def test_pack_on_s3_matches_the_local_pack(s3_pack) -> None:
    opts, local, _ = s3_pack
    remote = read_manifest("s3://bucket/packed", opts)
    assert remote["shards"] == read_manifest(local)["shards"]  # same bytes, sha256 for sha256
    assert verify_pack("s3://bucket/packed", opts) == []


def test_stream_from_s3_and_resume_mid_epoch(s3_pack) -> None:
    opts, local, cache = s3_pack
    url = "s3://bucket/packed"
    straight = list(loader(url, opts, cache / "a"))
    assert caption_ids(straight) == caption_ids(loader(local, None, cache / "l"))
    first = loader(url, opts, cache / "b")
    it = iter(first)
    head = [next(it), next(it)]
    state = json.loads(json.dumps(first.state_dict()))
    again = loader(url, opts, cache / "b")
    again.load_state_dict(state)
    rest = list(again)
    assert caption_ids(head + rest) == caption_ids(straight)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(head + rest, straight))


def test_endpoint_from_the_environment_and_evaluation_pass(s3_pack, monkeypatch) -> None:
    opts, _, cache = s3_pack
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])
    groups = [g for b in iter_split("s3://bucket/packed", "dev", batch_size=4, data_cfg=CFG,
                                    num_workers=2, cache_dir=str(cache / "e"))
              for g in b["image_ids"].tolist()]
    assert sorted(groups) == list(range(24, 30))


def test_missing_bucket_and_corrupted_object_are_one_sentence(s3_pack) -> None:
    import boto3

    opts, local, cache = s3_pack
    with pytest.raises(NlmmError) as err:
        read_manifest("s3://no-such-bucket/x", opts)
    assert "\n" not in str(err.value)
    s3 = boto3.client("s3", endpoint_url=opts["endpoint_url"])
    listing = s3.list_objects_v2(Bucket="bucket", Prefix="packed/")["Contents"]
    for key in [o["Key"] for o in listing]:
        s3.copy_object(Bucket="bucket", CopySource={"Bucket": "bucket", "Key": key},
                       Key="broken/" + key[len("packed/"):])
    body = bytearray((local / "train" / "chunk-00001.bin").read_bytes())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket="bucket", Key="broken/train/chunk-00001.bin", Body=bytes(body))
    with pytest.raises(NlmmError) as err:
        list(loader("s3://bucket/broken", opts, cache / "c"))
    assert "train/chunk-00001.bin" in str(err.value) and "\n" not in str(err.value)


def test_nlmm_train_streams_from_the_bucket(s3_pack, s3_endpoint, tmp_path):
    """The README's bucket command: `nlmm train --data s3://...` with AWS_ENDPOINT_URL, a real
    worker process reading the shards over HTTP, then `nlmm eval` on the same pack."""
    import os

    env = dict(os.environ, **CREDS, AWS_ENDPOINT_URL=s3_endpoint, COLUMNS="200",
               NLMM_RUNS_DIR=str(tmp_path / "runs"))
    train = subprocess.run(
        [sys.executable, "-m", "nlmm.cli", "train", "--data", "s3://bucket/packed", "--config",
         "tiny_cpu", "--device", "cpu", "--epochs", "1", "--set", "train.batch_size=4", "--set",
         f"data.image_size={CFG.image_size}", "--set", "vocab_size=64", "--name", "bucket"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout + train.stderr
    assert "streaming from the pack in s3://bucket/packed" in train.stdout
    evaluated = subprocess.run([sys.executable, "-m", "nlmm.cli", "eval", "bucket", "--json",
                                "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["pack"] == "s3://bucket/packed"


def test_a_rank_keeps_only_the_chunks_it_still_reads_on_disk(s3_pack) -> None:
    """One lane (batch 1) reads the stream front to back: chunks it is done with leave the
    download cache while it goes, so the cache never holds the whole split."""
    opts, local, cache = s3_pack

    def one_lane(url, options, folder):
        return StreamTrainLoader(url, batch_size=1, seed=5, data_cfg=CFG, num_workers=2,
                                 storage_options=options, cache_dir=str(folder))

    remote = one_lane("s3://bucket/packed", opts, cache / "d")
    assert caption_ids(remote) == caption_ids(one_lane(local, None, cache / "l"))
    assert 0 < len(remote.reader.cached()) < len(remote.reader.shards) // 2
