"""The executor's Transformer: exact parameter parity with the analytic count, MoE routing equal
to a dense all-experts reference, unsupported specs rejected, checkpointing leaves gradients
unchanged, bf16 builds run."""

import math

import pytest

torch = pytest.importorskip("torch")

from estimator.analytic.params import count_params  # noqa: E402
from estimator.errors import SetupError  # noqa: E402
from estimator.executor.checkpointing import apply_checkpointing  # noqa: E402
from estimator.executor.lora import apply_lora  # noqa: E402
from estimator.executor.model import MoE, build_model  # noqa: E402
from estimator.specs import MLASpec, ModelSpec, MoESpec, TrainSetup  # noqa: E402

pytestmark = pytest.mark.torch

BASE = {"name": "tiny", "num_layers": 2, "hidden_size": 64, "intermediate_size": 96,
        "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 101}
MOE = MoESpec(num_experts=4, num_experts_per_token=2, expert_intermediate_size=32)
SPECS = {
    "llama-gqa": {},
    "qwen2-bias-tied": {"qkv_bias": True, "tied_embeddings": True},
    "qwen3-qknorm-wide-heads": {"qk_norm": True, "head_dim": 32},
    "gpt2-style": {"norm": "layernorm", "mlp": "gelu", "position": "learned",
                   "linear_bias": True, "max_seq_len": 32, "num_kv_heads": 4},
    "mixtral-moe": {"moe": MOE},
    "deepseek-moe-shared-dense-first": {
        "num_layers": 3,
        "moe": MOE.model_copy(update={"num_shared_experts": 2, "num_dense_layers": 1,
                                      "shared_expert_intermediate_size": 24})},
    "gpt-oss-like-expert-bias": {"moe": MOE.model_copy(update={"expert_bias": True})},
}


def spec(**overrides) -> ModelSpec:
    return ModelSpec(**{**BASE, **overrides})


@pytest.mark.parametrize("name", list(SPECS))
def test_param_count_equals_analytic(name):
    s = spec(**SPECS[name])
    model = build_model(s, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count_params(s, TrainSetup()).total


@pytest.mark.parametrize("name", ["llama-gqa", "mixtral-moe"])
def test_lora_param_count_equals_analytic(name):
    s = spec(**SPECS[name])
    setup = TrainSetup(method="lora", lora_rank=4)
    model = apply_lora(build_model(s), rank=4, alpha=8.0, targets=setup.lora_targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count_params(s, setup).trainable


@pytest.mark.parametrize("name", list(SPECS))
def test_forward_backward_shapes_and_dtypes(name):
    torch.manual_seed(0)
    model = build_model(spec(**SPECS[name]), dtype=torch.bfloat16)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, BASE["vocab_size"]) and logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_moe_grouped_dispatch_equals_dense_reference():
    torch.manual_seed(0)
    moe = build_model(spec(moe=MOE.model_copy(update={"num_shared_experts": 1}))).layers[0].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(3, 7, BASE["hidden_size"])
    probs = torch.softmax(moe.gate(x), dim=-1)
    weights, chosen = probs.topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    dense = torch.stack([e(x) for e in moe.experts], dim=-2)  # every expert on every token
    picked = dense.gather(-2, chosen[..., None].expand(*chosen.shape, x.shape[-1]))
    expected = (picked * weights[..., None]).sum(-2) + moe.shared_experts(x)
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_masks_only_beyond_the_window():
    torch.manual_seed(0)
    full = build_model(spec())
    windowed = build_model(spec(sliding_window=4))
    windowed.load_state_dict(full.state_dict())
    tokens = torch.randint(0, BASE["vocab_size"], (1, 10))
    with torch.no_grad():
        a, b = full(tokens), windowed(tokens)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("overrides, what", [
    ({"mla": MLASpec(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)},
     "MLA"),
    ({"attention_sinks": True}, "attention sinks"),
    ({"attentions_per_layer": 2}, "attentions per layer"),
    ({"moe": MOE.model_copy(update={"num_zero_experts": 2})}, "zero-computation"),
])
def test_unsupported_specs_raise_setup_error(overrides, what):
    with pytest.raises(SetupError, match=what):
        build_model(spec(**overrides), device="meta")


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_gives_the_same_gradients(lora):
    torch.manual_seed(0)
    s = spec(moe=MOE, num_layers=3)
    plain = build_model(s)
    ckpt = build_model(s)
    ckpt.load_state_dict(plain.state_dict())
    if lora:
        for m in (plain, ckpt):
            torch.manual_seed(1)
            apply_lora(m, rank=4, alpha=8.0)
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
    apply_checkpointing(ckpt)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 16))
    for m in (plain, ckpt):
        torch.nn.functional.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten()).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert sum(g is not None for g in grads.values()) > len(grads) // 2  # unrouted experts: None
    for n, p in ckpt.named_parameters():
        if p.requires_grad and grads[n] is None:
            assert p.grad is None
        elif p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tied, autocast", [(False, False), (True, False), (False, True)])
def test_fused_loss_equals_cross_entropy_of_logits(tied, autocast):
    torch.manual_seed(0)
    model = build_model(spec(tied_embeddings=tied))
    tokens = torch.randint(0, BASE["vocab_size"], (3, 20))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    grads = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = model.loss(tokens, targets)
            else:
                loss = torch.nn.functional.cross_entropy(
                    model(tokens).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        grads.append((float(loss.detach()),
                      {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (plain_loss, plain), (fused_loss, fused) = grads
    tol = 2e-2 if autocast else 1e-5
    assert fused_loss == pytest.approx(plain_loss, rel=1e-3 if autocast else 1e-6)
    for name, g in plain.items():
        torch.testing.assert_close(fused[name], g, atol=tol * float(g.abs().max()), rtol=tol)


def test_fused_loss_in_chunks_sums_the_lm_head_gradient_in_row_blocks(monkeypatch):
    """Several chunks under bf16 autocast: each later chunk's product is added into the fp32
    lm_head gradient in row blocks (here of 64 elements); the gradients equal one chunk's."""
    import estimator.executor.kernels.loss as loss_kernels

    monkeypatch.setattr(loss_kernels, "MIXED_ADD_BLOCK_ELEMENTS", 64)
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    grads = []
    for chunk_rows in (7, 50):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_kernels.fused_linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows)
        loss.backward()
        grads.append((float(loss.detach()), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    (chunked, gh, gw), (whole, gh1, gw1) = grads
    assert w.grad is None and gw.dtype == torch.float32
    assert chunked == pytest.approx(whole, rel=1e-6)
    torch.testing.assert_close(gh, gh1)
    torch.testing.assert_close(gw, gw1, atol=1e-3 * float(gw1.abs().max()), rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_loss_in_16_bits_keeps_far_off_targets_exact(dtype):
    """16-bit logits: the loss is −log of the 16-bit softmax at the target; a row whose target
    probability is below the dtype's smallest normal (here 100 nats off) takes the exact fp32
    logsumexp instead of log(0) = inf. Loss and gradients against F.cross_entropy of the same
    16-bit logits upcast to fp32."""
    from estimator.executor.kernels import fused_linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(6, 8, dtype=dtype)
    w = torch.randn(50, 8, dtype=dtype)
    h[0], w[1], w[2] = 0.0, 0.0, 0.0
    h[0, 0], w[1, 0], w[2, 0] = 10.0, 10.0, 0.0  # row 0: logit 100 on word 1, 0 on its target 2
    targets = torch.tensor([2, 3, 4, -100, 5, 6])
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, targets)
    loss.backward()
    gh, gw = h.grad, w.grad
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy((h @ w.T).float(), targets)
    ref.backward()
    loss, ref = float(loss.detach()), float(ref.detach())
    assert math.isfinite(loss) and loss == pytest.approx(ref, rel=1e-3)
    assert ref > 100 / 5  # row 0 alone contributes 100 nats over 5 valid rows
    for mine, theirs in ((gh, h.grad), (gw, w.grad)):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=2e-2,
                                   atol=1e-2 * float(theirs.abs().max()))


def _accelerator():
    acc = getattr(torch, "accelerator", None)
    device = acc.current_accelerator() if acc is not None and acc.is_available() else None
    if device is None:
        pytest.skip("no accelerator (cuda/rocm/xpu/mps)")
    return device


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama-gqa", "deepseek-moe-shared-dense-first"])
def test_accelerator_matches_cpu_with_lora_nf4_checkpointing(name):
    from estimator.executor.nf4 import apply_nf4

    device = _accelerator()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cpu = build_model(spec(**SPECS[name]))
    acc = build_model(spec(**SPECS[name]), device=device)
    acc.load_state_dict(cpu.state_dict())
    for m in (cpu, acc):
        apply_lora(m, rank=4, alpha=8.0)
    with torch.no_grad():
        for n, p in cpu.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    acc.load_state_dict(cpu.state_dict())  # same adapters (the devices' RNGs differ)
    for m in (cpu, acc):
        apply_checkpointing(apply_nf4(m))
    acc_buffers = dict(acc.named_buffers())
    packed = [(k, v) for k, v in cpu.named_buffers() if k.endswith("weight_packed")]
    assert packed
    for key, value in packed:  # same NF4 codes on both devices
        assert torch.equal(acc_buffers[key].cpu(), value), key
    q_cpu, q_acc = cpu.layers[0].self_attn.q_proj, acc.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_acc.dequantized_weight().cpu(), q_cpu.dequantized_weight())
    tokens = torch.randint(0, BASE["vocab_size"], (2, 16))
    for m, t in ((cpu, tokens), (acc, tokens.to(device))):
        m.loss(t[:, :-1], t[:, 1:]).backward()
    assert acc.layers[0].self_attn.q_proj.weight_packed.device.type == device.type
    for (n, p_cpu), p_acc in zip(cpu.named_parameters(), acc.parameters(), strict=True):
        if p_cpu.grad is not None:
            torch.testing.assert_close(p_acc.grad.cpu(), p_cpu.grad, atol=1e-4, rtol=1e-3,
                                       msg=n)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = acc.loss(tokens[:, :-1].to(device), tokens[:, 1:].to(device))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    from estimator.executor.checkpointing import compile_blocks

    torch.manual_seed(0)
    eager = build_model(spec(num_layers=1))
    compiled = build_model(spec(num_layers=1))
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(apply_checkpointing(compiled))
    tokens = torch.randint(0, BASE["vocab_size"], (2, 16))
    for m in (eager, compiled):
        m.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)



def _with_and_without_row_shaping(model, monkeypatch) -> list[tuple[torch.Tensor, list]]:
    """(loss, fp32 gradients of the trainable parameters) with expert rows padded for oneDNN
    (forced on), then with whole groups."""
    import estimator.executor.model as model_module

    tokens = torch.randint(0, BASE["vocab_size"], (3, 50))
    results = []
    for shaped in (True, False):
        monkeypatch.setattr(model_module, "_reuses_shapes", lambda x, shaped=shaped: shaped)
        model.zero_grad(set_to_none=True)
        loss = model.loss(tokens, tokens)
        loss.backward()
        results.append((loss.detach(),
                        [p.grad.float() for p in model.parameters() if p.requires_grad]))
    return results


def test_bf16_moe_padded_expert_groups_match_whole_groups(monkeypatch):
    """Padding each expert's rows to multiples of 32 (oneDNN kernel reuse on CPU bf16, full
    fine-tune) computes the same function: equal loss and gradients up to bf16 rounding."""
    torch.manual_seed(0)
    model = build_model(spec(moe=MOE), dtype=torch.bfloat16)
    (pad_loss, pad_grads), (loss, grads) = _with_and_without_row_shaping(model, monkeypatch)
    torch.testing.assert_close(pad_loss, loss, atol=1e-2, rtol=1e-2)
    for a, b in zip(pad_grads, grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2 * float(b.abs().max()) + 1e-6, rtol=0)


def test_pad_groups_places_each_expert_group_at_a_multiple_of_the_granule():
    from estimator.executor.model import _pad_groups

    counts = [5, 0, 3]
    token_M = torch.tensor([7, 1, 2, 3, 4, 0, 5, 6])
    weight_M = torch.arange(1.0, 9.0)
    token_P, weight_P, padded = _pad_groups(token_M, weight_M, counts, granule=4, pad_token=99)
    assert padded == [8, 0, 4]
    assert token_P.tolist() == [7, 1, 2, 3, 4, 99, 99, 99, 0, 5, 6, 99]
    assert weight_P.tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 6, 7, 8, 0]


@pytest.mark.parametrize("shared", [0, 1])
def test_padded_adapted_experts_match_whole_groups(monkeypatch, shared: int):
    """Padding LoRA-adapted experts' rows to multiples of 32 (CPU, 16-bit: one kernel per
    shape) computes the same function: pad rows read a zero row with weight 0. Forced on in
    fp32, loss and every LoRA gradient equal the unpadded run's to fp32 rounding."""
    torch.manual_seed(0)
    moe = MOE.model_copy(update={"num_shared_experts": shared})
    model = build_model(spec(moe=moe), dtype=torch.float32)
    apply_lora(model, rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj", "q_proj"))
    for name, p in model.named_parameters():  # B = 0 at init: give the adapters weight
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    (pad_loss, pad_grads), (loss, grads) = _with_and_without_row_shaping(model, monkeypatch)
    torch.testing.assert_close(pad_loss, loss)
    for a, b in zip(pad_grads, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def _grads(fn, tensors, grad_outs, autocast: bool):
    for t in tensors:
        t.grad = None
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        outs = fn()
    torch.autograd.backward(outs, grad_outs)
    return [o.detach() for o in outs], [t.grad for t in tensors]


@pytest.mark.parametrize("dtype,autocast,bias", [(torch.float32, False, False),
                                                 (torch.float32, True, True),
                                                 (torch.bfloat16, False, False)])
def test_fused_ffn_and_norm_linears_match_the_composite(dtype, autocast, bias):
    """_SwiGLUDown and _NormLinears (which keep fewer tensors for backward) against the modules
    they replace: outputs and weight gradients bit-identical; the input and norm-weight
    gradients sum three products in another order (last-bit differences in 16-bit)."""
    from torch import nn

    from estimator.executor.kernels import _SiLUMul, _SwiGLUDown
    from estimator.executor.model import RMSNorm, project_normed

    torch.manual_seed(0)
    act = torch.bfloat16 if autocast else dtype
    g, u = (torch.randn(2, 8, 48, dtype=act, requires_grad=True) for _ in range(2))
    down = nn.Linear(48, 24, bias=bias).to(dtype)
    dy = [torch.randn(2, 8, 24, dtype=act)]
    tensors = [g, u, *down.parameters()]
    ref = _grads(lambda: [down(_SiLUMul.apply(g, u))], tensors, dy, autocast)
    new = _grads(lambda: [_SwiGLUDown.apply(g, u, down.weight, down.bias)], tensors, dy,
                 autocast)
    for a, b in zip([*ref[0], *ref[1]], [*new[0], *new[1]], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)

    norm = RMSNorm(32, 1e-6).to(dtype)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    linears = [nn.Linear(32, n, bias=bias).to(dtype) for n in (32, 16, 16)]
    x = torch.randn(2, 8, 32, dtype=dtype, requires_grad=True)
    dys = [torch.randn(2, 8, n, dtype=act) for n in (32, 16, 16)]
    tensors = [x, norm.weight, *(p for lin in linears for p in lin.parameters())]
    ref = _grads(lambda: [lin(norm(x)) for lin in linears], tensors, dys, autocast)
    new = _grads(lambda: project_normed(norm, linears, x), tensors, dys, autocast)
    for a, b in zip(ref[0], new[0], strict=True):
        assert torch.equal(a, b)
    for i, (a, b) in enumerate(zip(ref[1], new[1], strict=True)):
        assert a.dtype == b.dtype
        if i < 2:  # ∂x, ∂norm weight
            torch.testing.assert_close(a, b, rtol=0, atol=8e-3 * float(a.abs().max()))
        else:
            assert torch.equal(a, b)


def test_tied_weight_gradient_is_formed_once_without_vocab_sized_temporaries():
    """A trained tied embedding: the loss's ∂W takes the embedding's rows in place
    (TiedGradient), so backward creates no [V, D] tensor (autograd would create the embedding's
    dense gradient and the sum of the two)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class VocabSized(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.created = shape, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape \
                    and not name.endswith("_") and name not in ("detach", "alias", "view"):
                self.created.append(name)
            return out

    torch.manual_seed(0)
    model = build_model(spec(tied_embeddings=True))
    weight = model.embed_tokens.weight
    tokens = torch.randint(0, BASE["vocab_size"], (2, 16))
    loss = model.loss(tokens, tokens.roll(-1, dims=1))
    mode = VocabSized(tuple(weight.shape))
    with mode:
        loss.backward()
    assert mode.created == []
    reference = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1),
                                                  tokens.roll(-1, dims=1).flatten())
    expected, = torch.autograd.grad(reference, weight)
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-6)
