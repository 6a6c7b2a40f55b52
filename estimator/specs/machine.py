"""What `nvfree hardware` found on this machine: CPU, RAM and the torch accelerators present."""

from typing import Literal

from pydantic import Field

from estimator.specs.base import Spec

AcceleratorBackend = Literal["cuda", "rocm", "mps", "xpu"]


class AcceleratorInfo(Spec):
    """One accelerator that torch can drive (a CUDA/ROCm/XPU device or the Apple MPS GPU)."""

    backend: AcceleratorBackend
    """PyTorch backend: cuda, rocm (torch.version.hip set), mps or xpu."""
    index: int = Field(ge=0)
    """Device index within the backend (count, 0-based)."""
    name: str
    """Device name as the driver reports it (e.g. 'NVIDIA H100 80GB HBM3')."""
    memory_bytes: int | None = Field(default=None, gt=0)
    """Total device memory (bytes); for MPS the recommended maximum working set; None = unknown."""
    memory_bandwidth_bytes_per_second: float | None = Field(default=None, gt=0)
    """Peak memory bandwidth derived from the reported memory clock and bus width (bytes/s);
    None = the driver does not say."""
    num_compute_units: int | None = Field(default=None, gt=0)
    """Streaming multiprocessors / compute units / Xe cores (count); None = unknown."""
    runtime_version: str | None = None
    """CUDA / HIP / driver version torch was built against, if known."""


class MachineInfo(Spec):
    """The local machine as detected: enough to build a Device and a profile fingerprint."""

    os: str
    """Operating system (platform.system(): Linux, Darwin, Windows)."""
    arch: str
    """CPU architecture (platform.machine(): x86_64, aarch64, arm64)."""
    cpu_brand: str
    """CPU model string (e.g. 'Intel(R) Xeon(R) Platinum 8480+')."""
    cpu_vendor: str
    """CPU vendor id (GenuineIntel, AuthenticAMD, ARM, Apple; '' if unknown)."""
    cpu_family: int | None = None
    """x86 CPU family number from CPUID (e.g. 25 = AMD Zen 3/4, 26 = Zen 5); None elsewhere."""
    cpu_model: int | None = None
    """x86 CPU model number from CPUID; None elsewhere."""
    num_physical_cores: int = Field(gt=0)
    """Physical cores the OS reports (count)."""
    num_logical_cores: int = Field(gt=0)
    """Logical CPUs incl. SMT siblings (count)."""
    num_usable_cores: int = Field(gt=0)
    """Logical CPUs this process may run on (sched affinity / cgroup quota) (count)."""
    max_frequency_hz: float | None = Field(default=None, gt=0)
    """Maximum (turbo) clock the OS reports (Hz); None in many VMs."""
    current_frequency_hz: float | None = Field(default=None, gt=0)
    """Current clock the OS reports (Hz); in a VM usually the nominal host clock."""
    isa: tuple[str, ...] = ()
    """ISA features that matter for training, lower-case (avx2, fma, avx512f, avx512_bf16,
    avx512_fp16, amx_bf16, amx_int8, amx_tile, amx_fp16, neon, sve, sme …)."""
    virtualized: bool = False
    """Running under a hypervisor (CPUID hypervisor bit): clocks and bandwidth are the host's
    business and cannot be read from inside."""
    memory_total_bytes: int = Field(gt=0)
    """Installed RAM the OS sees (bytes)."""
    memory_available_bytes: int = Field(ge=0)
    """RAM available to new processes right now (bytes)."""
    torch_version: str | None = None
    """Installed torch version from package metadata (torch not imported); None = not installed."""
    torch_probed: bool = False
    """True if torch was imported to list accelerators (detect(probe_torch=True))."""
    torch_cpu_capability: str | None = None
    """torch.backends.cpu.get_cpu_capability() (e.g. 'AVX512'), only when torch was probed."""
    accelerators: tuple[AcceleratorInfo, ...] = ()
    """Accelerators torch can use; empty when none or when torch was not probed."""
