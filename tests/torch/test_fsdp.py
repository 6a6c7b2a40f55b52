"""ZeRO-3 on FSDP2 over gloo (2 ranks on this CPU) equals one process with twice the
accumulation (full fine-tune, LoRA, and QLoRA with its NF4 base replicated: per-step losses and
final parameters within rtol 1e-5, which also proves the gloo reduce-scatter averages,
pytorch#162338); its sharded DCP
checkpoints resume on 2 ranks and on 1 rank to the uninterrupted curve; the PEFT adapter is
exported; what FSDP2 here does not run is refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from estimator.errors import SetupError
from estimator.executor.checks import check_runnable
from estimator.executor.train import train
from estimator.specs import ModelSpec, TrainSetup

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[2]

TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, intermediate_size=176, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=258, max_seq_len=256)
CASES = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "weight_bits": 16},
    "qlora": {"method": "qlora", "weight_bits": 4},
}
SCALE_SENSITIVE = {"optimizer": "sgd"}
"""The equivalence runs use plain SGD without clipping: AdamW and norm clipping are blind to
a gradient scaled by the world size (pytorch#162338's symptom); SGD's update is not."""
STEPS = 3

WORKER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from estimator.executor.train import train
from estimator.specs import ModelSpec, TrainSetup

spec = ModelSpec.model_validate_json(sys.argv[1])
dist.init_process_group("gloo")  # one group for every run: train() uses it, leaves it open
for job in json.loads(sys.argv[2]):
    for steps in job["steps"]:  # several: stop, then --resume to the next target
        report = train(spec, TrainSetup.model_validate(job["setup"]), max_steps=steps,
                       output_dir=Path(job["output"]), data=Path(job["data"]), predict=False,
                       resume=job.get("resume", False) or steps != job["steps"][0], lr=1e-2,
                       **job["options"])
        assert report.world_size == 2 and len(report.peak_bytes_per_rank) == 2, report
dist.destroy_process_group()
"""


def _setup(case: str, **kwargs) -> TrainSetup:
    return TrainSetup(**{"compute_dtype": "fp32", "batch_size": 2, "seq_len": 32,
                         "lora_rank": 4, **CASES[case], **kwargs})


def _sharded(case: str, **kwargs) -> dict:
    return _setup(case, **{"grad_accum": 1, "num_devices": 2, "zero_stage": 3,
                           **kwargs}).model_dump(mode="json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_file):
    """One torchrun, 2 ranks × accumulation 1 × ZeRO-3: both cases straight to STEPS with SGD
    and with AdamW, the AdamW full fine-tune stopped at 1 and resumed to STEPS, and the AdamW
    LoRA stopped at step 1 (resumed on 1 rank by the test)."""
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "worker.py"
    script.write_text(WORKER)
    data = str(text_file)
    train(TINY, _setup("full", grad_accum=2), max_steps=1, output_dir=root / "from-single",
          data=text_file, lr=1e-2, predict=False)  # a single-process checkpoint at step 1
    jobs = [{"output": str(root / f"{case}-sgd"), "setup": _sharded(case, **SCALE_SENSITIVE),
             "steps": [STEPS], "data": data, "options": {"max_grad_norm": 0.0}}
            for case in CASES]
    jobs.append({**jobs[0], "output": str(root / "accum-ckpt"),
                 "setup": _sharded("full", grad_accum=2, checkpointing=True,
                                   **SCALE_SENSITIVE)})
    jobs += [{**jobs[0], "output": str(root / f"offload-{case}"),
              "setup": _sharded(case, offload="optimizer_and_params", **SCALE_SENSITIVE)}
             for case in ("full", "lora")]
    jobs.append({**jobs[0], "output": str(root / "bf16"),
                 "setup": _sharded("full", compute_dtype="bf16", **SCALE_SENSITIVE)})
    jobs += [{"output": str(root / name), "setup": _sharded(case), "steps": steps,
              "data": data, "options": {}}
             for name, case, steps in (("full", "full", [STEPS]), ("lora", "lora", [STEPS]),
                                       ("resumed", "full", [1, STEPS]), ("half", "lora", [1]),
                                       ("from-single", "full", [STEPS]))]
    jobs[-1]["resume"] = True  # 2 sharded ranks continue the single-process checkpoint
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
         str(script), TINY.model_dump_json(), json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


def _report(path: Path) -> dict:
    return json.loads((path / "run_report.json").read_text())


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trained parameters by name: safetensors, or the DCP shards merged."""
    if (checkpoint / "model.safetensors").is_file():
        return load_file(checkpoint / "model.safetensors")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    merged = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "dcp", merged)
    state = torch.load(merged, weights_only=False)["model"]
    return dict(state)


@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_ranks_equal_one_process_with_twice_the_accumulation(runs, text_file,
                                                                        tmp_path, case):
    single = train(TINY, _setup(case, grad_accum=2, **SCALE_SENSITIVE), max_steps=STEPS,
                   output_dir=tmp_path, data=text_file, lr=1e-2, max_grad_norm=0.0,
                   predict=False)
    report = _report(runs / f"{case}-sgd")
    assert report["world_size"] == 2 and report["setup"]["zero_stage"] == 3
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(single.losses),
                               rtol=1e-5, atol=1e-6)
    checkpoint = Path(report["checkpoint_dir"])
    assert (checkpoint / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (checkpoint / "dcp").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    ours, theirs = _weights(checkpoint), load_file(Path(single.checkpoint_dir)
                                                    / "model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    if case in ("lora", "qlora"):
        assert all("lora" in name for name in ours)  # only the adapters are saved
        adapter = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
        single_adapter = load_file(Path(single.checkpoint_dir) / "adapter"
                                   / "adapter_model.safetensors")
        assert adapter.keys() == single_adapter.keys()
        for name in adapter:
            torch.testing.assert_close(adapter[name], single_adapter[name], rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("case", ["full", "lora"])
def test_cpu_offload_equals_one_process(runs, text_file, tmp_path, case):
    """--offload optimizer_and_params: FSDP2's CPUOffloadPolicy on every module, the optimizer
    over the host shards. On CPU ranks the host is the device (the copies are no-ops), so this
    proves the wiring and the step over offloaded shards, not the transfers."""
    single = train(TINY, _setup(case, grad_accum=2, **SCALE_SENSITIVE), max_steps=STEPS,
                   output_dir=tmp_path, data=text_file, lr=1e-2, max_grad_norm=0.0,
                   predict=False)
    report = _report(runs / f"offload-{case}")
    assert report["setup"]["offload"] == "optimizer_and_params"
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(single.losses),
                               rtol=1e-5, atol=1e-6)
    ours = _weights(Path(report["checkpoint_dir"]))
    theirs = load_file(Path(single.checkpoint_dir) / "model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_collectives_are_timed(runs):
    """Every all-gather and reduce-scatter of a gloo step is timed (CommTimer through FSDP2's
    custom comms): a positive median per step, for every sharded run."""
    for name in ("full-sgd", "lora-sgd", "offload-full", "accum-ckpt"):
        seconds = _report(runs / name)["communication_seconds"]
        assert seconds is not None and seconds > 0, name


def test_accumulation_and_checkpointing_under_zero3_equal_one_process(runs, text_file,
                                                                        tmp_path):
    """2 ranks × accumulation 2 with activation checkpointing (a reduce-scatter per
    micro-batch into the sharded gradients) = 1 process × accumulation 4."""
    single = train(TINY, _setup("full", grad_accum=4, **SCALE_SENSITIVE), max_steps=STEPS,
                   output_dir=tmp_path, data=text_file, lr=1e-2, max_grad_norm=0.0,
                   predict=False)
    report = _report(runs / "accum-ckpt")
    assert report["setup"]["checkpointing"] and report["num_tokens"] == single.num_tokens
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(single.losses),
                               rtol=1e-5, atol=1e-6)
    ours = _weights(Path(report["checkpoint_dir"]))
    theirs = load_file(Path(single.checkpoint_dir) / "model.safetensors")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_mixed_precision_policy_follows_one_process(runs, text_file, tmp_path):
    """bf16 mixed precision: FSDP2 gathers bf16 copies of the fp32 shards and reduces in fp32;
    one process autocasts the same matmuls. Not bit-equal (the norms' weights are gathered in
    bf16 too), close."""
    single = train(TINY, _setup("full", grad_accum=2, compute_dtype="bf16", **SCALE_SENSITIVE),
                   max_steps=STEPS, output_dir=tmp_path, data=text_file, lr=1e-2,
                   max_grad_norm=0.0, predict=False)
    report = _report(runs / "bf16")
    assert report["setup"]["mixed_precision"] and report["setup"]["compute_dtype"] == "bf16"
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(single.losses),
                               rtol=2e-2, atol=0)
    ours = _weights(Path(report["checkpoint_dir"]))
    assert all(value.dtype == torch.float32 for value in ours.values())  # fp32 master shards


def test_nvfree_train_nproc_2_zero_3(tmp_path, text_file):
    """The command: `nvfree train --nproc 2 --zero 3` launches torchrun, the ranks shard, the
    launcher renders rank 0's report with both ranks' peaks and the sharded prediction."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 258, "max_position_embeddings": 256}))
    done = subprocess.run(
        [sys.executable, "-m", "estimator", "train", "--model", str(config), "--method", "lora",
         "--dtype", "fp32", "--seq-len", "32", "--batch-size", "2", "--max-steps", "2",
         "--data", str(text_file), "-o", str(tmp_path / "run"), "--nproc", "2", "--zero", "3",
         "--json"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["setup"]["zero_stage"] == 3 and report["world_size"] == 2
    assert len(report["peak_bytes_per_rank"]) == 2 and report["stop_reason"] == "max_steps"
    terms = {t["name"]: t for t in report["memory_terms"]}
    assert terms["total_peak"]["predicted_bytes"] > 0  # the per-device ZeRO-3 prediction
    refused = subprocess.run(
        [sys.executable, "-m", "estimator", "train", "--model", str(config), "--nproc", "2",
         "--zero", "2", "--max-steps", "1", "-o", str(tmp_path / "z2")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert refused.returncode == 2 and "planned only" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_sharded_resume_on_two_ranks_gives_the_uninterrupted_curve(runs):
    straight, resumed = _report(runs / "full"), _report(runs / "resumed")
    assert resumed["start_step"] == 1
    torch.testing.assert_close(torch.tensor(resumed["losses"]),
                               torch.tensor(straight["losses"]), rtol=1e-6, atol=0)
    ours = _weights(Path(resumed["checkpoint_dir"]))
    theirs = _weights(Path(straight["checkpoint_dir"]))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7)


def test_a_single_process_checkpoint_resumes_on_two_sharded_ranks(runs):
    """Stopped at step 1 by one process (safetensors), continued by 2 ZeRO-3 ranks (every
    rank keeps its shard of the full tensors): the curve of the straight sharded run."""
    resumed, straight = _report(runs / "from-single"), _report(runs / "full")
    assert resumed["start_step"] == 1 and resumed["world_size"] == 2
    torch.testing.assert_close(torch.tensor(resumed["losses"]),
                               torch.tensor(straight["losses"]), rtol=1e-5, atol=1e-6)
    ours = _weights(Path(resumed["checkpoint_dir"]))
    theirs = _weights(Path(straight["checkpoint_dir"]))
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_a_sharded_checkpoint_resumes_on_one_rank(runs, text_file):
    """Stopped at step 1 by 2 ZeRO-3 ranks, continued by one process with twice the
    accumulation (DCP reshards onto the unsharded model): the curve of the straight run."""
    report = train(TINY, _setup("lora", grad_accum=2), max_steps=STEPS, output_dir=runs / "half",
                   data=text_file, lr=1e-2, predict=False, resume=True)
    straight = _report(runs / "lora")
    assert report.start_step == 1 and report.world_size == 1
    torch.testing.assert_close(torch.tensor(report.losses), torch.tensor(straight["losses"]),
                               rtol=1e-5, atol=1e-6)
    ours = load_file(Path(report.checkpoint_dir) / "model.safetensors")
    theirs = _weights(Path(straight["checkpoint_dir"]))
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("update", "match"), [
    ({"zero_stage": 1}, "ZeRO-1/2 are planned only"),
    ({"zero_stage": 2}, "ZeRO-1/2 are planned only"),
    ({"zero_stage": 3, "offload": "optimizer"}, "optimizer alone .* planned only"),
    ({"zero_stage": 0, "offload": "optimizer_and_params"}, "--zero 3 and --nproc 2"),
    ({"zero_stage": 3, "offload": "optimizer_and_params", "method": "qlora",
      "weight_bits": 4}, "NF4 base"),
    ({"zero_stage": 3, "optimizer": "adamw8bit"}, "adamw8bit"),
    ({"zero_stage": 3, "compute_dtype": "fp16"}, "fp16"),
])
def test_what_fsdp2_does_not_run_is_refused_in_one_line(update, match):
    setup = _setup("full", num_devices=2).model_copy(update=update)
    with pytest.raises(SetupError, match=match) as err:
        check_runnable(TINY, setup)
    assert "\n" not in str(err.value)
    with pytest.raises(SetupError, match="--compile"):
        check_runnable(TINY, _setup("full", num_devices=2, zero_stage=3), compile=True)


def test_a_resume_may_change_the_layout_but_not_the_global_batch():
    from estimator.executor.resume import _training

    two = _setup("full", grad_accum=1, num_devices=2, zero_stage=3).model_dump(mode="json")
    one = _setup("full", grad_accum=2).model_dump(mode="json")
    assert _training(two) == _training(one)  # 2 ranks × 1 = 1 process × 2 sequences per step
    other = _setup("full", grad_accum=1).model_dump(mode="json")
    assert _training(two) != _training(other)  # half the global batch: refused
    assert _training(two) != _training(_setup("lora").model_dump(mode="json"))
