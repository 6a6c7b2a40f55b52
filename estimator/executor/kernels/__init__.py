"""The executor's custom autograd functions ("kernels", in plain PyTorch): each computes what a
composite of torch ops would, but keeps fewer tensors for backward or forms a gradient once.

- norm.py: RMSNorm that keeps x and the fp32 rstd (_RMSNormFunction); RMSNorm fused with the
  linears that read its output, recomputing the norm in backward (_NormLinears).
- swiglu.py: silu(g) ⊙ u keeping g and u (_SiLUMul); the same fused with a trained down_proj
  (_SwiGLUDown).
- loss.py: lm_head + cross-entropy in row chunks, gradients formed in the forward pass
  (fused_linear_cross_entropy), and a tied embedding's gradient formed once (TiedGradient).

The model (estimator/executor/model.py) calls them; gradients are checked against the
composites in tests/torch/test_model.py and tests/torch/test_activation_parity.py.
"""

from estimator.executor.kernels.loss import (
    MIXED_ADD_BLOCK_ELEMENTS,
    TiedGradient,
    _EmbeddingIntoTiedGradient,
    _LinearCrossEntropy,
    fused_linear_cross_entropy,
)
from estimator.executor.kernels.norm import _NormLinears, _RMSNormFunction
from estimator.executor.kernels.swiglu import _SiLUMul, _SwiGLUDown

__all__ = ["MIXED_ADD_BLOCK_ELEMENTS", "TiedGradient", "_EmbeddingIntoTiedGradient",
           "_LinearCrossEntropy", "_NormLinears", "_RMSNormFunction", "_SiLUMul", "_SwiGLUDown",
           "fused_linear_cross_entropy"]
