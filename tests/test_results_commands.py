"""eval / export / plot / runs compare on a run trained in the test and registered in the store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import nlmm.inference.export
from tiny import tiny_config
from nlmm import store
from nlmm.train.loop import Trainer

NLMM = [sys.executable, "-m", "nlmm.cli"]


@pytest.fixture
def trained_run(synth_cache, isolated_store):
    cfg = tiny_config("train.batch_size=16", "train.log_every=1", "train_steps=4")
    run = store.create_run("done", cfg.to_dict(), str(synth_cache.path), "cpu", epochs_total=1,
                           steps_total=4, log_path=str(store.run_dir("done") / "train.log"))
    writer = store.MetricWriter(run.id)

    def on_checkpoint(ev):
        writer.flush()
        store.record_checkpoint(run.id, ev.progress.global_step, ev.progress.epoch, str(ev.path),
                                ev.kind, ev.metrics, ev.kind == "best", ev.nbytes)

    trainer = Trainer(cfg, synth_cache, torch.device("cpu"), store.run_dir("done"), writer,
                      on_checkpoint, log=lambda m: None)
    trainer.fit()
    writer.close()
    store.set_status(run.id, "finished")
    return run, trainer


def run_cli(*args, env):
    return subprocess.run([*NLMM, *args], capture_output=True, text=True, env=env, timeout=180)


def test_eval_json_export_snippet_plot_and_compare(trained_run, isolated_store, tmp_path):
    run, trainer = trained_run
    env = dict(os.environ, NLMM_RUNS_DIR=str(isolated_store), COLUMNS="200")

    out = run_cli("eval", "done", "--split", "test", "--json", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    metrics = result["metrics"]
    assert len([k for k in metrics if re.fullmatch(r"[ita]2[ita]_r(1|5|10)", k)]) == 18
    assert result["checkpoint"].endswith("best.pt")
    assert all(0.0 <= v <= 100.0 for v in metrics.values())

    bundle = tmp_path / "bundle"
    assert run_cli("export", "done", "--out", str(bundle), env=env).returncode == 0
    assert {p.name for p in bundle.iterdir()} >= {"model.safetensors", "config.yaml",
                                                  "tokenizer.json", "bundle.json"}
    # the loading snippet documented in nlmm.inference.export runs as written, in a fresh process
    snippet = re.search(r"Loading a bundle.*?\n\n(.*?)\n\"\"\"", nlmm.inference.export.__doc__ + '\n"""',
                        re.S)
    code = "import torch\n" + "\n".join(line[4:] for line in snippet.group(1).splitlines())
    code = code.replace('"bundle/"', repr(str(bundle)))
    code += "\nprint(tuple(emb.shape), float(emb.norm()))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shape, norm = done.stdout.strip().rsplit(" ", 1)
    assert shape == "(1, 32)"
    assert abs(float(norm) - 1.0) < 1e-4
    # the bundle gives the same embedding as the trained model
    loaded = nlmm.load_bundle(bundle)
    ids = torch.tensor([[5, 6, 7, 0]])
    trainer.model.eval()
    torch.testing.assert_close(loaded.model.encode("text", ids, ids != 0),
                               trainer.model.encode("text", ids, ids != 0))

    png = tmp_path / "curves.png"
    assert run_cli("plot", "done", "--out", str(png), env=env).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    compare = run_cli("runs", "compare", "done", "done", env=env)
    assert compare.returncode == 0 and "mean_r1" in compare.stdout

    bad = run_cli("eval", str(tmp_path / "missing.pt"), env=env)
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    bad = run_cli("eval", str(junk), env=env)
    assert bad.returncode == 1 and "corrupt or truncated" in bad.stderr
    assert "Traceback" not in bad.stderr
