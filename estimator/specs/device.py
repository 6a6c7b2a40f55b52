"""A device to train on: memory, bandwidth, peak rates by dtype, price, sources."""

from typing import Literal

from pydantic import Field

from estimator.specs.base import Spec

DeviceKind = Literal["cpu", "gpu", "tpu", "accelerator"]
Backend = Literal["cpu", "cuda", "rocm", "mps", "xpu", "xla", "hpu", "neuron"]
PeakDtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8"]


class Device(Spec):
    """One device (a GPU, an accelerator chip, or a whole CPU socket/machine)."""

    name: str
    """Catalogue key, lower-case (e.g. 'mi300x', 'xeon-8480+', 'local')."""
    display_name: str
    """Human name with vendor (e.g. 'AMD Instinct MI300X')."""
    vendor: str
    """Vendor name."""
    kind: DeviceKind
    """cpu, gpu, tpu or other accelerator."""
    backend: Backend
    """The PyTorch backend that drives it."""
    memory_bytes: int = Field(gt=0)
    """Memory usable for training on one device (bytes): HBM/VRAM, or RAM for a CPU."""
    memory_bandwidth_bytes_per_second: float = Field(gt=0)
    """Peak memory bandwidth (bytes/s)."""
    peak_flops_per_second: dict[PeakDtype, float]
    """Dense (no sparsity) peak rate per dtype (FLOP/s); absent = unknown or unsupported."""
    achievable_matmul_fraction: float | None = Field(default=None, gt=0, le=1)
    """Best measured large-GEMM rate / peak (fraction), e.g. stas00 MAMF; None = unknown."""
    unified_memory: bool = False
    """Memory shared with the host OS (CPUs, Apple silicon): the OS and other programs use
    part of memory_bytes."""
    num_cores: int | None = Field(default=None, gt=0)
    """Physical cores (CPUs only, count)."""
    isa: tuple[str, ...] = ()
    """CPU instruction-set features that matter (avx2, avx512f, avx512_bf16, amx_bf16, neon…)."""
    interconnect_bytes_per_second: float | None = Field(default=None, gt=0)
    """Device-to-device bandwidth per direction inside one node (bytes/s); None = unknown."""
    network_bytes_per_second: float | None = Field(default=None, gt=0)
    """Inter-node network bandwidth per device, per direction (bytes/s); None = unknown (a
    documented default is used and stated)."""
    devices_per_node: int | None = Field(default=None, gt=0, le=2**20)
    """Devices on one fast interconnect (the network model's 'node'): a TPU slice's chips all
    share the ICI torus (v5p: up to 6,144 in one slice); None = the default rule
    (planner/fit.py per_node: 8 accelerators per board, 1 CPU or desktop machine)."""
    desktop: bool = False
    """A machine people buy for a desk (consumer/workstation GPU, Apple machine, desktop CPU):
    one device per machine, and machines linked by 10 GbE unless a network is given."""
    tdp_watts: float | None = Field(default=None, gt=0)
    """Board/package power (W)."""
    price_per_hour_usd: float | None = Field(default=None, ge=0)
    """On-demand rental price for one device (USD/hour); None = unknown."""
    price_source: str | None = None
    """Where and when the price was read."""
    sources: tuple[str, ...] = ()
    """URLs / documents behind the numbers."""
    notes: str | None = None
    """Caveats (e.g. 'two GCDs, each a separate 64 GB device')."""

    def peak_for(self, dtype: str) -> float | None:
        """Peak FLOP/s for a compute dtype, or None if the catalogue does not know it."""
        return self.peak_flops_per_second.get(dtype)  # type: ignore[call-overload]
