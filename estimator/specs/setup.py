"""The training (or inference) setup: method, precision, optimizer, batch and sequence."""

from typing import Literal

from pydantic import Field, model_validator

from estimator.specs.base import Spec

Method = Literal["full", "lora", "qlora", "inference"]
Optimizer = Literal["adamw", "adamw8bit", "sgd", "sgd_momentum", "adafactor", "lion"]
ComputeDtype = Literal["fp32", "bf16", "fp16"]
AttentionKernel = Literal["sdpa", "eager"]
Offload = Literal["none", "optimizer", "optimizer_and_params"]
Framework = Literal["nvfree", "hf", "torchtune", "litgpt"]
"""The training code whose memory and time an estimate describes: the bundled trainer
(`nvfree train`), Hugging Face Transformers' Trainer + PEFT (+ bitsandbytes for 4/8-bit),
torchtune's single-device/distributed recipes, or LitGPT's finetune scripts
(docs/frameworks.md)."""

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""PEFT module names of the linears in a Llama-style block; 'all-linear' expands to these."""


class TrainSetup(Spec):
    """How the model is trained (or run): everything but the model and the device."""

    framework: Framework = "hf"
    """The code that runs the training: 'hf' (Transformers Trainer + PEFT + bitsandbytes, what
    most users run; the default of estimate and compare), 'torchtune', 'litgpt', or 'nvfree'
    (the bundled trainer, which `nvfree train`, `plan` and `run` always use). Memory and time
    terms follow its code (docs/frameworks.md)."""
    method: Method = "full"
    """full fine-tune, LoRA, QLoRA (4-bit NF4 frozen base + LoRA), or inference only."""
    weight_bits: Literal[4, 8, 16, 32] = 16
    """Storage bits of the (frozen or trained) base weights; QLoRA implies 4 (NF4)."""
    compute_dtype: ComputeDtype = "bf16"
    """Dtype of matmuls and activations."""
    mixed_precision: bool = True
    """Keep fp32 master weights, fp32 grads and fp32 optimizer states, compute in 16-bit
    (torch.autocast style). False = pure training in the storage dtype (model.to(bfloat16))."""
    double_quant: bool = True
    """NF4 block absmax values themselves quantised to 8 bits (QLoRA double quantisation)."""
    optimizer: Optimizer = "adamw"
    """Optimizer of the trainable parameters."""
    lora_rank: int = Field(default=16, gt=0, le=2**16)
    """LoRA rank r (elements); at most the hidden size (checks.check), so 65,536 bounds it."""
    lora_alpha: float = Field(default=32.0, gt=0)
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    lora_targets: tuple[str, ...] = LINEAR_TARGETS
    """PEFT module names that get adapters (q_proj, v_proj, ...)."""
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout probability on the adapters' input (PEFT `lora_dropout`); above 0 every adapted
    linear keeps its own dropped-out input and the dropout's noise for backward."""
    batch_size: int = Field(default=1, gt=0, le=2**20)
    """Micro-batch per device per step (sequences; at most 2^20, the largest global batch
    inputs.RANGES takes)."""
    seq_len: int = Field(default=2048, gt=0, le=2**24)
    """Tokens per sequence (at most 2^24 = 16.8M, beyond the longest context any model
    publishes, 10M for Llama 4 Scout)."""
    grad_accum: int = Field(default=1, gt=0, le=2**20)
    """Micro-batches accumulated per optimizer step (count; at most 2^20, the largest global
    batch)."""
    optimizer_in_backward: bool = False
    """Apply the optimizer to each parameter as soon as backward has accumulated its gradient,
    then free that gradient (torch's register_post_accumulate_grad_hook): gradients never all
    exist at once. Needs one micro-batch per step and one process; no global gradient-norm
    clipping (the norm is not known until every gradient exists)."""
    checkpointing: bool = False
    """Gradient (activation) checkpointing of every transformer block."""
    attention: AttentionKernel = "sdpa"
    """SDPA/flash-style attention (no s² saved) or eager attention (saves probabilities)."""
    fused_loss: bool = True
    """lm_head + cross-entropy fused in row chunks, gradients formed in the forward pass (the
    bundled trainer; Liger-Kernel style): only [chunk, V] logits exist. False = full b·s·V
    logits as `F.cross_entropy(model(x).float())` (HF Trainer's default). torchtune: its
    chunked loss (`CEWithChunkedOutputLoss`, 8 chunks upcast one at a time) when True, else
    `torch.nn.CrossEntropyLoss`; LitGPT always chunks (`lm_head_chunk_size=128`)."""
    compile: bool = False
    """torch.compile of the decoder blocks (torchtune's `compile: True`: every
    TransformerSelfAttentionLayer, and the chunked loss's upcast + cross-entropy). Read by the
    torchtune terms (inductor saves fewer tensors); the other frameworks' terms ignore it."""
    activation_offloading: bool = False
    """torchtune's `enable_activation_offloading`: what the forward saves outside the loss head
    (with checkpointing: each block's input) is copied to host memory and brought back in
    backward. Needs checkpointing; only the torchtune terms model it."""
    num_tokens: int | None = Field(default=None, gt=0, le=10**16)
    """Training token budget for the wall-time and cost estimate (tokens; inputs.RANGES)."""
    num_devices: int = Field(default=1, gt=0, le=2**20)
    """Data-parallel devices in total, over all nodes (count; at most 2^20, five times the
    largest cluster built, ~200k GPUs); each runs batch_size."""
    num_nodes: int = Field(default=1, gt=0, le=2**20)
    """Machines the devices are spread over, evenly (count)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO sharding over the devices: 0 = DDP (all replicated), 1 = optimizer states,
    2 = + gradients, 3 = + parameters (FSDP full shard)."""
    offload: Offload = "none"
    """CPU offload (ZeRO-Offload): optimizer states, or optimizer states and parameters, live
    in host memory; the optimizer step runs on the host."""
    expert_parallel: int = Field(default=1, gt=0, le=2**20)
    """MoE expert-parallel degree: routed experts split over this many devices (count);
    must divide num_devices."""

    @model_validator(mode="after")
    def _check(self) -> "TrainSetup":
        if self.method == "qlora" and self.weight_bits != 4:
            raise ValueError("QLoRA stores the frozen base in 4-bit NF4: use bits 4")
        if self.method == "full" and self.weight_bits < 16:
            raise ValueError(
                f"a full fine-tune cannot train {self.weight_bits}-bit weights; "
                "use --method qlora (4-bit) or --bits 16"
            )
        if self.num_devices % self.num_nodes:
            raise ValueError(f"{self.num_devices} devices cannot be spread evenly over "
                             f"{self.num_nodes} nodes")
        if self.optimizer_in_backward and self.grad_accum > 1:
            raise ValueError("the optimizer step in backward frees each gradient once it is "
                             "applied, so it cannot accumulate micro-batches: use --grad-accum 1")
        if self.optimizer_in_backward and (self.num_devices > 1 or self.offload != "none"):
            raise ValueError("the optimizer step in backward runs on one device without "
                             "offload (data parallelism averages gradients after backward)")
        if self.activation_offloading and not self.checkpointing:
            raise ValueError("activation offloading moves the checkpointed block inputs to host "
                             "memory: use it with --checkpointing")
        if self.num_devices % self.expert_parallel:
            raise ValueError(f"expert-parallel degree {self.expert_parallel} must divide "
                             f"the {self.num_devices} devices")
        return self

    @property
    def fuses_loss(self) -> bool:
        """True when lm_head + cross-entropy run fused in row chunks: the bundled trainer with
        fused_loss (HF Transformers always forms the full b·s·V logits)."""
        return self.framework == "nvfree" and self.fused_loss

    @property
    def upcasts_frozen_base(self) -> bool:
        """LoRA with a 16-bit base under fp32 compute (`--bits 16 --dtype fp32`): the bundled
        trainer stores the frozen base in bf16 and upcasts each weight to fp32 for its own
        matmul only (executor/lora.upcast_frozen_base); adapters, norms and activations fp32.
        Half the base memory of fp32 at fp32 GEMM speed, for CPUs without bf16 matrix units."""
        return self.method == "lora" and self.weight_bits == 16 and self.compute_dtype == "fp32"

    @property
    def trains_adapters(self) -> bool:
        """True for LoRA and QLoRA."""
        return self.method in ("lora", "qlora")

    @property
    def tokens_per_micro_batch(self) -> int:
        """Tokens in one micro-batch on one device: batch_size × seq_len (tokens)."""
        return self.batch_size * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens processed per optimizer step on one device (tokens)."""
        return self.tokens_per_micro_batch * self.grad_accum

    @property
    def global_tokens_per_step(self) -> int:
        """Tokens processed per optimizer step over all devices (tokens)."""
        return self.tokens_per_step * self.num_devices
