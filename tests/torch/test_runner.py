"""The runner (estimator/executor/runner.py) and what it checks before any work, one test per
failure class of issue 21: resume never goes backwards silently (corrupted checkpoints in the
directory), outputs checked and locked before work, plans re-checked at run time, bounded work,
model directories confined, garbage model files, and signals reaching every rank."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from estimator.errors import ConfigError, SetupError
from estimator.executor import checkpoint as ckpt
from estimator.executor import runner
from estimator.executor.config import TrainConfig
from estimator.specs import ModelSpec, TrainSetup

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[2]

TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, intermediate_size=176, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=258, max_seq_len=256)
SETUP = TrainSetup(framework="nvfree", compute_dtype="fp32", batch_size=2, seq_len=32)


def _config(out: Path, data: Path | None, **changes) -> TrainConfig:
    return TrainConfig(**{"max_steps": 3, "output_dir": out, "data": data, "lr": 3e-3,
                          "predict": False, **changes})


def _train(out: Path, data: Path, setup: TrainSetup = SETUP, **changes) -> runner.Outcome:
    return runner.train(TINY, setup, _config(out, data, **changes))


# ----------------------------------------------------------------- resume never goes backwards


def test_resume_skips_corrupted_checkpoints_names_them_and_stays_bit_identical(tmp_path,
                                                                               text_file):
    straight = _train(tmp_path / "a", text_file, max_steps=4).report
    _train(tmp_path / "b", text_file, checkpoint_every=1, keep_checkpoints=3)
    root = tmp_path / "b" / "checkpoints"
    newest, middle = root / "step_00000003", root / "step_00000002"
    weights = newest / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)  # same size: only the content lies
    (middle / "state.json").write_text("{not json")
    (root / ".tmp-step_00000009-1").mkdir()  # a killed save's debris
    (root / ".old-step_00000001-2").mkdir()
    outcome = _train(tmp_path / "b", text_file, max_steps=4, resume=True, checkpoint_every=1,
                     keep_checkpoints=3)
    report = outcome.report
    assert report.start_step == 1 and report.losses == straight.losses  # from step 1, exactly
    assert "skipped step_00000003" in report.message and "step_00000002" in report.message
    assert "resumed from step_00000001" in report.message
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in root.iterdir())
    assert Path(report.checkpoint_dir).is_dir()
    assert all(ckpt.load_checkpoint(p) for p in ckpt.list_checkpoints(root))


def test_no_loadable_checkpoint_stops_restart_starts_over_and_keeps_what_it_writes(tmp_path,
                                                                                   text_file):
    out = tmp_path / "run"
    _train(out, text_file, max_steps=1)
    root = out / "checkpoints"
    good = root / "step_00000001"
    for step in (5, 6):  # later checkpoints that do not load (their state names another step)
        shutil.copytree(good, root / f"step_0000000{step}")
    (good / "optimizer.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        _train(out, text_file, max_steps=2, resume=True)
    message = str(err.value)
    assert "no checkpoint" in message and "--restart" in message and "\n" not in message
    assert all(f"step_0000000{s}" in message for s in (1, 5, 6))
    # the good one back: resume from step 1 past the bad later ones; the new step 2 is kept
    shutil.copy(root / "step_00000005" / "optimizer.safetensors", good)
    report = _train(out, text_file, max_steps=2, resume=True).report
    assert report.start_step == 1 and "resumed from step_00000001" in report.message
    assert report.checkpoint_dir == str(root / "step_00000002")
    assert (root / "step_00000002").is_dir()  # never pruned right after it was written
    report = _train(out, text_file, max_steps=1, restart=True).report
    assert report.start_step == 0 and [p.name for p in ckpt.list_checkpoints(root)] == [
        "step_00000001"]


def test_checkpoint_tensors_that_do_not_fit_the_model_are_refused(tmp_path, text_file):
    from safetensors.torch import save_file

    out = tmp_path / "run"
    _train(out, text_file, max_steps=1)
    path = out / "checkpoints" / "step_00000001"
    loaded = ckpt.load_checkpoint(path)
    save_file({"embed_tokens.weight": torch.zeros(3, 3)}, path / "model.safetensors")
    state = json.loads((path / "state.json").read_text())
    state["files"]["model.safetensors"] = (path / "model.safetensors").stat().st_size
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"does not match the model|shape"):
        ckpt.restore_model(ckpt.load_checkpoint(path), torch.nn.Linear(3, 3))
    with pytest.raises(ConfigError, match=r"no checkpoint .* loads"):
        _train(out, text_file, max_steps=2, resume=True)
    assert loaded.step == 1


# --------------------------------------------------------------- outputs checked before work


def test_output_that_is_a_file_or_unwritable_is_refused_before_work(tmp_path, text_file):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="a file, not a directory"):
        _train(a_file, text_file)
    with pytest.raises(ConfigError, match="cannot write there"):
        _train(Path("/proc/nvfree-test/run"), text_file)
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="cannot write there"):
            _train(locked / "run", text_file)


def test_a_full_disk_is_refused_before_work(tmp_path, text_file, monkeypatch):
    import estimator.outputs as outputs

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage",
                        lambda path: usage._replace(free=4096))
    with pytest.raises(ConfigError, match="free on its disk; one checkpoint needs"):
        _train(tmp_path / "run", text_file)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_second_run_into_the_same_output_names_the_pid_holding_it(tmp_path, text_file):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]);"
         "from estimator.outputs import output_lock; from pathlib import Path\n"
         "with output_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)",
         str(out), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another nvfree run \\(PID "
                                              f"{holder.pid} on "):
            _train(out, text_file)
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- bounded work


def test_absurd_sizes_and_special_files_are_refused_before_allocation(tmp_path, text_file):
    started = time.monotonic()
    with pytest.raises(SetupError, match=r"needs at least .* per device"):
        _train(tmp_path / "a", text_file, setup=SETUP.model_copy(update={"batch_size": 10**18}))
    with pytest.raises(SetupError, match="needs at least"):
        runner.train(TINY.model_copy(update={"vocab_size": 10**12}), SETUP,
                     _config(tmp_path / "b", text_file))
    assert time.monotonic() - started < 30
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="a FIFO"):
        _train(tmp_path / "c", fifo)
    with pytest.raises(ConfigError, match="a device"):
        _train(tmp_path / "d", Path("/dev/zero"))
    with pytest.raises(SetupError, match="--lr nan"):
        _train(tmp_path / "e", text_file, lr=float("nan"))
    with pytest.raises(SetupError, match="--seed"):
        _train(tmp_path / "f", text_file, seed=10**30)


def test_non_utf8_jsonl_is_one_line(tmp_path):
    from estimator.executor.data import iter_documents

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: not UTF-8 text"):
        list(iter_documents(bad))
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.jsonl:1"):
        list(iter_documents(deep))


# ------------------------------------------------------------------ model directories confined


def _hf_dir(root: Path) -> Path:
    from safetensors.torch import save_file

    from estimator.executor.hf import hf_param_name
    from estimator.executor.model import build_model

    directory = root / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 258, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}))
    state = build_model(TINY).state_dict()
    save_file({hf_param_name(k): v.contiguous() for k, v in state.items()},
              root / "weights.safetensors")
    return directory


@pytest.mark.parametrize("shard", ["../weights.safetensors", "ABSOLUTE", "link.safetensors"],
                         ids=["dotdot", "absolute", "symlink-outside"])
def test_index_naming_a_file_outside_the_model_directory_is_refused(tmp_path, shard):
    from estimator.executor.hf import load_hf_model

    directory = _hf_dir(tmp_path)
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "weights.safetensors")
    (directory / "link.safetensors").symlink_to(tmp_path / "weights.safetensors")
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}))
    with pytest.raises(ConfigError, match=r"not a file name inside|resolves outside"):
        load_hf_model(directory)


def test_a_hub_cache_snapshot_may_link_into_its_blobs(tmp_path):
    from estimator.executor.hf import safetensors_files

    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_bytes(b"x")
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    assert safetensors_files(snapshot) == [snapshot / "model.safetensors"]


@pytest.mark.parametrize(("name", "content", "match"), [
    ("model.safetensors", b"\x00" * 64, "not a readable safetensors file"),
    ("model.safetensors.index.json", b"{\"weight_map\": 3}", "no weight_map"),
    ("model.safetensors.index.json", b"\xff\xfe{}", "not UTF-8"),
    ("config.json", b"[" * 5000 + b"]" * 5000, "nested deeper|not a JSON object|JSON object"),
], ids=["garbage-weights", "index-not-a-map", "index-not-utf8", "config-deep"])
def test_garbage_model_files_are_one_line(tmp_path, name, content, match):
    from estimator.executor.hf import load_hf_model

    directory = _hf_dir(tmp_path)
    shutil.copy(tmp_path / "weights.safetensors", directory / "model.safetensors")
    (directory / name).write_bytes(content)
    with pytest.raises(ConfigError, match=match) as err:
        load_hf_model(directory, spec=TINY)
    assert "\n" not in str(err.value)


def _tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("abcdefgh")}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path / "tokenizer.json"))


@pytest.mark.parametrize(("config", "tokenizer", "match"), [
    ({"eos_token_id": 10**9}, None, "outside the tokenizer's 10 ids"),
    ({"eos_token_id": "end"}, None, "is not a token id"),
    ({}, b"{garbage", "cannot be loaded"),
], ids=["eos-out-of-range", "eos-not-an-id", "garbage-tokenizer"])
def test_broken_tokenizer_files_and_eos_ids_are_one_line(tmp_path, config, tokenizer, match):
    from estimator.executor.tokenizer import load_tokenizer

    _tokenizer_json(tmp_path)
    if tokenizer is not None:
        (tmp_path / "tokenizer.json").write_bytes(tokenizer)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    if tokenizer is None:
        assert load_tokenizer(tmp_path).eos_id == 1


# ---------------------------------------------------------------- plans re-checked at run time


def local_plan(path: Path, spec: ModelSpec = TINY) -> Path:
    """A plan for this machine (LoRA, fp32, 2 × 32 tokens per step, 4 steps), saved."""
    from estimator.hardware import detect, fingerprint, local_device
    from estimator.planfile import make_plan, save_plan
    from estimator.planner import Constraints, search

    machine = detect()
    device = local_device(machine)
    base = TrainSetup(framework="nvfree", seq_len=32, num_tokens=256)
    result = search(spec, base, device, None, Constraints(
        global_batch=2, methods=("lora",), precisions=(("fp32", False),),
        optimizers=("adamw",), checkpointing=(False,)))
    plan = make_plan(result, model=spec, model_source="tiny", data=None, text_field="text",
                     device=device, device_key="local", torch_device="cpu",
                     fingerprint=fingerprint(machine), profile=None, num_tokens=256,
                     objective="time")
    return save_plan(plan, path)


def _edited(path: Path, edit) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d["setup"].update(batch_size=64), "file says peak|does not cover"),
    (lambda d: d.update(model={**d["model"], "num_layers": 80, "hidden_size": 8192,
                               "intermediate_size": 28672, "num_heads": 64,
                               "num_kv_heads": 8, "head_dim": 128, "vocab_size": 128256}),
     "needs at least|file says peak|does not fit"),
    (lambda d: d["model"].update(vocab_size=10**9), "needs at least"),
    (lambda d: d.update(max_steps=10**9), "does not cover its token budget"),
], ids=["larger-batch", "70b-model", "vocab-1e9", "more-steps"])
def test_an_edited_plan_is_refused_before_any_model_is_built(tmp_path, edit, match):
    plan = _edited(local_plan(tmp_path / "plan.json"), edit)
    with pytest.raises(SetupError, match=match) as err:
        runner.run_plan(plan, output=tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_force_does_not_run_a_plan_that_cannot_fit_here_at_all(tmp_path):
    plan = _edited(local_plan(tmp_path / "plan.json"),
                   lambda d: d["model"].update(vocab_size=10**9))
    with pytest.raises(SetupError, match="needs at least"):
        runner.run_plan(plan, output=tmp_path / "run", force=True)


def test_an_honest_plan_passes_the_recheck(tmp_path):
    from estimator.planfile import load_plan

    plan = load_plan(local_plan(tmp_path / "plan.json"))
    refuse, _, here = runner.check_plan(plan, tmp_path / "plan.json")
    assert refuse == [] and here.memory.total_bytes == plan.predicted_peak_bytes


# -------------------------------------------------------------------------- process groups


def test_sigterm_to_the_launcher_stops_torchrun_and_every_rank(tmp_path, text_file):
    import psutil

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 258, "max_position_embeddings": 256}))
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "estimator", "train", "--model", str(config), "--dtype", "fp32",
         "--seq-len", "32", "--batch-size", "2", "--max-steps", "100000",
         "--checkpoint-every", "1", "--data", str(text_file), "-o", str(out), "--nproc", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 240
    while not ckpt.list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[1][-2000:]
        time.sleep(0.2)
    family = psutil.Process(launcher.pid).children(recursive=True)
    assert len(family) >= 3  # torchrun and two ranks
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, stderr[-3000:]
    survivors = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
    report = json.loads((out / "run_report.json").read_text())
    assert report["stop_reason"] == "interrupted" and "SIGTERM" in report["message"]
    assert Path(report["checkpoint_dir"]).is_dir()
