"""Kernels: `cpu/` holds the C kernels (compiled on the user's machine, called through ctypes) and
`triton/` the Triton kernels for the GPU. Importing this package imports neither: triton is only
needed (and only imported) where a Triton kernel runs, so a plain CPU install works without it."""
