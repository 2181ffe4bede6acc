"""The planner reserves the scratch the CUDA quantized matmuls allocate, so a prefill stays under the cap."""

import pytest
import torch

from shardq.quant import sizing
from shardq.config import QuantConfig
from shardq.kernels import cuda_ops


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (512, 2816, 1024), (4096, 11008, 4096), (300, 1003, 4097),
                                   (40, 96, 50)])
@pytest.mark.parametrize("threshold,itemsize", [(6.0, 2), (0.0, 2), (6.0, 4)])
def test_int8_workspace_covers_kernel_scratch(m, n, k, threshold, itemsize):
    xo = m * cuda_ops.int8_outlier_cap(m, k, threshold) * itemsize  # as int8_linear sizes it
    scratch, _ = cuda_ops._int8_scratch(m, k, torch.device("cpu"), xo)
    int32_out = 4 * m * (-(-n // 8) * 8)
    padded = (m * (-(-k // 8) * 8) + (-(-n // 8) * 8) * (-(-k // 8) * 8)) if (n % 8 or k % 8) else 0
    got = sizing.matmul_workspace_bytes([(n, k)], QuantConfig("int8", threshold=threshold), m, itemsize)
    assert got >= scratch.numel() + int32_out + padded


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_workspace_is_the_dequantized_chunk_only_for_large_m(method):
    cfg = QuantConfig(method)
    assert sizing.matmul_workspace_bytes([(28672, 8192)], cfg, cuda_ops.SMALL_M, 2) == 0
    # the GEMV's K split (x too large to stage whole) sums in fp32: 4 bytes per token and output feature
    assert sizing.matmul_workspace_bytes([(28672, 8192)], cfg, 16, 2) == 4 * 16 * 28672
    assert sizing.matmul_workspace_bytes([(1000, 1024)], cfg, 16, 2) == 0  # K < 2048: no split
    # the ring kernel's K in parts (M > 8, fewer row tiles than SMs): fp32 sums per part
    assert sizing.matmul_workspace_bytes([(4096, 4096)], cfg, 32, 2) == 4 * cuda_ops.TC_SPLIT_PARTS * 32 * 4096
    assert sizing.matmul_workspace_bytes([(1000, 1024)], cfg, 8, 2) == 0
    full = sizing.matmul_workspace_bytes([(1024, 1024)], cfg, 512, 2)
    assert full == 1024 * 1024 * 2
    big = sizing.matmul_workspace_bytes([(65536, 8192)], cfg, 512, 2)  # 1 GiB in fp16: chunked
    assert big <= cuda_ops.DEQUANT_CHUNK_BYTES and big >= cuda_ops.DEQUANT_CHUNK_BYTES - 8192 * 2


def test_4bit_workspace_covers_the_wgmma_k_split(monkeypatch):
    """32 < M <= 128 on Hopper may split K (csrc/gemm_4bit_wgmma.cu): fp32 partials of up to WGMMA_MAX_SPLITS runs,
    reserved even when the dequantized chunk is smaller."""
    monkeypatch.setattr(cuda_ops, "DEQUANT_CHUNK_BYTES", 4096)
    cfg = QuantConfig("nf4")
    m, n, k = 100, 1000, 4096
    assert sizing.matmul_workspace_bytes([(n, k)], cfg, m, 2) == 4 * cuda_ops.WGMMA_MAX_SPLITS * m * n
    assert sizing.matmul_workspace_bytes([(n, k)], cfg, cuda_ops.WGMMA_MAX_M + 1, 2) == k * 2  # one row


def test_4bit_fp32_workspace_follows_the_fp32_kernel(monkeypatch):
    """fp32 activations (a default BitsAndBytesConfig): the fp32 kernel (M <= F32_MAX_M, K % 32 == 0, one token's x
    in the smallest shared memory) needs no scratch; elsewhere W is dequantized to fp32 in chunks."""
    cfg = QuantConfig("nf4")
    chunk = 1024 * 4096 * 4  # the whole weight dequantized to fp32 (under DEQUANT_CHUNK_BYTES)
    assert sizing.matmul_workspace_bytes([(1024, 4096)], cfg, cuda_ops.F32_MAX_M, 4) == 0
    assert sizing.matmul_workspace_bytes([(1024, 4096)], cfg, cuda_ops.F32_MAX_M + 1, 4) == chunk
    assert sizing.matmul_workspace_bytes([(1024, 4097)], cfg, 1, 4) == 1024 * 4097 * 4  # odd K
    wide = (cuda_ops.F32_MIN_SMEM // 4 // 32 + 1) * 32  # one token's x past the smallest shared memory
    assert sizing.matmul_workspace_bytes([(16, wide)], cfg, 1, 4) == 16 * wide * 4
    monkeypatch.setattr(cuda_ops, "GEMM4_F32", False)
    assert sizing.matmul_workspace_bytes([(1024, 4096)], cfg, 1, 4) == chunk


def test_plan_reserves_workspace_on_gpus_with_quantized_blocks():
    transformers = pytest.importorskip("transformers")
    from shardq.planning.planner import plan_model

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.float16)
    for quant, expect in [("int8", True), ("nf4", True), ("none", False)]:
        plan = plan_model(model, quant=quant, max_memory={0: "1GB", "cpu": "1GB"}, gpus=["1GB"], workload=(1, 512))
        assert ("matmul workspace" in plan.reserve_detail[0]) is expect
        assert plan.totals[0] + plan.reserves[0] <= plan.budgets[0]
