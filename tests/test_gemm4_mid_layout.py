"""CPU model of the index math of csrc/gemm_4bit_mid.cu, checked against a float64 reference.

The model replays, lane by lane, the kernel's tile raster (bands of M tiles), its cp.async copies into the ring
(packed weight bytes; x units swizzled by `v ^ (m & 1)`; nothing copied past M or N, shared memory starting as
NaN bit patterns), the lane-private pair table and its shift/mask lookup, the absmax fetched one k-tile ahead and
spread by shuffles (plain and double quant), the 16-bit scaling, the mma.m16n8k16 fragments assembled from the PTX
ISA tables, and the epilogue. Every output must be written exactly once and the error must stay within the GPU
tests' tolerance (4x a same-precision matmul). Keep it in step with the kernel when its tiling changes (MidCfg,
x_unit, tile_of, issue, MidWarp).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardq.formats import codebooks

THREADS, BN, BK, BAND = 256, 128, 64, 8
W_STAGE = BN * BK // 2
TABLE_WORDS = 256 * 32
NF4 = codebooks.code_4bit("nf4").numpy().astype(np.float32)


def _bf16_bits(a) -> np.ndarray:
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF).astype(np.uint16)


def to16(a, dt: str) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16).view(np.uint16) if dt == "f16" else _bf16_bits(a)


def from16(u, dt: str) -> np.ndarray:
    u = np.asarray(u, np.uint16)
    if dt == "f16":
        return u.view(np.float16).astype(np.float64)
    return (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def pack_pair(lo, hi, dt: str) -> np.ndarray:
    return to16(lo, dt).astype(np.uint32) | (to16(hi, dt).astype(np.uint32) << 16)


def halves(r, dt: str) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(r, np.uint64)
    return from16((r & 0xFFFF).astype(np.uint16), dt), from16((r >> 16).astype(np.uint16), dt)


def scale_pair(v, s, dt: str) -> np.ndarray:
    """__hmul2: each 16-bit product rounded once."""
    a0, a1 = halves(v, dt)
    s0, s1 = halves(s, dt)
    return pack_pair(a0 * s0, a1 * s1, dt)


def words(smem: np.ndarray, offsets, n: int) -> list[np.ndarray]:
    """n little-endian 32-bit words at each byte offset (one offset per lane)."""
    offsets = np.asarray(offsets, np.int64)
    return [smem[offsets[:, None] + 4 * w + np.arange(4)].astype(np.uint64) @ (256 ** np.arange(4, dtype=np.uint64))
            for w in range(n)]


def quantized(rng, n: int, k: int, bs: int, nested: bool):
    """nf4 codes of a random weight with large columns, and each block's real absmax (double quant decoded)."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[:, ::7] *= 8
    nblk = n * k // bs
    absmax = np.abs(w.reshape(nblk, bs)).max(1).astype(np.float32)
    codes = np.abs(w.reshape(nblk, bs)[:, :, None] / absmax[:, None, None] - NF4).argmin(2).reshape(-1)
    decode = lambda blk: absmax[blk]  # noqa: E731
    if nested:
        ncode = np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)
        off = np.float32(absmax.mean())
        nab = np.array([np.abs(absmax[i:i + 256] - off).max() for i in range(0, nblk, 256)], np.float32)
        aq = np.abs((absmax - off)[:, None] / np.repeat(nab, 256)[:nblk, None] - ncode).argmin(1)
        decode = lambda blk: ncode[aq[blk]] * nab[blk >> 8] + off  # noqa: E731
    real = decode(np.arange(nblk))
    return codes.astype(np.uint8), real, decode


class Cta:
    """One CTA of gemm4_mid<T, MT, S>: shared memory, ring copies and the 8 warps' accumulators."""

    def __init__(self, a: dict, m0: int, n0: int, mt: int, stages: int):
        self.a, self.m0, self.n0, self.mt, self.s = a, m0, n0, mt, stages
        self.bm = 16 * mt
        self.stage = W_STAGE + self.bm * BK * 2
        self.ring = (TABLE_WORDS + 256) * 4
        self.smem = np.full(self.ring + stages * self.stage, 0xFF, np.uint8)  # stale bytes: NaN patterns
        table = np.array([pack_pair(NF4[i >> 9], NF4[(i >> 5) & 15], a["dt"]) for i in range(TABLE_WORDS)], np.uint32)
        self.smem[:TABLE_WORDS * 4] = table.view(np.uint8)
        self.acc = np.zeros((8, 2, mt, 4, 32))

    def issue(self, kt: int) -> None:
        a, dst, k0 = self.a, self.ring + (kt % self.s) * self.stage, kt * BK
        for tid in range(THREADS):
            r, u = tid >> 1, tid & 1
            if self.n0 + r < a["N"]:
                src = (self.n0 + r) * (a["K"] // 2) + k0 // 2 + u * 16
                self.smem[dst + r * 32 + u * 16:dst + r * 32 + u * 16 + 16] = a["packed"][src:src + 16]
            for j in range(self.bm * 8 // THREADS):
                i = tid + j * THREADS
                m, v = i >> 3, i & 7
                if self.m0 + m < a["M"]:
                    src = ((self.m0 + m) * a["K"] + k0 + v * 8) * 2
                    d = dst + W_STAGE + (m * 8 + (v ^ (m & 1))) * 16
                    self.smem[d:d + 16] = a["xbytes"][src:src + 16]

    def fetch(self, wn: int, kt: int) -> np.ndarray:
        """Lane t's absmax: row (t >> 1, t & 1) of its group g, one k-tile ahead."""
        lane = np.arange(32)
        n = self.n0 + wn * 32 + 16 * ((lane & 3) >> 1) + 8 * (lane & 1) + (lane >> 2)
        e = n.astype(np.int64) * self.a["K"] + kt * BK
        blk = np.where(n < self.a["N"], e >> self.a["shift"], 0)
        return np.where(n < self.a["N"], self.a["decode"](blk), 0)

    def warp_tile(self, warp: int, kt: int, own: np.ndarray) -> None:
        dt, mt_n = self.a["dt"], self.mt
        lane = np.arange(32)
        g, t = lane >> 2, lane & 3
        wn, wm = warp >> 1, warp & 1
        stage = self.ring + (kt % self.s) * self.stage
        s2 = [[pack_pair(own[(lane & ~3) | (i << 1) | h], own[(lane & ~3) | (i << 1) | h], dt) for h in range(2)]
              for i in range(2)]
        row = lambda i, h: wn * 32 + 16 * i + 8 * h + g  # noqa: E731
        wv = [[words(self.smem, stage + row(i, h) * 32 + t * 8, 2) for h in range(2)] for i in range(2)]
        for jh in range(2):
            xb = [words(self.smem, stage + W_STAGE + ((wm * 8 * mt_n + mt * 8 + g) * 8
                                                     + ((2 * t + jh) ^ ((wm * 8 * mt_n + mt * 8 + g) & 1))) * 16, 4)
                  for mt in range(mt_n)]
            for jl in range(2):
                for i in range(2):
                    e0, e1 = wv[i][0][jh], wv[i][1][jh]
                    q = 2 * jl
                    regs = [scale_pair(self.lookup(e0, q), s2[i][0], dt), scale_pair(self.lookup(e1, q), s2[i][1], dt),
                            scale_pair(self.lookup(e0, q + 1), s2[i][0], dt),
                            scale_pair(self.lookup(e1, q + 1), s2[i][1], dt)]
                    for mt in range(mt_n):
                        b = (xb[mt][2], xb[mt][3]) if jl else (xb[mt][0], xb[mt][1])
                        self.mma(warp, i, mt, regs, b)

    def lookup(self, wd: np.ndarray, q: int) -> np.ndarray:
        sh = (wd << np.uint64(7)) & np.uint64(0xFFFFFFFF) if q == 0 else wd >> np.uint64(8 * q - 7)
        off = (sh & np.uint64(0x7F80)) | (np.arange(32) * 4).astype(np.uint64)
        return words(self.smem, off.astype(np.int64), 1)[0]

    def mma(self, warp: int, i: int, mt: int, a_regs: list, b_regs: tuple) -> None:
        """m16n8k16 from the PTX fragment tables: A reg r = rows g / g+8, k 2t.. / 2t+8..; B reg r = k 2t.. / 2t+8.."""
        dt = self.a["dt"]
        lane = np.arange(32)
        g, t = lane >> 2, lane & 3
        A, B = np.zeros((16, 16)), np.zeros((16, 8))
        for reg, (r_off, k_off) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
            lo, hi = halves(a_regs[reg], dt)
            A[g + r_off, 2 * t + k_off], A[g + r_off, 2 * t + 1 + k_off] = lo, hi
        for reg, k_off in enumerate([0, 8]):
            lo, hi = halves(b_regs[reg], dt)
            B[2 * t + k_off, g], B[2 * t + 1 + k_off, g] = lo, hi
        with np.errstate(all="ignore"):
            D = A @ B
        acc = self.acc[warp, i, mt]
        acc[0] += D[g, 2 * t]
        acc[1] += D[g, 2 * t + 1]
        acc[2] += D[g + 8, 2 * t]
        acc[3] += D[g + 8, 2 * t + 1]

    def run(self) -> None:
        nk = self.a["K"] // BK
        for st in range(min(self.s - 1, nk)):
            self.issue(st)
        raw = {w: self.fetch(w >> 1, 0) for w in range(8)}
        for kt in range(nk):
            if kt + self.s - 1 < nk:
                self.issue(kt + self.s - 1)
            for warp in range(8):
                own = raw[warp]
                if kt + 1 < nk:
                    raw[warp] = self.fetch(warp >> 1, kt + 1)
                self.warp_tile(warp, kt, own)

    def store(self, out: np.ndarray, written: np.ndarray, bias: np.ndarray) -> None:
        a = self.a
        for warp in range(8):
            wn, wm = warp >> 1, warp & 1
            for ln in range(32):
                g, t = ln >> 2, ln & 3
                for i in range(2):
                    for h in range(2):
                        n = self.n0 + wn * 32 + 16 * i + 8 * h + g
                        if n >= a["N"]:
                            continue
                        for mt in range(self.mt):
                            for c in range(2):
                                m = self.m0 + wm * 8 * self.mt + mt * 8 + 2 * t + c
                                if m < a["M"]:
                                    out[m, n] = self.acc[warp, i, mt, 2 * h + c, ln] + bias[n]
                                    written[m, n] += 1


def tile_of(l: int, mtiles: int, ntiles: int, bm: int) -> tuple[int, int]:
    per_band = BAND * ntiles
    band, rem = divmod(l, per_band)
    rows = min(BAND, mtiles - band * BAND)
    return (band * BAND + rem % rows) * bm, (rem // rows) * BN


@pytest.mark.parametrize("M,N,K,bs,dt,stages,mt,nested", [
    (40, 200, 192, 64, "f16", 4, 4, False),     # N tail, M tail in one 64-token tile
    (150, 136, 256, 128, "bf16", 4, 8, True),   # 128-token tiles, double quant
    (33, 130, 128, 256, "bf16", 3, 4, False),   # 3-stage ring, block spanning k-tiles
    (1100, 130, 64, 64, "f16", 4, 8, False),    # 9 M tiles: a partial raster band
])
def test_mid_kernel_model_matches_reference(M, N, K, bs, dt, stages, mt, nested):
    rng = np.random.default_rng(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run
    codes, real, decode = quantized(rng, N, K, bs, nested)
    x16 = to16(rng.standard_normal((M, K)) * np.where(np.arange(K) % 50 == 0, 20, 1), dt)
    bias16 = to16(rng.standard_normal(N), dt)
    a = {"M": M, "N": N, "K": K, "dt": dt, "shift": bs.bit_length() - 1, "decode": decode,
         "packed": ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8), "xbytes": x16.reshape(-1).view(np.uint8)}
    out, written = np.full((M, N), np.nan), np.zeros((M, N), int)
    bm = 16 * mt
    mtiles, ntiles = -(-M // bm), -(-N // BN)
    for l in range(mtiles * ntiles):
        cta = Cta(a, *tile_of(l, mtiles, ntiles, bm), mt, stages)
        cta.run()
        cta.store(out, written, from16(bias16, dt))
    assert (written == 1).all(), "every output element is written exactly once"
    wdq = (NF4[codes].reshape(-1, bs) * real[:, None]).reshape(N, K)
    ref = from16(x16, dt) @ wdq.T.astype(np.float64) + from16(bias16, dt)
    same = from16(x16, dt) @ from16(to16(wdq, dt), dt).T + from16(bias16, dt)
    tol = 4 * np.linalg.norm(same - ref) / np.linalg.norm(ref) + 1e-5
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err <= tol, f"rel err {err:.3e} > {tol:.3e}"
