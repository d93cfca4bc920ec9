"""Faults survived, each with real processes: a worker killed with SIGKILL, a crash between a
checkpoint's write and its rename, a full disk while checkpointing, four writers and a polling
reader on one store, and damaged checkpoints handed to eval, search and --resume.

Faults inside a worker are injected from outside the package: the test puts a `sitecustomize`
module on the worker's PYTHONPATH that wraps `os.replace` or `os.fsync`, so nlmm itself carries
no fault hook.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import text

import tiny
from tiny import NullSink, cli_sets, tiny_config
from nlmm import store

NLMM = [sys.executable, "-m", "nlmm.cli"]
SMALL = [*cli_sets(*tiny.TINY_MODEL, "train.log_every=1"), "--device", "cpu"]
# The hand-written corpus of conftest (6 train images, 30 captions): 3 steps per epoch at batch 8.
TINY_DATA = [*cli_sets(*tiny.TINY_DATA, "vocab_size=300"), "--batch-size", "8"]
TINY_STEPS_PER_EPOCH = 3

FAULT_HOOKS = '''
import errno
import os
import signal

_FAULT = os.environ.get("NLMM_TEST_FAULT", "")


def _replaces_an_earlier_last(folder):
    return os.path.exists(os.path.join(folder, "last.pt"))


if _FAULT == "kill-before-rename":
    _replace = os.replace

    def _die_before_second_last(src, dst, *args, **kwargs):
        # the new last.pt is complete and fsynced in its temp file; the rename never happens
        if os.path.basename(str(dst)) == "last.pt" and _replaces_an_earlier_last(os.path.dirname(str(dst))):
            os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _die_before_second_last
elif _FAULT == "disk-full":
    _fsync = os.fsync

    def _full_on_second_last(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(name).startswith(".last.pt.tmp-") \\
                and _replaces_an_earlier_last(os.path.dirname(name)):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)  # half of it made it to the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _fsync(fd)

    os.fsync = _full_on_second_last
'''


def nlmm(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*NLMM, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(isolated_store):
    # one thread per process: on a shared 2-core machine more threads only thrash
    return dict(os.environ, NLMM_RUNS_DIR=str(isolated_store), COLUMNS="200", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny_root(tiny_corpus, tmp_path_factory) -> Path:
    """A copy of the hand-written corpus that workers may prepare a cache in."""
    root = tmp_path_factory.mktemp("faults") / "corpus"
    shutil.copytree(tiny_corpus.root, root)
    return root


def with_fault(env: dict, folder: Path, fault: str) -> dict:
    hooks = folder / "fault_hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(FAULT_HOOKS)
    path = os.pathsep.join(p for p in (str(hooks), env.get("PYTHONPATH", "")) if p)
    return dict(env, NLMM_TEST_FAULT=fault, PYTHONPATH=path)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def swept_runs() -> list[store.Run]:
    """The runs as `nlmm runs ls` and the dash see them: after the sweep for lost workers."""
    store.mark_lost()
    return store.list_runs()


def committed_rows(run_id: int) -> dict[tuple[str, int], float | None]:
    with store.get_engine().connect() as conn:
        rows = conn.execute(text("SELECT key, step, value FROM metrics WHERE run_id = :r"),
                            {"r": run_id}).all()
    return {(key, step): value for key, step, value in rows}


def assert_store_points_at_complete_files(run_id: int) -> None:
    from nlmm.inference.checkpoint import load_checkpoint

    checkpoints = store.list_checkpoints(run_id)
    assert checkpoints
    for ckpt in checkpoints:
        payload = load_checkpoint(Path(ckpt.path))
        assert payload["progress"]["global_step"] == ckpt.step, ckpt.path


# ---- a worker killed with SIGKILL --------------------------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_restarts_from_step_0(synth_root, env):
    out = nlmm("train", "flickr8k", "--synthetic", "--data", str(synth_root), "--detach",
               "--name", "early", "--batch-size", "8", "--epochs", "1", "--set",
               "train.checkpoint_minutes=0", *SMALL, env=env)
    assert out.returncode == 0, out.stderr
    run = store.get_run("early")
    wait_for(lambda: any(key == "loss" for key, _ in committed_rows(run.id)), 120,
             "the first committed loss row")
    assert store.last_checkpoint(run.id) is None
    os.kill(store.get_run(run.id).pid, signal.SIGKILL)
    wait_for(lambda: any(r.id == run.id and r.status == "lost" for r in swept_runs()),
             15, "the run to show as lost", poll=0.1)

    resumed = nlmm("train", "--resume", "early", "--steps", "2", "--device", "cpu", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "no checkpoint yet" in resumed.stdout and "restarting it from step 0" in resumed.stdout
    again = store.get_run("early")
    assert again.status == "finished" and again.step == 2
    assert [r.name for r in store.list_runs()] == ["early"]


def test_killed_worker_is_lost_within_10s_and_resumes_without_losing_rows(synth_root, env):
    # a constant learning rate, so that resuming with a shorter --steps replays the same updates;
    # small batches make an epoch long enough that the writer's 2 s flush lands between two
    # checkpoints on a fast machine too
    out = nlmm("train", "flickr8k", "--synthetic", "--data", str(synth_root), "--detach",
               "--name", "killed", "--batch-size", "8", "--epochs", "3", "--set",
               "train.schedule=constant", "--set", "train.warmup_steps=0", *SMALL, env=env)
    assert out.returncode == 0, out.stderr
    run = store.get_run("killed")

    def mid_second_epoch():
        ckpt = store.last_checkpoint(run.id)
        if ckpt is None:
            return None
        steps = [step for key, step in committed_rows(run.id) if key == "loss"]
        return (ckpt, max(steps)) if max(steps) >= ckpt.step + 3 else None

    ckpt, _ = wait_for(mid_second_epoch, 120, "a checkpoint and 3 committed steps after it")
    pid = store.get_run(run.id).pid
    before = committed_rows(run.id)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: any(r.id == run.id and r.status == "lost" for r in swept_runs()),
             15, "the run to show as lost", poll=0.1)
    assert time.monotonic() - killed_at <= 10.0
    listing = nlmm("runs", "ls", env=env)
    assert "lost" in listing.stdout

    last_step = max(step for _, step in before)
    # --steps on a resume counts from the checkpoint: the run ends 2 steps past the last row
    resumed = nlmm("train", "--resume", "killed", "--steps", str(last_step + 2 - ckpt.step),
                   "--device", "cpu", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert store.get_run(run.id).status == "finished"
    assert f"at step {ckpt.step}" in Path(run.log_path).read_text()

    after = committed_rows(run.id)
    with store.get_engine().connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM metrics WHERE run_id = :r"),
                              {"r": run.id}).scalar_one()
    assert stored == len(after), "a (key, step) was stored twice"
    assert set(before) <= set(after), "a committed row was lost"
    loss_steps = sorted(step for key, step in after if key == "loss")
    assert loss_steps == list(range(1, last_step + 3))
    # the resumed worker replayed the steps after the checkpoint exactly
    for (key, step), value in before.items():
        if key == "loss" and step > ckpt.step:
            assert after[key, step] == pytest.approx(value, rel=1e-4), step


# ---- a crash between a checkpoint's write and its rename ---------------------------------------

def test_crash_before_checkpoint_rename_keeps_the_previous_one(tiny_root, env, tmp_path):
    from nlmm.inference.checkpoint import load_checkpoint

    faulty = with_fault(env, tmp_path, "kill-before-rename")
    out = nlmm("train", "flickr8k", "--data", str(tiny_root), "--name", "crash", "--epochs", "3",
               *TINY_DATA, *SMALL, env=faulty)
    assert out.returncode == 1, out.stdout + out.stderr
    run = store.get_run("crash")
    assert run.status in ("failed", "lost")
    folder = Path(run.log_path).parent / "checkpoints"
    assert load_checkpoint(folder / "last.pt")["progress"]["global_step"] == TINY_STEPS_PER_EPOCH
    orphans = list(folder.glob(".last.pt.tmp-*"))
    assert len(orphans) == 1, "the complete temp file of the killed write should be left over"
    assert load_checkpoint(orphans[0])["progress"]["global_step"] == 2 * TINY_STEPS_PER_EPOCH
    assert store.last_checkpoint(run.id).step == TINY_STEPS_PER_EPOCH
    assert_store_points_at_complete_files(run.id)

    resumed = nlmm("train", "--resume", "crash", "--device", "cpu", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    log = Path(run.log_path).read_text()
    assert f"removed {orphans[0].name}" in log and f"at step {TINY_STEPS_PER_EPOCH}" in log
    assert not list(folder.glob(".*tmp*"))
    assert store.get_run(run.id).step == 3 * TINY_STEPS_PER_EPOCH
    assert_store_points_at_complete_files(run.id)


# ---- a full disk while checkpointing -----------------------------------------------------------

def test_disk_full_while_checkpointing_fails_clearly_and_keeps_the_last_good_one(tiny_root, env,
                                                                                  tmp_path):
    from nlmm.inference.checkpoint import load_checkpoint

    faulty = with_fault(env, tmp_path, "disk-full")
    out = nlmm("train", "flickr8k", "--data", str(tiny_root), "--name", "full", "--epochs", "3",
               *TINY_DATA, *SMALL, env=faulty)
    assert out.returncode == 1
    run = store.get_run("full")
    assert run.status == "failed"
    reason = run.error.splitlines()[0]
    assert reason.startswith("could not write checkpoint") and "last.pt" in reason
    assert "No space left on device" in reason and "previous file there is kept" in reason
    assert " ".join(reason.split()) in " ".join(out.stdout.split())  # shown by the follower
    assert f"error: {reason}" in Path(run.log_path).read_text()
    folder = Path(run.log_path).parent / "checkpoints"
    assert load_checkpoint(folder / "last.pt")["progress"]["global_step"] == TINY_STEPS_PER_EPOCH
    assert not list(folder.glob(".*tmp*")), "the partial temp file must be removed"
    assert store.last_checkpoint(run.id).step == TINY_STEPS_PER_EPOCH
    assert_store_points_at_complete_files(run.id)


# ---- damaged checkpoints -----------------------------------------------------------------------

def flip_bits_in_the_weights(body: bytes) -> bytes:
    """`body` with 8 bytes inverted in the middle of its largest tensor's data (bit rot that
    torch.load alone would not notice)."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    start = largest.header_offset  # local header: 30 bytes, then the name and the extra field
    name_len, extra_len = struct.unpack("<HH", body[start + 26:start + 30])
    at = start + 30 + name_len + extra_len + largest.file_size // 2
    return body[:at] + bytes(b ^ 0xFF for b in body[at:at + 8]) + body[at + 8:]


def test_damaged_checkpoints_give_one_sentence_and_a_nonzero_exit(tiny_cache, env, tmp_path):
    import torch

    from nlmm.train.loop import Trainer

    cfg = tiny_config(*tiny.TINY_DATA, "vocab_size=300", "train.batch_size=8")
    run_dir = store.run_dir("damaged")
    good = Trainer(cfg, tiny_cache, torch.device("cpu"), run_dir,
                   NullSink()).checkpoint("last").path
    body = good.read_bytes()
    truncated, flipped = tmp_path / "truncated.pt", tmp_path / "flipped.pt"
    truncated.write_bytes(body[:len(body) // 2])
    flipped.write_bytes(flip_bits_in_the_weights(body))
    store.create_run("damaged", cfg.to_dict(), str(tiny_cache.path), "cpu", 1, None,
                     log_path=str(run_dir / "train.log"))
    good.write_bytes(flipped.read_bytes())  # the run's own last.pt, for --resume

    calls = {
        "eval flipped": ["eval", str(flipped), "--device", "cpu"],
        "search truncated": ["search", "a red circle", "--checkpoint", str(truncated),
                             "--device", "cpu"],
        "resume flipped": ["train", "--resume", "damaged", "--device", "cpu"],
    }
    wide = dict(env, COLUMNS="1000")  # one sentence, one line
    procs = {name: subprocess.Popen([*NLMM, *args], env=wide, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, args in calls.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, f"{name}: {stderr}"
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), f"{name}: {stderr}"
        assert "is corrupt or truncated" in lines[0] and lines[0].endswith("."), f"{name}: {stderr}"
    assert store.get_run("damaged").status == "queued", "--resume must refuse before starting"


# ---- four writers and a polling reader ---------------------------------------------------------

SOAK_KEYS = ("loss", "loss_i2t", "loss_i2a", "loss_t2a", "lr/fast", "triples_per_s")


def _soak_writer(url: str, run_id: int, seconds: float, start, results) -> None:
    """What a training worker writes: metric batches, heartbeats, host samples, checkpoints."""
    errors, written, step = [], 0, 0
    try:
        engine = store.get_engine(url)
        start.wait(60)
        store.set_status(run_id, "running", pid=os.getpid(), engine=engine)
        deadline = time.monotonic() + seconds
        next_beat = 0.0
        with store.MetricWriter(run_id, engine=engine, flush_seconds=0.25) as writer:
            while time.monotonic() < deadline:
                step += 1
                writer.log(step, step // 1000, {key: step / (i + 1) for i, key in enumerate(SOAK_KEYS)})
                written += len(SOAK_KEYS)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + 0.5
                    try:
                        store.heartbeat(run_id, step=step, engine=engine)
                        store.add_system_samples([{"run_id": run_id, "cpu_percent": 50.0,
                                                   "ram_used": 1, "ram_total": 2}], engine=engine)
                        if step % 4 == 0:
                            store.record_checkpoint(run_id, step, 0, f"/ckpt/{run_id}/last.pt",
                                                    "last", {"mean_r1": 1.0}, False, 1, engine=engine)
                    except Exception as exc:  # noqa: BLE001 - counted and reported to the test
                        errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.001)
        store.set_status(run_id, "finished", engine=engine)
    except Exception:  # noqa: BLE001 - reported to the test through the queue
        errors.append(traceback.format_exc())
    results.put(("writer", run_id, written, errors))


def _soak_reader(url: str, run_ids: list[int], start, stop, results) -> None:
    """What `nlmm dash` and `nlmm runs ls` ask, as fast as they can."""
    errors, polls = [], 0
    engine = store.get_engine(url)
    start.wait(60)
    while not stop.is_set():
        try:
            store.mark_lost(engine=engine)  # the sweep before a listing: may write
            store.list_runs(engine=engine)
            for run_id in run_ids:
                store.metric_series(run_id, "loss", max_points=200, engine=engine)
                store.latest_metrics(run_id, engine=engine)
                store.metric_keys(run_id, engine=engine)
                store.list_checkpoints(run_id, engine=engine)
            store.system_samples(limit=200, engine=engine)
            polls += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported to the test
            errors.append(f"{type(exc).__name__}: {exc}")
    results.put(("reader", None, polls, errors))


def run_soak(url: str, seconds: float, writers: int = 4) -> None:
    """`writers` worker-like processes and one polling reader on the store at `url` for
    `seconds`; asserts no error of any kind and every logged row stored exactly once."""
    engine = store.get_engine(url)
    run_ids = [store.create_run(f"soak{i}", {}, "", "cpu", 1, None, engine=engine).id
               for i in range(writers)]
    ctx = mp.get_context("spawn")
    start, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_soak_writer, args=(url, run_id, seconds, start, results))
             for run_id in run_ids]
    procs.append(ctx.Process(target=_soak_reader, args=(url, run_ids, start, stop, results)))
    for proc in procs:
        proc.start()
    start.set()
    reports = [results.get(timeout=seconds + 120) for _ in range(writers)]
    stop.set()
    reports.append(results.get(timeout=60))
    for proc in procs:
        proc.join(30)
    errors = [error for *_, errs in reports for error in errs]
    assert not [e for e in errors if "database is locked" in e], errors[:3]
    assert errors == []
    assert [proc.exitcode for proc in procs] == [0] * (writers + 1)
    polls = [count for kind, _, count, _ in reports if kind == "reader"][0]
    assert polls > 0
    with engine.connect() as conn:
        for kind, run_id, written, _ in reports:
            if kind != "writer":
                continue
            stored = conn.execute(text("SELECT count(*) FROM metrics WHERE run_id = :r"),
                                  {"r": run_id}).scalar_one()
            assert written > 0 and stored == written, (run_id, written, stored)
    print(f"soak {seconds:.0f} s: {sum(r[2] for r in reports if r[0] == 'writer')} rows by "
          f"{writers} writers, {polls} reader polls, no error")


def test_four_writers_and_a_reader_for_10s_lose_nothing_and_never_lock(isolated_store):
    """The default suite's 10 s soak; the 60 s one is test_..._for_60s (marked slow)."""
    run_soak(store.current_url(), seconds=10)


@pytest.mark.slow
def test_four_writers_and_a_reader_for_60s_lose_nothing_and_never_lock(isolated_store):
    run_soak(store.current_url(), seconds=60)


@pytest.mark.parametrize("name", ["best.pt", "last.pt", "epoch_003.pt"])
def test_a_damaged_checkpoint_alone_in_its_folder_points_to_no_other_file(tmp_path, name):
    # which other file is suggested when one opens: tests/test_dash_words.py
    from nlmm.errors import NlmmError
    from nlmm.inference.checkpoint import load_checkpoint

    path = tmp_path / "checkpoints" / name
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(NlmmError) as info:
        load_checkpoint(path)
    hint = str(info.value).split("; ", 1)[1]
    assert "restore the folder from a copy" in hint and ".pt" not in hint, hint
