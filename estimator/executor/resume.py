"""A run's checkpoints: what is stored beside the weights (the run state a bit-identical resume
needs), loading the latest one into a run, and refusing one made by another run."""

from pathlib import Path

from estimator.errors import ConfigError
from estimator.executor import checkpoint as ckpt
from estimator.executor.config import Run, TrainConfig


def checkpoint_root(config: TrainConfig) -> Path:
    """OUTPUT/checkpoints of a run."""
    return config.output_dir / ckpt.CHECKPOINTS_DIR


def _check_resumable(saved: dict, run: Run, data_source: str) -> None:
    mismatches = [
        name for name, ours in (
            ("model", run.spec.model_dump(mode="json")),
            ("setup", run.setup.model_dump(mode="json")),
            ("seed", run.config.seed),
            ("data", data_source),
            ("num_data_tokens", run.dataset.tokens.numel()),
        ) if saved.get(name) != ours
    ]
    if mismatches:
        raise ConfigError(
            f"the checkpoint in {run.config.output_dir} was made with a different "
            f"{', '.join(mismatches)}; rerun with the same flags or use another --output"
        )


def resume_run(run: Run, data_source: str) -> str | None:
    """Load the latest good checkpoint into run; return a note when there was none."""
    root = checkpoint_root(run.config)
    loaded = ckpt.latest_checkpoint(root)
    if loaded is None:
        return f"no checkpoint to resume in {root}; started at step 0"
    _check_resumable(loaded.state, run, data_source)
    ckpt.restore_model(loaded, run.model)
    ckpt.restore_optimizer(loaded, run.optimizer)
    ckpt.restore_rng_states(loaded.state["rng"], run.device)
    if run.scaler is not None and loaded.state.get("grad_scaler"):
        run.scaler.load_state_dict(loaded.state["grad_scaler"])
    run.start_step = loaded.step
    run.losses = list(loaded.state["losses"])
    return None


def save_run_checkpoint(run: Run, step: int, data_source: str) -> Path:
    """Write the run's checkpoint of `step` (weights, optimizer, the run state above; a PEFT
    adapter for LoRA) atomically; returns its directory."""
    setup = run.setup
    write_adapter = None
    if setup.trains_adapters:
        from estimator.executor.lora import save_peft_adapter

        model_type = "llama"
        if run.config.model_path is not None:
            from estimator.executor.hf import read_config

            model_type = read_config(run.config.model_path).get("model_type", "llama")

        def write_adapter(path: Path) -> None:
            save_peft_adapter(run.model, path, base_model_name=str(run.config.model_path
                                                                   or run.spec.name),
                              rank=setup.lora_rank, alpha=setup.lora_alpha,
                              dropout=run.config.lora_dropout, targets=setup.lora_targets,
                              model_type=model_type)

    state = {
        "model": run.spec.model_dump(mode="json"),
        "setup": setup.model_dump(mode="json"),
        "seed": run.config.seed,
        "data": data_source,
        "num_data_tokens": run.dataset.tokens.numel(),
        "data_position": step * setup.batch_size * setup.grad_accum * run.dist.world_size,
        "losses": run.losses,
        "rng": ckpt.rng_states(run.device),
        "grad_scaler": run.scaler.state_dict() if run.scaler is not None else None,
    }
    return ckpt.save_checkpoint(checkpoint_root(run.config), step, model=run.model,
                                optimizer=run.optimizer, state=state,
                                trainable_only=setup.trains_adapters,
                                write_adapter=write_adapter,
                                keep_last=run.config.keep_checkpoints)
