"""A killed `nvfree validate` leaves no training run behind: its runs get SIGTERM when it dies
(children.set_parent_death_signal), finish their step, save and exit. Before, a validate
stopped mid-suite left its `nvfree train` child training for 20 minutes, timesharing the core
with whatever ran next."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.torch

PARENT = """
import sys
from pathlib import Path
from estimator.validation import run_case
from estimator.validation_suites import Case
run_case(Case("c", "small-vocab", ("--method", "full", "--dtype", "fp32", "-b", "1", "-s", "32"),
              max_steps=100000), Path(sys.argv[1]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_killed_validate_takes_its_training_run_with_it(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline:
            time.sleep(0.2)
            children = psutil.Process(parent.pid).children()
        assert children, "the training run did not start"
        child = children[0]
        os.kill(parent.pid, signal.SIGKILL)  # no handler, no cleanup: only the kernel's signal
        parent.wait()
        gone, alive = psutil.wait_procs([child], timeout=60)
        assert gone and not alive
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            p.kill()
