"""Which modules may pull in the training loop: only the worker and what trains in-process.

The dashboard, inference, search, the search server and the launcher run beside training
workers and never train themselves; importing the loop would load DDP and the data loader for
nothing and tie them to the Trainer's internals (console/__init__.py promises it never happens).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["console.app", "console.search.searchers", "nlmm.inference.load",
                                    "nlmm.search.engine", "nlmm.search.serve", "nlmm.train.launcher",
                                    "nlmm.cli.follow"])
def test_module_does_not_import_the_training_loop(module: str) -> None:
    script = (f"import sys, {module}\n"
              "print(sorted(m for m in ('nlmm.train.loop', 'nlmm.train.worker') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
