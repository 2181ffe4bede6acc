"""Quantization formats (bitsandbytes-compatible) and their pure-PyTorch reference.

`codebooks` (NF4, FP4, dynamic 8-bit maps), `blockwise` (4-bit + double quant), `int8` (LLM.int8()),
`linear` (Linear4bit, Linear8bit, quantize_model, dequantize_model, memory_footprint) and `serialize`
(the transformers + bitsandbytes safetensors layout). The ops in `shardq.kernels.ops` wrap the references.
"""
