"""The training loop: loss falls, only adapters train, exact resume, NaN stop, 8-bit AdamW."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from estimator.errors import ConfigError, SetupError
from estimator.executor import checkpoint as ckpt
from estimator.executor.optim import AdamW8bit, lr_at
from estimator.executor.train import TrainConfig, prepare_run, train, train_step
from estimator.specs import ModelSpec, TrainSetup

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[2]

TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=64, intermediate_size=176, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=258, max_seq_len=256)


def _setup(**kwargs) -> TrainSetup:
    return TrainSetup(**{"compute_dtype": "fp32", "batch_size": 4, "seq_len": 32,
                         "lora_rank": 4, **kwargs})


def test_loss_falls_on_the_embedded_stdlib_corpus(tmp_path):
    setup = _setup(batch_size=8, seq_len=64)
    report = train(TINY, setup, max_steps=150, output_dir=tmp_path, lr=3e-3, predict=False)
    first, last = sum(report.losses[:5]) / 5, sum(report.losses[-10:]) / 10
    assert report.data_source == "stdlib" and report.stop_reason == "max_steps"
    assert first > 5.0  # ≈ ln(258): a random byte-level model
    assert last < first - 2.0, report.losses
    saved = json.loads((tmp_path / "run_report.json").read_text())
    assert saved["losses"] == list(report.losses)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_only_lora_parameters_change(text_file, tmp_path, method):
    setup = _setup(method=method, weight_bits=4 if method == "qlora" else 16)
    config = TrainConfig(max_steps=3, output_dir=tmp_path, data=text_file, lr=1e-2)
    run, *_ = prepare_run(TINY, setup, config)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    for step in range(3):
        assert train_step(run, step, lr=1e-2)[1] is None
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora = {k for k in before if ".lora_" in k}
    assert lora and changed == lora
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == lora


def _interrupt_at(step_to_stop: int):
    def on_progress(progress):
        if progress.step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
    return on_progress


@pytest.mark.parametrize("kwargs", [
    {"optimizer": "adamw8bit", "grad_accum": 2},
    {"method": "lora", "optimizer": "adamw", "lora_dropout": 0.1},
    {"optimizer_in_backward": True},
], ids=["full-8bit-accum", "lora-dropout", "full-in-backward"])
def test_resume_after_interrupt_reproduces_the_loss_curve_exactly(text_file, tmp_path, kwargs):
    dropout = kwargs.pop("lora_dropout", 0.0)
    setup = _setup(**kwargs)
    common = {"max_steps": 8, "data": text_file, "lr": 3e-3, "lora_dropout": dropout,
              "predict": False}
    straight = train(TINY, setup, output_dir=tmp_path / "a", **common)
    stopped = train(TINY, setup, output_dir=tmp_path / "b", on_progress=_interrupt_at(4),
                    **common)
    assert stopped.stop_reason == "interrupted" and stopped.num_steps == 4
    assert "SIGINT" in stopped.message
    resumed = train(TINY, setup, output_dir=tmp_path / "b", resume=True, **common)
    assert resumed.start_step == 4
    assert resumed.losses == straight.losses
    assert len(set(straight.losses)) == 8  # the curve moves: equality is not trivial


def test_resume_refuses_a_checkpoint_from_another_setup(text_file, tmp_path):
    common = {"max_steps": 2, "data": text_file, "output_dir": tmp_path, "predict": False}
    train(TINY, _setup(), **common)
    with pytest.raises(ConfigError, match="different setup"):
        train(TINY, _setup(batch_size=2), resume=True, **common)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(TINY, _setup(), **common)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path):
    # pure fp16 weights + SGD at lr 1e3: the first update overflows the next forward to inf/nan
    setup = _setup(optimizer="sgd", compute_dtype="fp16", mixed_precision=False)
    report = train(TINY, setup, max_steps=30, output_dir=tmp_path, data=text_file, lr=1e3,
                   max_grad_norm=0.0, warmup_steps=1, checkpoint_every=1, predict=False)
    assert report.stop_reason == "nonfinite_loss"
    assert "loss became nan" in report.message and "last good checkpoint" in report.message
    assert all(torch.isfinite(torch.tensor(report.losses)))
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and latest.step == report.num_steps < 30
    weights = load_file(latest.path / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


@pytest.mark.parametrize(("setup", "match"), [
    ({"method": "inference"}, "inference"),
    ({"method": "lora", "weight_bits": 8}, "8-bit"),
    ({"attention": "eager"}, "SDPA"),
], ids=["inference", "int8-base", "eager"])
def test_setups_the_executor_cannot_run_are_setup_errors(tmp_path, setup, match):
    with pytest.raises(SetupError, match=match):
        train(TINY, _setup(**setup), max_steps=1, output_dir=tmp_path)


def test_unknown_device_is_a_setup_error(tmp_path):
    with pytest.raises(SetupError, match="--device"):
        train(TINY, _setup(), max_steps=1, output_dir=tmp_path, device="nonsense")


def test_adamw8bit_tracks_fp32_adamw():
    torch.manual_seed(0)
    x, w_true = torch.randn(512, 128), torch.randn(128, 64)
    y = x @ w_true
    trajectories = []
    for cls in (torch.optim.AdamW, AdamW8bit):
        w = torch.zeros(128, 64, requires_grad=True)
        opt = cls([w], lr=0.05, weight_decay=0.0)
        losses = []
        for _ in range(100):
            loss = (x @ w - y).square().mean()
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        trajectories.append((losses, w.detach()))
    (ref_losses, ref_w), (q_losses, q_w) = trajectories
    assert q_losses[-1] < 0.05 * q_losses[0]
    assert abs(q_losses[-1] - ref_losses[-1]) < 0.1 * ref_losses[0] * 0.05
    assert (q_w - ref_w).norm() / ref_w.norm() < 0.05
    state = opt.state[w]
    assert state["m_codes"].dtype == torch.uint8 and state["m_codes"].numel() == 128 * 64


def test_warmup_then_cosine_schedule():
    lrs = [lr_at(s, base_lr=1.0, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(b <= a for a, b in itertools.pairwise(lrs[3:]))
    assert lr_at(20, base_lr=1.0, warmup_steps=4, total_steps=20) == pytest.approx(0.1)


TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 258, "max_position_embeddings": 256}


def _nvfree(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "estimator", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_cli_train_sigterm_saves_then_resume_finishes(text_file, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "run"
    args = ["train", "--model", str(config), "--dtype", "fp32", "--batch-size", "2",
            "--seq-len", "32", "--data", str(text_file), "--output", str(out), "--lr", "3e-3"]
    child = _nvfree([*args, "--max-steps", "100000", "--checkpoint-every", "1"])
    deadline = time.monotonic() + 60
    while not ckpt.list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 143, stderr
    assert "stopped by SIGTERM" in stdout
    stopped = json.loads((out / "run_report.json").read_text())
    assert stopped["stop_reason"] == "interrupted"
    target = stopped["num_steps"] + 2
    resumed = _nvfree([*args, "--max-steps", str(target), "--resume", "--json"])
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["start_step"] == stopped["num_steps"] and report["num_steps"] == target
    assert report["losses"][: stopped["num_steps"]] == stopped["losses"]
    # the executor stores exactly what the analytic model counts (fp32 full fine-tune)
    terms = {t["name"]: t for t in report["memory_terms"]}
    for name in ("weights", "gradients", "optimizer_states"):
        assert abs(terms[name]["relative_error"]) < 1e-3, terms[name]
    assert report["predicted_step_seconds"] > 0


def test_cli_bad_data_path_is_one_line_exit_2(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    child = _nvfree(["train", "--model", str(config), "--data", str(tmp_path / "missing"),
                     "--output", str(tmp_path / "run")])
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 2
    assert stderr.strip().count("\n") == 0 and "no such file" in stderr


def test_trains_from_a_hugging_face_directory_and_writes_a_peft_adapter(text_file, tmp_path):
    from safetensors.torch import save_file

    from estimator.executor.hf import hf_param_name
    from estimator.executor.model import build_model

    torch.manual_seed(123)
    source = build_model(TINY)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({**TINY_CONFIG, "rms_norm_eps": 1e-5}))
    save_file({hf_param_name(k): v.contiguous() for k, v in source.state_dict().items()},
              hf_dir / "model.safetensors")
    common = {"max_steps": 1, "data": text_file, "model_path": hf_dir, "predict": False}
    train(TINY, _setup(), output_dir=tmp_path / "full", lr=0.0, **common)
    saved = load_file(tmp_path / "full" / "checkpoints" / "step_00000001" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in source.named_parameters())
    train(TINY, _setup(method="lora"), output_dir=tmp_path / "lora", **common)
    adapter = tmp_path / "lora" / "checkpoints" / "step_00000001" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dir) and config["r"] == 4
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_pure_fp16_adamw_stays_finite(text_file, tmp_path):
    # with ε = 1e-8 (0 in fp16), an adapter element with no gradient yet updates by 0/0 = NaN
    setup = _setup(method="qlora", weight_bits=4, compute_dtype="fp16", mixed_precision=False)
    report = train(TINY, setup, max_steps=4, output_dir=tmp_path, data=text_file, lr=3e-3,
                   predict=False)
    assert report.stop_reason == "max_steps", report.message
    assert report.losses[-1] < report.losses[0]


def test_the_optimizer_step_in_backward_trains_as_the_step_after_it(text_file, tmp_path):
    """optimizer_in_backward (no clipping) gives the loss curve of the ordinary step without
    clipping, and the report's gradient memory is one tensor's, as predicted."""
    common = {"max_steps": 5, "data": text_file, "lr": 3e-3, "warmup_steps": 1}
    plain = train(TINY, _setup(), output_dir=tmp_path / "a", max_grad_norm=0.0,
                  predict=False, **common)
    inside = train(TINY, _setup(optimizer_in_backward=True), output_dir=tmp_path / "b",
                   **common)
    torch.testing.assert_close(inside.losses, plain.losses, rtol=1e-5, atol=0)
    grads = {t.name: t for t in inside.memory_terms}["gradients"]
    assert grads.measured_bytes == grads.predicted_bytes == 258 * 64 * 4  # the embedding


def test_a_nonfinite_step_in_backward_keeps_the_last_good_checkpoint(text_file, tmp_path):
    """Nothing checks a gradient before the step in backward applies it: the non-finite
    weights it makes stop the run at the next loss, without saving them."""
    setup = _setup(optimizer="sgd", compute_dtype="fp16", mixed_precision=False,
                   optimizer_in_backward=True)
    report = train(TINY, setup, max_steps=30, output_dir=tmp_path, data=text_file, lr=1e3,
                   warmup_steps=1, checkpoint_every=1, predict=False)
    assert report.stop_reason == "nonfinite_loss" and "last good checkpoint" in report.message
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and latest.step == report.num_steps < 30
    weights = load_file(latest.path / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_the_optimizer_step_in_backward_refuses_clipping(tmp_path):
    with pytest.raises(SetupError, match="--max-grad-norm 0"):
        train(TINY, _setup(optimizer_in_backward=True), max_steps=1, output_dir=tmp_path,
              max_grad_norm=1.0)
    with pytest.raises(ValueError, match="--grad-accum 1"):
        _setup(optimizer_in_backward=True, grad_accum=2)
