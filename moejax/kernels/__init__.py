"""Pallas kernels. moejax.kernels.gmm: grouped matmul (gmm) and its transposed product
(tgmm), differentiable, with Triton (GPU) and Mosaic (TPU) lowerings."""
