"""A run's output directory and checkpoints: the directory checked and locked before any work,
what is stored beside the weights (the run state a bit-identical resume needs), loading the
latest checkpoint that loads into a run, and refusing one made by another run."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

from estimator.errors import ConfigError, SetupError
from estimator.executor import checkpoint as ckpt
from estimator.executor.checks import checkpoint_bytes
from estimator.executor.config import REPORT_FILE, Run, TrainConfig
from estimator.outputs import check_free_space, check_output_dir, output_lock
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup


def checkpoint_root(config: TrainConfig) -> Path:
    """OUTPUT/checkpoints of a run."""
    return config.output_dir / ckpt.CHECKPOINTS_DIR


def check_checkpoints(root: Path, config: TrainConfig) -> None:
    """What the checkpoints already in root allow (nothing is changed): none, or --resume with
    one that loads, or --restart. ConfigError naming the choice otherwise."""
    if config.resume and config.restart:
        raise SetupError("--resume continues the run in --output, --restart deletes it; "
                         "choose one")
    if config.restart:
        return
    rows = ckpt.scan_checkpoints(root)
    if rows and not config.resume:
        raise ConfigError(f"{config.output_dir} already holds checkpoints; pass --resume to "
                          "continue that run, --restart to start it over, or choose another "
                          "--output")
    if rows and not any(loaded for _, loaded, _ in rows):
        raise unloadable(root, [reason for _, _, reason in rows])


def check_start(root: Path, config: TrainConfig) -> None:
    """check_checkpoints, then --restart's deletion of the checkpoints and the report (with
    the output's lock held)."""
    check_checkpoints(root, config)
    if config.restart:
        ckpt.discard_checkpoints(root)
        (config.output_dir / REPORT_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def prepared_output(spec: ModelSpec, setup: TrainSetup, config: TrainConfig
                    ) -> Iterator[None]:
    """Rank 0's output directory for the run, checked before any work: a writable directory
    (created), locked against a second run for the block, cleared of a killed save's debris,
    its checkpoints usable as config says (check_start), and room on its disk for one more
    checkpoint (checks.checkpoint_bytes)."""
    check_output_dir(config.output_dir)
    with output_lock(config.output_dir):
        root = checkpoint_root(config)
        ckpt.remove_debris(root)
        check_start(root, config)
        check_free_space(config.output_dir, checkpoint_bytes(spec, setup), "one checkpoint")
        yield


LAYOUT_FIELDS = ("num_devices", "num_nodes", "zero_stage", "grad_accum")
"""Setup fields a resume may change: how a step's sequences are split over ranks and
micro-batches, and whether the states are sharded (the step's global batch must stay)."""


def _training(setup: dict) -> dict:
    """A setup (JSON) without its layout, with its global sequences per step."""
    if not isinstance(setup, dict):
        return {"setup": setup}
    kept = {k: v for k, v in setup.items() if k not in LAYOUT_FIELDS}
    try:
        kept["sequences_per_step"] = (setup["batch_size"] * setup["grad_accum"]
                                      * setup["num_devices"])
    except (KeyError, TypeError):
        kept["sequences_per_step"] = None
    return kept


def _check_resumable(saved: dict, run: Run, data_source: str) -> None:
    """The checkpoint was made by this run: same model, seed, data and setup, except its
    layout over ranks (LAYOUT_FIELDS; 2 ranks × accumulation 1 resume as 1 × 2)."""
    saved = {**saved, "setup": _training(saved.get("setup"))}
    mismatches = [
        name for name, ours in (
            ("model", run.spec.model_dump(mode="json")),
            ("setup", _training(run.setup.model_dump(mode="json"))),
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


def _restore(loaded: ckpt.LoadedCheckpoint, run: Run) -> None:
    """Put a checkpoint's weights, optimizer, RNG, scaler and losses into the run."""
    losses = loaded.state.get("losses")
    if not isinstance(losses, list) or len(losses) != loaded.step or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in losses):
        raise ConfigError(f"checkpoint {loaded.path}: its losses do not match its step")
    if loaded.state.get("sharded"):
        from estimator.executor.sharded_checkpoint import restore_sharded

        restore_sharded(loaded, run.model, run.optimizer)
    elif run.sharded:
        from estimator.executor.sharded_checkpoint import restore_full_into_sharded

        restore_full_into_sharded(loaded, run.model, run.optimizer)
    else:
        ckpt.restore_model(loaded, run.model)
        ckpt.restore_optimizer(loaded, run.optimizer)
    ckpt.restore_rng_states(loaded.state.get("rng"), run.device)
    scaler_state = loaded.state.get("grad_scaler")
    if run.scaler is not None and scaler_state:
        try:
            run.scaler.load_state_dict(scaler_state)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
            raise ConfigError(f"checkpoint {loaded.path}: its grad scaler state is not "
                              "torch's") from None
    run.start_step = loaded.step
    run.losses = [float(v) for v in losses]


def unloadable(root: Path, problems: list[str]) -> ConfigError:
    """The error of a resume that finds checkpoints but none that loads."""
    return ConfigError(f"no checkpoint in {root} loads ({'; '.join(problems)}); move them "
                       "away, or pass --restart to start over at step 0")


def resume_run(run: Run, data_source: str) -> str | None:
    """Load the newest checkpoint that loads into the run, newest first; a checkpoint made by
    another run (other model, setup, seed or data) is refused outright, one that does not load
    is skipped and named in the returned note. ConfigError when checkpoints exist and none
    loads (resume never falls back to step 0 silently); a note when there were none."""
    root = checkpoint_root(run.config)
    rows = ckpt.scan_checkpoints(root)
    if not rows:
        return f"no checkpoint to resume in {root}; started at step 0"
    problems = []
    for path, loaded, reason in rows:
        if loaded is not None:
            _check_resumable(loaded.state, run, data_source)
            try:
                _restore(loaded, run)
            except ConfigError as e:
                reason, loaded = ckpt.problem(path, e), None
        if loaded is None:
            problems.append(reason)
            continue
        if problems:
            return f"skipped {'; '.join(problems)}; resumed from {path.name}"
        return None
    raise unloadable(root, problems)


def save_run_checkpoint(run: Run, step: int, data_source: str) -> Path:
    """Write the run's checkpoint of `step` (weights, optimizer, the run state above; a PEFT
    adapter for LoRA) atomically; returns its directory. A sharded (ZeRO-3) run writes DCP
    on every rank (sharded_checkpoint.py); otherwise rank 0 alone calls this."""
    setup = run.setup
    write_adapter = None
    if setup.trains_adapters:
        from estimator.executor.lora import save_peft_adapter

        model_type = "llama"
        if run.config.model_path is not None:
            from estimator.executor.hf import read_config

            model_type = read_config(run.config.model_path).get("model_type", "llama")

        def write_adapter(path: Path, tensors: dict | None = None) -> None:
            save_peft_adapter(run.model, path, base_model_name=str(run.config.model_path
                                                                   or run.spec.name),
                              rank=setup.lora_rank, alpha=setup.lora_alpha,
                              dropout=run.config.lora_dropout, targets=setup.lora_targets,
                              model_type=model_type, tensors=tensors)

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
    if run.sharded:
        from estimator.executor.sharded_checkpoint import save_sharded_checkpoint

        return save_sharded_checkpoint(checkpoint_root(run.config), step, model=run.model,
                                       optimizer=run.optimizer, state=state,
                                       trainable_only=setup.trains_adapters,
                                       is_main=run.dist.is_main, write_adapter=write_adapter,
                                       keep_last=run.config.keep_checkpoints)
    return ckpt.save_checkpoint(checkpoint_root(run.config), step, model=run.model,
                                optimizer=run.optimizer, state=state,
                                trainable_only=setup.trains_adapters,
                                write_adapter=write_adapter,
                                keep_last=run.config.keep_checkpoints)
