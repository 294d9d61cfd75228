"""kiln's custom PyTorch operators: `kernels.ops` is the face callers use, `kernels.reference` the truth."""
