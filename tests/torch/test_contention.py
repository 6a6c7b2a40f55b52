"""Contention detection with a real busy neighbour: CPU-burning subprocesses (one per CPU,
a few seconds) make the calibration see, re-time and refuse (calibrate/contention.py,
runner.py, run.py)."""

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from estimator.calibrate import benches, run, suite  # noqa: E402
from estimator.calibrate.contention import (  # noqa: E402
    Monitor,
    ReferenceKernel,
    cpu_snapshot,
    others_busy_fraction,
)
from estimator.calibrate.runner import Runner  # noqa: E402

pytestmark = pytest.mark.torch

BURN = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


@contextlib.contextmanager
def busy_neighbours(seconds: float = 6.0):
    """One CPU-burning process per CPU for at most `seconds`; stopped (by pid) on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN.format(s=seconds)])
             for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)  # let them start spinning
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_others_cpu_time_is_seen_while_a_neighbour_burns():
    with busy_neighbours(3.0):
        start = cpu_snapshot()
        time.sleep(0.5)
        fraction = others_busy_fraction(start, cpu_snapshot())
    assert fraction > 0.5  # sleeping here, the burners had (nearly) every CPU


@pytest.mark.xfail(strict=False, reason=(
    "flaky on 2-core VMs: real neighbours do not always slow a run of microsecond points "
    "(2026-12-07: in 2 of 4 tiny runs under one burner per CPU every reference GEMM ran at "
    "full speed and the CPU accounting saw no other process); issue 19"))
def test_a_point_timed_next_to_a_burning_neighbour_is_disturbed():
    case = benches.gemm_cases("fp32", [(64, 128, 128)], "matmul.fp32")[0]
    settings = replace(suite.SETTINGS["tiny"], max_retries=1, max_wait_seconds=0.3,
                       retry_until_seconds=60.0)
    reference = ReferenceKernel("cpu")
    runner = Runner("cpu", settings, reference)
    with busy_neighbours(4.0):
        point = runner.measure(case, runner.retries_left())
    # seen by the others' CPU share or by the slowed reference GEMM (a point shorter than
    # /proc/stat's 10 ms ticks can show a share of 0)
    assert point.disturbed
    assert runner.num_retimed == 1  # re-timed once after waiting (in vain) for idle CPUs
    with Monitor(reference) as monitor:
        torch.mm(torch.ones(64, 64), torch.ones(64, 64))
    assert monitor.result().reference_rate > 0


def _few_cases(mode, device, model=None):
    """A three-case suite (a GEMM overhead probe and one shape) so the run takes a second."""
    return [benches.gemm_overhead_case("fp32", "matmul.fp32"),
            *benches.gemm_cases("fp32", [(64, 128, 128)], "matmul.fp32")]


@pytest.mark.xfail(strict=False, reason=(
    "flaky on 2-core VMs: real neighbours do not always slow a run of microsecond points "
    "(2026-12-07: in 2 of 4 tiny runs under one burner per CPU every reference GEMM ran at "
    "full speed and the CPU accounting saw no other process); issue 19"))
def test_a_disturbed_run_is_refused_and_keeps_the_previous_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("NVFREE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run, "plan", _few_cases)
    quiet = run.calibrate("cpu", "tiny", force=True)  # stored whatever the machine does
    assert quiet.path is not None
    before = quiet.path.read_text()
    with busy_neighbours(6.0):
        busy = run.calibrate("cpu", "tiny")
    # the neighbours are seen (a point of a few microseconds can fall between their time
    # slices: most, not every one, is marked — seen in a quiet CI run)
    seen = [p for p in busy.measurements if p.disturbed]
    assert busy.measurements and len(seen) >= len(busy.measurements) / 2
    if quiet.profile.quality.level == "quiet":  # a quiet first run: its points are kept
        assert busy.refusal is None and busy.profile.quality.level == "merged"
        assert busy.profile.quality.num_from_previous == len(seen)
        before_seconds = {(p.op_class, p.label): p.seconds for p in quiet.profile.points}
        kept = {(p.op_class, p.label): p.seconds for p in busy.profile.points}
        assert all(kept[(p.op_class, p.label)] == before_seconds[(p.op_class, p.label)]
                   for p in seen)  # no disturbed timing replaced a quiet one
    else:  # a busy CI machine: both disturbed, the new one is refused
        assert busy.path is None and busy.refusal.startswith("calibration disturbed: ")
        assert "the previous profile is kept" in busy.refusal
        assert quiet.path.read_text() == before


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from estimator.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_calibrate_cli_refuses_with_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    """`nvfree calibrate` on a busy machine: exit code 2, the reason as one line, nothing
    stored; --force stores it marked disturbed. The CLI contract, on a machine made busy for
    certain: the CPU accounting reports others on 60 % of the CPUs at every point (real
    neighbours do not always slow a run of microsecond points: the two tests above)."""
    from estimator.calibrate import contention

    monkeypatch.setenv("NVFREE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(run, "plan", _few_cases)
    monkeypatch.setattr(suite, "executor_elementwise", lambda mode, device: False)
    monkeypatch.setattr(run, "SETTINGS", {**run.SETTINGS, "quick": run.SETTINGS["tiny"]})
    monkeypatch.setattr(contention, "others_busy_fraction", lambda start, end: 0.6)
    code, out, err = _cli(capsys, "calibrate", "--quick", "--json")
    forced_code, forced_out, _ = _cli(capsys, "calibrate", "--quick", "--json", "--force")
    assert code == 2, err
    payload = json.loads(out)
    assert payload["stored"] is False and payload["refusal"].startswith("calibration disturbed")
    assert payload["refusal"] in err and "Traceback" not in err
    assert forced_code == 0
    stored = json.loads(forced_out)
    assert stored["stored"] and stored["profile"]["quality"]["level"] == "disturbed"
