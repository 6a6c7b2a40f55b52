"""Data-parallel training (DDP over gloo, 2 ranks on this CPU) equals one process with twice
the accumulation; rank 0 alone writes; unsupported sharded modes are refused; the collective
microbenchmark fits a curve; the launcher runs `nvfree train --nproc 2`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from estimator.errors import SetupError
from estimator.executor import distributed, launcher
from estimator.executor.data import stream_position
from estimator.executor.train import train
from estimator.specs import ModelSpec, TrainSetup

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[2]

TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, intermediate_size=176, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=258, max_seq_len=256)
CASES = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "weight_bits": 16},
}
STEPS = 3

WORKER = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from estimator.executor.train import train
from estimator.specs import ModelSpec, TrainSetup

spec = ModelSpec.model_validate_json(sys.argv[1])
jobs = json.loads(sys.argv[2])
dist.init_process_group("gloo")  # one group for both runs: train() uses it, leaves it open
rank = dist.get_rank()
for job in jobs:
    out = Path(job["output"])
    if job["per_rank_output"]:
        out = out / f"rank{rank}"
    for steps in job["steps"]:  # several: stop, then --resume to the next target
        report = train(spec, TrainSetup.model_validate(job["setup"]), max_steps=steps,
                       output_dir=out, data=Path(job["data"]), predict=False,
                       resume=steps != job["steps"][0], **job["options"])
        assert report.world_size == 2 and len(report.peak_bytes_per_rank) == 2, report
dist.destroy_process_group()
"""


def _setup(case: str, **kwargs) -> TrainSetup:
    return TrainSetup(**{"compute_dtype": "fp32", "batch_size": 2, "seq_len": 32,
                         "lora_rank": 4, **CASES[case], **kwargs})


def _torchrun(args: list[str], nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--standalone", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, text_file):
    """Both cases trained by 2 ranks × accumulation 1 (one torchrun, one process group)."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "worker.py"
    script.write_text(WORKER)
    jobs = [{"output": str(root / case), "per_rank_output": case == "full",
             "setup": _setup(case, grad_accum=1, num_devices=2).model_dump(mode="json"),
             "steps": [STEPS], "data": str(text_file), "options": {"lr": 1e-2}}
            for case in CASES]
    jobs.append({**jobs[0], "output": str(root / "resumed"), "per_rank_output": False,
                 "steps": [1, STEPS]})
    jobs.append({"output": str(root / "nan"), "per_rank_output": False, "steps": [30],
                 "setup": _setup("full", optimizer="sgd", compute_dtype="fp16",
                                 mixed_precision=False, num_devices=2).model_dump(mode="json"),
                 "data": str(text_file),
                 "options": {"lr": 1e3, "max_grad_norm": 0.0, "warmup_steps": 1,
                             "checkpoint_every": 1}})
    done = _torchrun([str(script), TINY.model_dump_json(), json.dumps(jobs)])
    assert done.returncode == 0, done.stderr[-3000:]
    return {"full": root / "full" / "rank0", "lora": root / "lora"}, root


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_with_twice_the_accumulation(two_rank_runs, text_file,
                                                                tmp_path, case):
    outputs, _ = two_rank_runs
    single = train(TINY, _setup(case, grad_accum=2), max_steps=STEPS, output_dir=tmp_path,
                   data=text_file, lr=1e-2, predict=False)
    report = json.loads((outputs[case] / "run_report.json").read_text())
    assert report["world_size"] == 2 and single.world_size == 1
    assert report["num_tokens"] == single.num_tokens  # global tokens: 2 × 1 × 2 = 1 × 2 × 2
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(single.losses),
                               rtol=1e-5, atol=1e-6)
    ours = load_file(Path(report["checkpoint_dir"]) / "model.safetensors")
    theirs = load_file(Path(single.checkpoint_dir) / "model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    if case == "lora":
        assert all("lora" in name for name in ours)  # only the adapters were trained/saved
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert report["communication_seconds"] is not None and report["communication_seconds"] > 0
    assert max(report["peak_bytes_per_rank"]) == report["peak_bytes"]


def test_only_rank_zero_writes(two_rank_runs):
    _, root = two_rank_runs
    assert (root / "full" / "rank0" / "run_report.json").is_file()
    assert not (root / "full" / "rank1").exists()  # rank 1 got its own --output: untouched


def test_two_ranks_resume_exactly(two_rank_runs):
    _, root = two_rank_runs
    straight = json.loads((root / "full" / "rank0" / "run_report.json").read_text())
    resumed = json.loads((root / "resumed" / "run_report.json").read_text())
    assert resumed["start_step"] == 1 and resumed["losses"] == straight["losses"]
    ours = load_file(Path(resumed["checkpoint_dir"]) / "model.safetensors")
    theirs = load_file(Path(straight["checkpoint_dir"]) / "model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_nonfinite_step_stops_every_rank_without_saving_it(two_rank_runs):
    _, root = two_rank_runs  # the torchrun returned 0: no rank hung or crashed
    report = json.loads((root / "nan" / "run_report.json").read_text())
    assert report["stop_reason"] == "nonfinite_loss" and report["num_steps"] < 30
    assert "last good checkpoint" in report["message"]
    assert all(torch.isfinite(torch.tensor(report["losses"])))


def test_ranks_read_disjoint_slices_that_tile_one_process():
    one = {stream_position(s, m, batch_size=2, grad_accum=4) for s in range(3) for m in range(4)}
    two = [stream_position(s, m, batch_size=2, grad_accum=2, rank=r, world_size=2)
           for s in range(3) for r in range(2) for m in range(2)]
    assert len(set(two)) == len(two) and set(two) == one


def test_sharded_modes_and_a_wrong_device_count_are_refused(tmp_path, text_file):
    with pytest.raises(SetupError, match="planned only") as err:
        train(TINY, _setup("full", zero_stage=1), max_steps=1, output_dir=tmp_path,
              data=text_file, predict=False)
    assert "\n" not in str(err.value)
    with pytest.raises(SetupError, match="--nproc"):
        train(TINY, _setup("full", num_devices=2), max_steps=1, output_dir=tmp_path,
              data=text_file, predict=False)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_threads_and_backends():
    assert distributed.threads_per_rank(2, cores=2) == 1
    assert distributed.threads_per_rank(3, cores=2) == 1
    assert distributed.threads_per_rank(2, cores=16) == 8
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda") == "nccl"
    with pytest.raises(SetupError):
        distributed.backend_for("mps")
    command = launcher.torchrun_command(["train", "--nproc", "2"], 2, nnodes=2, node_rank=1,
                                           rdzv_endpoint="10.0.0.1:29500")
    assert "--nnodes=2" in command and "--rdzv-endpoint=10.0.0.1:29500" in command
    assert command[command.index("-m", 3):] == ["-m", "estimator", "train", "--nproc-per-node",
                                                "2"]
    with pytest.raises(SetupError, match="rdzv-endpoint"):
        launcher.torchrun_command([], 2, nnodes=2)


def test_collective_bench_fits_a_curve():
    from estimator.calibrate.collectives import collective_curves

    curves = collective_curves(quick=True, sizes=[4096, 65536])
    assert sorted(curves) == ["collective.all_gather", "collective.all_reduce",
                              "collective.reduce_scatter"]
    for curve in curves.values():
        assert curve.unit == "bytes" and curve.num_samples >= 2 and curve.rates[0] > 0


def test_nvfree_train_nproc_2_launches_torchrun_and_renders_rank_0s_report(tmp_path, text_file):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 258, "max_position_embeddings": 256}))
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "estimator", "train", "--model", str(config), "--method", "qlora",
         "--bits", "4", "--dtype", "fp32", "--seq-len", "32", "--batch-size", "2",
         "--max-steps", "2", "--data", str(text_file), "-o", str(out), "--nproc", "2",
         "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # the launcher prints rank 0's report
    assert report["world_size"] == 2 and report["setup"]["num_devices"] == 2
    assert report["num_threads"] == distributed.threads_per_rank(2)  # cores split by 2
    assert report["stop_reason"] == "max_steps" and len(report["losses"]) == 2
    assert json.loads((out / "run_report.json").read_text()) == report
