"""The stored quantization formats, value for value those of bitsandbytes, in plain PyTorch.

`codebooks` (NF4, FP4, dynamic 8-bit maps), `blockwise` (4-bit + double quant) and `int8` (LLM.int8()): the
reference every kernel is tested against, and the CPU path. Nothing here imports the rest of shardq.
"""
