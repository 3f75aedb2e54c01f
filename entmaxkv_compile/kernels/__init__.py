"""Triton kernels of the GPU decode path: metadata, scoring, τ solve, output (docs/KERNELS.md)."""
