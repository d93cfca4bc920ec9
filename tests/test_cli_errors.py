"""What `nlmm` says when something goes wrong, what `--help` looks like at 80 columns, and what
`nlmm runs ls` imports: each through the real command in a subprocess."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from nlmm import store
from nlmm.cli.app import app

NLMM = [sys.executable, "-m", "nlmm.cli"]
# Names of the parser's exception classes, and its own "Error:" prefix: never shown to a user.
PARSER_WORDS = re.compile(r"MissingParameter|BadParameter|NoSuchOption|UsageError|"
                          r"BadOptionUsage|ValueError|Error:")


def start(*args: str, env: dict, cwd: Path | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*NLMM, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=kwargs.pop("stdin", subprocess.DEVNULL),
                            text=True, **kwargs)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture
def env(isolated_store) -> dict:
    return dict(os.environ, NLMM_RUNS_DIR=str(isolated_store), COLUMNS="80")


def assert_one_sentence(err: str, expected: str) -> None:
    assert len(err.strip().splitlines()) == 1, err  # one line, however long: no wrapping
    assert err.startswith("error: ") and expected in err, err
    assert not PARSER_WORDS.search(err), err


# ------------------------------------------------------------------------- command-line mistakes

MISTAKES = {
    ("data", "check"): "nlmm data check needs ROOT (corpus folder or manifest file, in any "
                       "layout nlmm reads); see `nlmm data check --help`.",
    ("export", "some-run"): "nlmm export needs --out (bundle folder to write); see "
                            "`nlmm export --help`.",
    ("train", "--lr", "-1"): "--lr must be at least 0.0, got '-1'; see `nlmm train --help`.",
    ("train", "--epochs", "two"): "--epochs must be a whole number, got 'two'",
    ("train", "--stepz", "3"): "nlmm train has no option --stepz (did you mean --steps?); see "
                               "`nlmm train --help`.",
    ("train", "--lr"): "--lr needs a value; see `nlmm train --help`.",
    ("eval", "some-run", "--split", "foo"): "--split must be one of dev, test, got 'foo'; see "
                                            "`nlmm eval --help`.",
    ("search", "a dog", "--split", "foo"): "--split must be one of train, dev, test, all, got "
                                           "'foo'",
    ("trian",): "nlmm has no command 'trian' (did you mean train?); see `nlmm --help`",
    ("runs", "list"): "nlmm runs has no command 'list'",
}


def test_command_line_mistakes_name_the_parameter_and_the_help(env):
    procs = {args: start(*args, env=env) for args in MISTAKES}
    for args, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 2, (args, err)
        assert out == ""
        assert_one_sentence(err, MISTAKES[args])


def test_a_store_file_that_is_not_a_database_is_named_with_what_to_do(env, isolated_store):
    isolated_store.mkdir(parents=True)
    (isolated_store / "nlmm.db").write_text("these are my notes, not a database\n")
    code, out, err = finish(start("runs", "ls", env=env))
    assert code == 1
    assert_one_sentence(err, f"the store file {isolated_store / 'nlmm.db'} is not an SQLite "
                             "database; move it away")
    assert "sqlalche.me" not in err and "sqlite3." not in err


def test_config_errors_name_the_overrides_actually_given(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 30\n")
    by_option = start("train", "--synthetic", "--image-size", "30", env=env, cwd=tmp_path)
    in_file = start("train", "--synthetic", "--config", str(bad), "--epochs", "2", env=env,
                    cwd=tmp_path)
    file_alone = start("model", "info", "--config", str(bad), env=env, cwd=tmp_path)
    expected = {by_option: "tiny_cpu.yaml with data.image_size=30: data.image_size=30 must be "
                           "a multiple of patch_size=16.",
                in_file: f"{bad} with train.epochs=2: d_model=30 must be divisible by n_heads=4",
                file_alone: f"{bad}: d_model=30 must be divisible"}
    for proc, message in expected.items():
        code, _, err = finish(proc)
        assert code == 1
        assert_one_sentence(err, message)
        assert "--set" not in err  # no --set was given


def test_a_long_url_in_a_message_stays_on_one_line(env):
    url = ("nosuchdb://someone@a-very-long-host-name-for-the-store.example.org:5432/"
           "nlmm_runs_database_name")
    code, _, err = finish(start("runs", "ls", env=dict(env, NLMM_DB_URL=url, COLUMNS="40")))
    assert code == 1
    assert_one_sentence(err, f"cannot use the database URL {url} ")


# ------------------------------------------------------------------------------------ runs rm

def run_on_a_terminal(args: list[str], answer: str, env: dict) -> tuple[int, str]:
    """`nlmm ARGS` with a terminal as stdin (so it may ask), typing `answer` to the question."""
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([*NLMM, *args], env=env, stdin=secondary,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        os.close(secondary)
        os.write(primary, answer.encode())
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(primary)
    return proc.returncode, out


@pytest.fixture
def two_runs(isolated_store) -> list[str]:
    for name in ("keep-me", "drop-me"):
        run = store.create_run(name, {}, "data", "cpu", epochs_total=1, steps_total=1)
        store.set_status(run.id, "finished")
        store.run_dir(name).mkdir(parents=True)
    return ["keep-me", "drop-me"]


def test_rm_checks_the_runs_before_asking_and_needs_yes_without_a_terminal(env, two_runs):
    code, out, err = finish(start("runs", "rm", "drop-me", "nosuch", env=env))
    assert code == 1 and out == ""  # no question asked
    assert_one_sentence(err, "no run named nosuch")
    code, out, err = finish(start("runs", "rm", "drop-me", env=env))
    assert code == 1 and out == ""
    assert_one_sentence(err, "not deleting drop-me: there is no terminal to confirm on; pass -y "
                             "to delete without asking.")
    assert store.find_run("drop-me") is not None

    code, out = run_on_a_terminal(["runs", "rm", "drop-me"], "n\n", env)
    assert code == 1 and "Delete drop-me and their checkpoints? [y/N]" in out
    assert "nothing deleted" in out and store.find_run("drop-me") is not None
    code, out = run_on_a_terminal(["runs", "rm", str(store.get_run("drop-me").id)], "y\n", env)
    assert code == 0 and "deleted drop-me" in out, out
    assert store.find_run("drop-me") is None and not store.run_dir("drop-me").exists()
    assert store.find_run("keep-me") is not None

    code, out, err = finish(start("runs", "rm", "-y", "keep-me", env=env))
    assert code == 0 and "deleted keep-me" in out and store.find_run("keep-me") is None


# --------------------------------------------------------------------------------------- help

def command_paths() -> list[tuple[str, ...]]:
    """Every group and command of the CLI, as the words that reach it."""
    paths, todo = [], [((), typer.main.get_command(app))]
    while todo:
        path, command = todo.pop()
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            todo.append(((*path, name), sub))
    return sorted(paths)


PYTHON_PLACEHOLDER = re.compile(r"<(?:bool|str|int|float|path|int range|float range|"
                                r"list\[[^>]*\]|[^<>\s]*\|[^<>\s]*)>")


def test_every_help_reads_at_80_columns(env):
    paths = command_paths()
    assert ("runs", "rm") in paths and ("train",) in paths
    procs = {path: start(*path, "--help", env=env) for path in paths}
    commands = {path: cmd for path, cmd in zip(paths, map(command_at, paths))}
    for path, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 0, (path, err)
        where = f"nlmm {' '.join(path)} --help"
        assert all(len(line) <= 80 for line in out.splitlines()), (where, out)
        assert "…" not in out and not PYTHON_PLACEHOLDER.search(out), (where, out)
        assert out.startswith(f"Usage: nlmm {' '.join(path)}".rstrip()), (where, out)
        flat = " ".join(out.split())
        for param in commands[path].params:
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("-"):  # every name of every option, whole
                    assert re.search(rf"(^|[\s,/]){re.escape(name)}([\s,/]|$)", out), \
                        (where, name)
        for name, sub in getattr(commands[path], "commands", {}).items():
            first = " ".join((sub.help or "").split("\n\n")[0].split())
            assert f"{name} {first}" in flat, (where, name)  # never cut with "..."


def command_at(path: tuple[str, ...]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


# ------------------------------------------------------------------------------------ imports

def test_runs_ls_imports_neither_torch_nor_sqlalchemy(env):
    from nlmm import store

    store.create_run("quick", {}, data="", device="cpu", epochs_total=1, steps_total=1)
    probe = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nlmm.cli", "runs", "ls"], env=env,
        capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert "quick" in probe.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in probe.stderr.splitlines()
                if line.startswith("import time:")}
    assert "nlmm.cli.reports" in imported  # the probe saw the command's own imports
    heavy = sorted(m for m in imported if m.split(".")[0] in (
        "torch", "torchvision", "torchaudio", "matplotlib", "yaml", "sqlalchemy", "sqlmodel"))
    assert not heavy, heavy
