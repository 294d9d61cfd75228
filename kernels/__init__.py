"""kiln's custom PyTorch operators: callers use `kernels.ops`; `kernels.reference` is the truth."""
