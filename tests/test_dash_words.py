"""What a user reads when a run fails or ends, when `nlmm eval` names its checkpoint and when
checkpoints are damaged: one sentence each, said once, with advice that can be followed."""

from __future__ import annotations

import io

import torch
from rich.console import Console
from test_dash import T0, add_run, dash_store, make_app, plain, settle  # noqa: F401

from console.run.screen import RunScreen
from nlmm import store
from nlmm.cli.follow import _summary, for_the_terminal
from nlmm.errors import NlmmError
from nlmm.cli.reports import eval_table, run_details
from nlmm.inference.checkpoint import load_checkpoint, save_checkpoint

REASON = ("training diverged: 5 steps in a row had a non-finite loss or gradient; lower the "
          "learning rate (--lr) or set train.grad_clip, then start the run again.")
TRACEBACK = ('Traceback (most recent call last):\n  File "nlmm/train/loop.py", line 389, in '
             'train_step\n    raise NlmmError(\nnlmm.errors.NlmmError: ' + REASON)


def rendered(renderable: object, width: int = 200) -> str:
    console = Console(width=width, file=io.StringIO(), record=True)
    console.print(renderable)
    return console.export_text()


def failed_run() -> store.Run:
    """A run failed as the worker records it: the reason, a blank line, the traceback."""
    return add_run("diverged", "failed", steps=2, steps_total=60, epochs_total=30,
                   error=f"{REASON}\n\n{TRACEBACK}")


async def test_a_failed_run_shows_one_sentence_in_the_dash(dash_store):
    run = failed_run()
    app = make_app(now=T0 + 4000)
    async with app.run_test(size=(80, 24)) as pilot:
        app.push_screen(RunScreen(run.id))
        await settle(pilot)
        error = app.screen.query_one("#run-error")
        assert error.display
        assert " ".join(plain(error).split()) == REASON  # whole, wrapped at 80 columns
        assert "Traceback" not in plain(error)


def test_a_failed_run_shows_one_sentence_in_runs_show_and_the_terminal(dash_store):
    failed_run()
    shown = rendered(run_details("diverged"))
    assert shown.count("training diverged") == 1 and "Traceback" not in shown

    console = Console(width=400, file=io.StringIO(), record=True)
    assert _summary(store.get_run("diverged").id, console) == 1
    printed = console.export_text()
    assert printed.count("training diverged") == 1 and REASON in printed
    assert "Traceback" not in printed and "train.log" in printed


def test_an_error_stored_as_a_bare_traceback_gives_its_message(dash_store):
    add_run("oom", "failed", error="Traceback (most recent call last):\n  ...\n"
                                   "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB")
    shown = rendered(run_details("oom"))
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB" in shown
    assert "Traceback" not in shown


def test_a_piped_run_says_how_it_ended_once(dash_store):
    run = add_run("piped", "finished", steps=400)
    log = ["step 400/400 · epoch 4/4 · loss 0.2", "test (best dev checkpoint) mean_r1=23.5",
           "run piped finished"]
    shown = list(for_the_terminal(iter(log), "piped"))
    assert shown == log[:2]
    console = Console(width=200, file=io.StringIO(), record=True)
    assert _summary(run.id, console) == 0
    out = "\n".join([*shown, console.export_text()])
    assert out.count("piped finished") + out.count("piped: finished") == 1


def test_the_eval_title_keeps_the_checkpoint_path_whole():
    path = "/home/someone/projects/nlmm/runs/flickr8k-muon-lr3e-4/checkpoints/best.pt"
    results = {"split": "test", "checkpoint": path,
               "metrics": {"i2t_r1": 10.0, "i2t_r5": 30.0, "i2t_r10": 40.0, "mean_r1": 10.0}}
    lines = rendered(eval_table(results), width=100).splitlines()
    assert any(path in line for line in lines)  # on one line, not cut at the table's width
    assert any(line.strip() == "test Recall@K (%)" for line in lines)


def _save(path, step: int) -> None:
    save_checkpoint(path, {"model": {"w": torch.zeros(4)}, "progress": {"global_step": step}})


def _advice(path) -> str:
    try:
        load_checkpoint(path)
    except NlmmError as exc:
        return str(exc)
    raise AssertionError(f"{path} loaded")


def test_damaged_checkpoints_point_only_at_files_that_open(tmp_path):
    folder = tmp_path / "checkpoints"
    _save(folder / "best.pt", 10)
    _save(folder / "last.pt", 20)
    (folder / "best.pt").write_bytes(b"truncated")
    advice = _advice(folder / "best.pt")
    assert f"use {folder / 'last.pt'} (the latest weights)" in advice

    (folder / "last.pt").write_bytes(b"truncated too")
    _save(folder / "epoch_003.pt", 15)
    assert f"use {folder / 'epoch_003.pt'}" in _advice(folder / "last.pt")

    (folder / "epoch_003.pt").unlink()
    for name in ("best.pt", "last.pt"):
        advice = _advice(folder / name)
        assert "last.pt" not in advice.split(";")[1] and "best.pt" not in advice.split(";")[1]
        assert "restore the folder from a copy" in advice and "start the run over" in advice
        assert advice.endswith(".") and advice.count(";") == 1
