"""Kernels for the compiled engine: artifact files -> quantized weights (`weights`), kernel-backed linear
modules (`linear`), the decoder they plug into (`llama`), and which kernel serves what on which GPU (`choices`)."""
