"""A non-editable install (a wheel, as `pip install .` makes) carries the shipped configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from nlmm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# What a wheel is built from; copied so the build's own folders (build/, *.egg-info) stay out
# of the checkout. `symlinks=True` keeps nlmm/configs the link it is in the repository.
SOURCES = ("pyproject.toml", "README.md", "nlmm", "console", "configs")


def test_a_wheel_install_resolves_a_named_config_from_anywhere(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, src / name)
    assert (src / "nlmm" / "configs").is_symlink(), "nlmm/configs must link to configs/"
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr

    packaged = target / "nlmm" / "configs"
    assert not packaged.is_symlink() and packaged.is_dir()
    assert sorted(p.name for p in packaged.glob("*.yaml")) == \
        sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))

    # Run from an empty folder (no ./configs to fall back on), importing only the install.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import nlmm, nlmm.config as c; cfg = c.resolve_config('flickr8k'); "
            "print(nlmm.__file__); print(cfg.train.epochs, cfg.d_model)")
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONNOUSERSITE="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    module_file, figures = done.stdout.strip().splitlines()
    assert Path(module_file).is_relative_to(target), module_file
    expected = load_config(ROOT / "configs" / "flickr8k.yaml")
    assert figures == f"{expected.train.epochs} {expected.d_model}"
