"""CPU kernels in C, compiled on first use with the system C compiler and called through ctypes."""
