"""The launcher: `launch(argv, nproc, …)` re-executes `python -m estimator ARGV` under
`python -m torch.distributed.run` and owns what it started. torchrun runs in its own session
(a terminal's Ctrl-C reaches the launcher only; torchrun starts each rank in a session of its
own). SIGINT, SIGTERM and SIGHUP to the launcher are passed on to every rank (each finishes its
step, rank 0 saves a checkpoint, the ranks agree on the stop, exit 0, and torchrun ends
cleanly); a second signal goes to torchrun, which stops the ranks itself. torchrun dies with
the launcher (PR_SET_PDEATHSIG) and every rank with torchrun (die_with_parent, called by the
worker); and when torchrun has exited, any process it started that is still alive is stopped
(SIGTERM, then SIGKILL after a grace period), so no rank is left training as an orphan.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

from estimator.children import set_parent_death_signal
from estimator.errors import SetupError
from estimator.executor.distributed import threads_per_rank


def torchrun_command(argv: list[str], nproc: int, *, nnodes: int = 1, node_rank: int | None = None,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "nvfree") -> list[str]:
    """`python -m torch.distributed.run … -m estimator ARGV`: standalone on one machine, a c10d
    rendezvous at rdzv_endpoint (host:port) over nnodes machines."""
    if nproc < 1 or nnodes < 1:
        raise SetupError("--nproc and --nnodes must be at least 1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1 and rdzv_endpoint is None:
        command.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise SetupError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (a machine all "
                             "nodes reach; run the same command on every node)")
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
        if node_rank is not None:
            command.append(f"--node-rank={node_rank}")
    return [*command, "-m", "estimator", *[_unambiguous(arg) for arg in argv]]


def _unambiguous(arg: str) -> str:
    """torchrun's argparse rejects, even after the script name, an option that abbreviates two
    of its own ('--nproc' → --nproc-per-node / --nproc_per_node): pass the full spelling,
    which the nvfree command accepts as an alias."""
    name, sep, value = arg.partition("=")
    return f"--nproc-per-node{sep}{value}" if name == "--nproc" else arg


REAP_GRACE_SECONDS = 30.0
"""How long a worker left alive after torchrun exited gets to stop after SIGTERM (torchrun's own
grace period is the same) before SIGKILL."""
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def die_with_parent() -> None:
    """In a torchrun worker: get SIGTERM (a graceful stop: the step finishes, a checkpoint is
    saved) when torchrun exits, so a killed torchrun leaves no rank training. If torchrun is
    already gone, stop now."""
    parent = os.getppid()
    if set_parent_death_signal(signal.SIGTERM) and os.getppid() != parent:
        raise SystemExit(128 + signal.SIGTERM)


def _ranks(pid: int) -> list[int]:
    """The processes torchrun started directly: the ranks of this machine."""
    import psutil

    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(pid).children()]
    return []


@contextlib.contextmanager
def _forwarding(process: subprocess.Popen) -> Iterator[None]:
    """While the block runs, SIGINT/SIGTERM/SIGHUP to this process are passed on: the first to
    every rank (each finishes its step, rank 0 saves, the ranks agree on the stop and exit 0,
    so torchrun ends cleanly), a second one (or one before the ranks exist) to torchrun, which
    stops them itself. The launcher keeps waiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        ranks = _ranks(process.pid) if len(received) == 1 else []
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not ranks and process.poll() is None:
            process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _descendants(pid: int) -> dict[int, float]:
    """Every process below `pid` now: pid → creation time (to tell a reused pid apart)."""
    import psutil

    found = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                found[child.pid] = child.create_time()
    return found


def reap(seen: dict[int, float], grace_seconds: float = REAP_GRACE_SECONDS) -> list[int]:
    """Stop the processes of `seen` (pid → creation time) that are still alive: SIGTERM, then
    SIGKILL after grace_seconds. Returns the pids that had to be stopped."""
    import psutil

    alive = []
    for pid, created in seen.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, still = psutil.wait_procs(alive, timeout=grace_seconds)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(still, timeout=5)
    return [proc.pid for proc in alive]


def _wait(process: subprocess.Popen, poll_seconds: float = 0.5) -> int:
    """Wait for torchrun, noting its workers as they appear; then stop any it left alive."""
    seen: dict[int, float] = {}
    while True:
        try:
            code = process.wait(timeout=poll_seconds)
            break
        except subprocess.TimeoutExpired:
            seen.update(_descendants(process.pid))
        except KeyboardInterrupt:  # a SIGINT outside _forwarding: torchrun has it too
            continue
    reap(seen)
    return code


def launch(argv: list[str], nproc: int, nnodes: int = 1, *, node_rank: int | None = None,
           rdzv_endpoint: str | None = None, rdzv_id: str = "nvfree",
           env: dict[str, str] | None = None) -> int:
    """Run `nvfree ARGV` in nproc processes per node under torchrun and wait; returns
    torchrun's exit code. ARGV reaches the workers unchanged except '--nproc', spelled
    '--nproc-per-node' (see _unambiguous: the command must accept both).
    OMP_NUM_THREADS is set to cores // nproc (the workers set torch's threads the same way).
    Signals to this process are forwarded to torchrun, which stops the workers; this process
    keeps waiting so the caller can read what they wrote (see the module docstring)."""
    command = torchrun_command(argv, nproc, nnodes=nnodes, node_rank=node_rank,
                               rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    environment = {**os.environ, **(env or {})}
    environment.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    process = subprocess.Popen(command, env=environment, start_new_session=True,
                               preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM))
    with _forwarding(process):
        return _wait(process)
