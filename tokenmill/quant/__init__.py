"""Quantization: FP8 weights (fp8.py); the FP8 KV cache is a cache dtype of the triton attention backend."""
