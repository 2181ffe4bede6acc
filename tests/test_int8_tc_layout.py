"""CPU model of the index math of csrc/int8_gemm_tc.cu, checked against q @ W.T.

The model replays the kernel's copies (swizzled 16-byte units, zero-filled q past K, nothing copied past M or N,
shared memory starting as garbage), its per-lane 128-bit fragment loads and its reduction, with the mma defined by
the PTX ISA's m16n8k32 .s8 fragment tables; it also checks that each 8-lane phase of every 128-bit shared load
touches 8 distinct 16-byte bank groups. Keep it in step with the kernel when its tiling changes (TcCfg, swz,
issue_chunk, compute_slice, reduce_store).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

STAGES = 4


def _frag_a(regs: list) -> np.ndarray:
    """A (16 x 32) from the lanes' 4 registers of 4 int8: row g for a0..a3 and a8..a11, else g + 8; column
    4t + (i & 3), plus 16 for i >= 8."""
    a = np.zeros((16, 32), dtype=np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(16):
            a[g if i < 4 or 8 <= i < 12 else g + 8, 4 * t + (i & 3) + (16 if i >= 8 else 0)] = regs[lane][i // 4][i % 4]
    return a


def _frag_b(regs: list) -> np.ndarray:
    """B (32 x 8) from the lanes' 2 registers: row 4t + (i & 3), plus 16 for i >= 4; column g."""
    b = np.zeros((32, 8), dtype=np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(8):
            b[4 * t + (i & 3) + (16 if i >= 4 else 0), g] = regs[lane][i // 4][i % 4]
    return b


def _mma(acc: list, a: list, b: list) -> None:
    """acc[lane] (c0..c3: rows g, g, g+8, g+8; columns 2t, 2t+1) += A @ B."""
    d = _frag_a(a) @ _frag_b(b)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(4):
            acc[lane][i] += d[g + 8 * (i >> 1), 2 * t + (i & 1)]


def _swz(r: int, u: int) -> int:
    return u ^ ((r & 1) << 2)


class _Cta:
    """One CTA of int8_gemm_tc<T, WR, WK, TM, MT> over q [M, K] and W [N, K]."""

    def __init__(self, wr: int, wk: int, tm: int, mt: int, q: np.ndarray, w: np.ndarray, block: int,
                 rng: np.random.Generator) -> None:
        self.WR, self.WK, self.TM, self.MT = wr, wk, tm, mt
        self.threads, self.R, self.MP, self.KC = 32 * wr * wk, 16 * tm * wr, 8 * mt, 64 * wk
        self.U, self.stage = self.KC // 16, (self.R + self.MP) * self.KC
        self.q, self.w, self.n0 = q, w, block * self.R
        self.smem = rng.integers(-128, 128, STAGES * self.stage).astype(np.int8)

    def issue(self, chunk: int, base: int) -> None:
        (m_, k_), n_ = self.q.shape, self.w.shape[0]
        k0 = chunk * self.KC
        for i in range(self.R * self.U):
            r, u = divmod(i, self.U)
            if self.n0 + r < n_ and k0 + u * 16 < k_:
                dst = base + (r * self.U + _swz(r, u)) * 16
                self.smem[dst:dst + 16] = self.w[self.n0 + r, k0 + u * 16:k0 + u * 16 + 16]
        for i in range(self.MP * self.U):
            m, u = divmod(i, self.U)
            if m < m_:
                dst = base + (self.R * self.U + m * self.U + _swz(m, u)) * 16
                k = k0 + u * 16
                self.smem[dst:dst + 16] = self.q[m, k:k + 16] if k < k_ else 0

    def load16(self, addr: int, phases: dict, key) -> list:
        assert addr % 16 == 0
        phases.setdefault(key, []).append(addr // 16 % 8)
        b = self.smem[addr:addr + 16]
        return [b[0:4], b[4:8], b[8:12], b[12:16]]

    def compute(self, base: int, wr: int, wk: int, acc: list) -> None:
        phases: dict = {}
        qs = base + self.R * self.KC
        xv = [[self.load16(qs + ((mt * 8 + (lane >> 2)) * self.U + _swz(lane >> 2, wk * 4 + (lane & 3))) * 16,
                           phases, ("q", mt)) for mt in range(self.MT)] for lane in range(32)]
        for i in range(self.TM):
            wv = []
            for lane in range(32):
                r0 = (wr * self.TM + i) * 16 + (lane >> 2)
                u = wk * 4 + (lane & 3)
                wv.append([self.load16(base + (r * self.U + _swz(r, u)) * 16, phases, ("w", i, r - r0))
                           for r in (r0, r0 + 8)])
            for mt, h in itertools.product(range(self.MT), range(2)):
                a = [[wv[ln][0][2 * h], wv[ln][1][2 * h], wv[ln][0][2 * h + 1], wv[ln][1][2 * h + 1]]
                     for ln in range(32)]
                b = [[xv[ln][mt][2 * h], xv[ln][mt][2 * h + 1]] for ln in range(32)]
                _mma([acc[ln][i][mt] for ln in range(32)], a, b)
        for key, groups in phases.items():
            for p in range(4):
                assert len(set(groups[8 * p:8 * p + 8])) == 8, f"bank conflict in {key}, phase {p}"

    def run(self) -> dict:
        k_ = self.q.shape[1]
        nchunks = -(-k_ // self.KC)
        warps = self.WR * self.WK
        acc = [[[[[0] * 4 for _ in range(self.MT)] for _ in range(self.TM)] for _ in range(32)] for _ in range(warps)]
        for c in range(min(STAGES - 1, nchunks)):
            self.issue(c, c * self.stage)
        for c in range(nchunks):
            if c + STAGES - 1 < nchunks:
                self.issue(c + STAGES - 1, (c + STAGES - 1) % STAGES * self.stage)
            for warp in range(warps):
                wr, wk = divmod(warp, self.WK)
                if c * self.KC + wk * 64 < k_:
                    self.compute(c % STAGES * self.stage, wr, wk, acc[warp])
        return self.reduce(acc)

    def reduce(self, acc: list) -> dict:
        stride = self.MP + 1
        assert self.WK * self.R * stride * 4 <= STAGES * self.stage
        red = np.zeros(self.WK * self.R * stride, dtype=np.int64)
        for warp, lane in itertools.product(range(self.WR * self.WK), range(32)):
            wr, wk = divmod(warp, self.WK)
            g, t = lane >> 2, lane & 3
            for i, mt, c in itertools.product(range(self.TM), range(self.MT), range(4)):
                r, m = (wr * self.TM + i) * 16 + g + 8 * (c >> 1), mt * 8 + 2 * t + (c & 1)
                red[(wk * self.R + r) * stride + m] = acc[warp][lane][i][mt][c]
        out = {}
        for j in range(self.R * self.q.shape[0]):
            m, r = divmod(j, self.R)
            if self.n0 + r < self.w.shape[0]:
                out[m, self.n0 + r] = sum(red[(k * self.R + r) * stride + m] for k in range(self.WK))
        return out


@pytest.mark.parametrize("cfg,m,n,k", [
    ((1, 4, 1), 8, 40, 160), ((1, 4, 1), 5, 20, 96), ((1, 4, 1), 64, 16, 288),  # 16-row tiles
    ((2, 4, 1), 16, 70, 352), ((2, 4, 1), 17, 40, 256),  # 32-row tiles
    ((4, 2, 1), 33, 130, 224), ((4, 2, 1), 64, 64, 96),  # 64-row tiles
])
def test_tc_index_math(cfg, m, n, k):
    """Every output of every CTA equals q @ W.T; K tails of 32 and 64 + 32, N tails, M not a multiple of 8."""
    rng = np.random.default_rng(m * 1000 + n + k)
    q = rng.integers(-127, 128, (m, k)).astype(np.int8)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    mt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8  # by_tokens
    rows = 16 * cfg[2] * cfg[0]
    got = {}
    for block in range(-(-n // rows)):
        got.update(_Cta(*cfg, mt, q, w, block, rng).run())
    ref = q.astype(np.int64) @ w.astype(np.int64).T
    assert len(got) == m * n
    assert all(v == ref[key] for key, v in got.items())
