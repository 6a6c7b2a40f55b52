"""The analytic activation term against what autograd really saves in the bundled executor.

One forward + loss of the executor model under torch.autograd.graph.saved_tensors_hooks; the
unique non-parameter storages saved for backward must equal the analytic terms that live there:
activations (analytic/activations.py), autocast weight copies and LoRA adapter casts
(memory.weight_bytes / adapter_bytes) and what the fused loss keeps (∂L/∂h, ∂L/∂W), within 3 %
(the remainder: rope tables, token ids, routing indices)."""

import pytest
import torch

from estimator.analytic import model_state as MS
from estimator.analytic import runtime as RT
from estimator.analytic.activations import activation_bytes, moe_saved_bytes
from estimator.analytic.params import count_params
from estimator.executor.kernels import _RMSNormFunction
from estimator.executor.train import TrainConfig, autocast_context, build_training_model
from estimator.specs import ModelSpec, MoESpec, TrainSetup

pytestmark = pytest.mark.torch

DENSE = ModelSpec(name="parity", num_layers=3, hidden_size=128, intermediate_size=352,
                  num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=300)
MOE = DENSE.model_copy(update={"moe": MoESpec(num_experts=4, num_experts_per_token=2,
                                              expert_intermediate_size=128,
                                              num_dense_layers=1)})


def saved_storage_bytes(model: torch.nn.Module, setup: TrainSetup, vocab: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, vocab, (setup.batch_size, setup.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            autocast_context(setup, torch.device("cpu")):
        model.loss(tokens, tokens)
    return sum(seen.values())


def analytic_saved_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    params = count_params(spec, setup)
    acts = activation_bytes(spec, setup)
    total = acts["layers"] + acts["head"]
    tokens = setup.tokens_per_micro_batch
    total += tokens * spec.hidden_size * 2  # fused loss: ∂L/∂h in bf16
    if setup.method == "full":
        total += spec.vocab_size * spec.hidden_size * 4  # fused loss: ∂L/∂W in fp32
    if not setup.checkpointing:  # casts inside a checkpointed block are recomputed, not kept
        total += MS.autocast_copy_params(spec, setup, params) * 2
    if setup.trains_adapters:  # the c-byte copies adapter matmuls keep (casts, or Bᵀ copies)
        total += MS.adapter_bytes(spec, setup, params) - params.trainable * (
            MS.trainable_bytes_per_param(setup))
    return total


NVFREE = {"framework": "nvfree"}  # the bundled trainer's saved tensors
CASES = [(spec, TrainSetup(**NVFREE, method=method, weight_bits=4 if method == "qlora" else 16,
                           mixed_precision=mixed, compute_dtype="bf16", batch_size=2,
                           seq_len=40, checkpointing=ckpt))
         for spec in (DENSE, MOE) for method in ("full", "lora", "qlora")
         for mixed in (True, False) for ckpt in (False, True)]
VARIANTS = {"mha": {"num_kv_heads": 4}, "window": {"sliding_window": 16},
            "qknorm": {"qk_norm": True}}  # attention layouts: K→H repeat, masked SDPA, q/k norms
CASES += [(DENSE.model_copy(update={"name": name, **update}),
           TrainSetup(**NVFREE, method=method, compute_dtype="bf16", batch_size=2, seq_len=40))
          for name, update in VARIANTS.items() for method in ("full", "lora")]
CASES += [(DENSE, TrainSetup(**NVFREE, method="full", compute_dtype="fp32", weight_bits=32,
                             batch_size=2, seq_len=40))]


@pytest.mark.parametrize("spec,setup", CASES, ids=[
    f"{'moe' if s.moe else s.name}-{u.method}-{'mixed' if u.mixed_precision else 'pure'}"
    f"{'-ckpt' if u.checkpointing else ''}-{u.compute_dtype}" for s, u in CASES])
def test_saved_tensors_match_analytic(spec: ModelSpec, setup: TrainSetup, tmp_path,
                                      monkeypatch) -> None:
    """Whole expert groups (the model's rows exactly); where the executor pads adapted experts'
    groups (CPU bf16), the padded run saves what the model counts per routed row for each
    padding row it actually added (the analytic term uses the expected padding)."""
    import estimator.executor.model as model_module

    torch.manual_seed(0)
    _, model = build_training_model(spec, setup, TrainConfig(max_steps=1, output_dir=tmp_path),
                                    torch.device("cpu"))
    pads = RT.pads_expert_rows(spec, setup, "cpu")
    added: list[int] = []
    if pads:
        pad_groups = model_module._pad_groups

        def recording(token_M, weight_M, counts, granule, pad_token):
            out = pad_groups(token_M, weight_M, counts, granule, pad_token)
            added.append(sum(out[2]) - sum(counts))
            return out

        monkeypatch.setattr(model_module, "_pad_groups", recording)
        padded = saved_storage_bytes(model, setup, spec.vocab_size)
        monkeypatch.setattr(model_module, "_reuses_shapes", lambda x: False)
    measured = saved_storage_bytes(model, setup, spec.vocab_size)
    predicted = analytic_saved_bytes(spec, setup)
    assert measured == pytest.approx(predicted, rel=0.03), (
        f"we see {measured:,} B saved, the analytic model expects {predicted:,}")
    if pads and not setup.checkpointing:  # checkpointed blocks keep their input only
        tokens = setup.tokens_per_micro_batch
        per_row = moe_saved_bytes(spec, setup, tokens, 1.0) - moe_saved_bytes(spec, setup, tokens)
        assert len(added) == spec.num_moe_layers and sum(added) > 0
        assert padded - measured == pytest.approx(per_row * sum(added), rel=0.05)


def test_rmsnorm_function_gradcheck() -> None:
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: _RMSNormFunction.apply(x, w, 1e-5, torch.float64), (x, w))
