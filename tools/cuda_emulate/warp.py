"""A numpy model of the pieces of a CUDA thread block the attention kernels use.

* mma_m16n8k16: the fragment layouts of PTX ISA 9.7.14.5.8 ("Matrix Fragments for mma.m16n8k16 with
  floating point type"), with groupID g = lane >> 2 and threadID_in_group t = lane % 4:
    A (16 x 16): a_i, i = 0..7 (reg i // 2, low half first): row g for i in {0,1,4,5}, else g + 8;
                 col 2t + (i & 1), plus 8 for i >= 4
    B (16 x 8):  b_i, i = 0..3: row 2t + (i & 1), plus 8 for i >= 2; col g
    C (16 x 8):  c_i, i = 0..3: row g for i < 2, else g + 8; col 2t + (i & 1)
  The matrices are rebuilt from the 32 lanes' registers (every element must be supplied exactly
  once), multiplied in float64, and scattered back.
* ldmatrix.m8n8.x4[.trans].b16 (PTX ISA 9.7.14.5.15): lanes 8m .. 8m+7 give the addresses of rows
  0..7 of matrix m (16 bytes each, 16-byte aligned); register m of lane l gets, from matrix m,
  elements [l/4][2(l%4)], [l/4][2(l%4)+1] (no .trans) or [2(l%4)][l/4], [2(l%4)+1][l/4] (.trans).
* A 16-bit register is a pair (low, high) of values; ld32(p) of 16-bit shared memory at element p
  gives (smem[p], smem[p+1]) (little endian) and needs p even (4-byte alignment).
* Shared memory: per 16-bit slot a value, an "initialised" flag and hazard bookkeeping. Epochs are
  counted by __syncthreads(); a slot written by thread W in epochs [lo, hi] (cp.async: issue ..
  wait_group) and read by another thread in one of those epochs is a race; a write issued in an
  epoch where another thread read the slot is a write-after-read race. Reads of slots never written
  (padding, stale) are errors.
* Global memory: flat arrays with bounds-checked reads; outputs count their writes (each element
  must be written exactly once).

Values are kept in float64 (no fp16 rounding) so index mistakes show up as O(1) errors against a
float64 reference while correct code agrees to ~1e-12.
"""
import numpy as np

LANES = np.arange(32)
G = LANES >> 2
T = LANES & 3


class EmulationError(AssertionError):
    pass


def check(cond, msg):
    if not np.all(cond):
        raise EmulationError(msg)


# ------------------------------------------------------------------------------------------------
# mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
# ------------------------------------------------------------------------------------------------
def _a_coords():
    """(lane, element i) -> (row, col) of A, straight from the PTX ISA formulas."""
    rows = np.zeros((32, 8), int)
    cols = np.zeros((32, 8), int)
    for i in range(8):
        rows[:, i] = G if (i < 2 or 4 <= i < 6) else G + 8
        cols[:, i] = 2 * T + (i & 1) + (8 if i >= 4 else 0)
    return rows, cols


def _b_coords():
    rows = np.zeros((32, 4), int)
    cols = np.zeros((32, 4), int)
    for i in range(4):
        rows[:, i] = 2 * T + (i & 1) + (8 if i >= 2 else 0)
        cols[:, i] = G
    return rows, cols


def _c_coords():
    rows = np.zeros((32, 4), int)
    cols = np.zeros((32, 4), int)
    for i in range(4):
        rows[:, i] = G if i < 2 else G + 8
        cols[:, i] = 2 * T + (i & 1)
    return rows, cols


A_RC, B_RC, C_RC = _a_coords(), _b_coords(), _c_coords()


def _gather(vals, rc, shape):
    m = np.full(shape, np.nan)
    cnt = np.zeros(shape, int)
    np.add.at(cnt, rc, 1)
    check(cnt == 1, "mma fragment layout: some element supplied %s times" % np.unique(cnt))
    m[rc] = vals
    return m


MMA_COUNT = [0]


def mma16816(c, a, b0, b1):
    """c: (32, 4) floats, a: (32, 4, 2) (4 regs of (lo, hi)), b0, b1: (32, 2). Returns the new c."""
    MMA_COUNT[0] += 1
    A = _gather(a.reshape(32, 8), A_RC, (16, 16))
    B = _gather(np.concatenate([b0, b1], axis=1), B_RC, (16, 8))
    C = _gather(c, C_RC, (16, 8))
    check(np.isfinite(A).all() and np.isfinite(B).all(), "mma operand not finite (uninitialised?)")
    D = A @ B + C
    return D[C_RC]


# ------------------------------------------------------------------------------------------------
# Shared memory with hazard tracking
# ------------------------------------------------------------------------------------------------
class Smem:
    def __init__(self, nbytes, name="smem"):
        check(nbytes % 2 == 0, "odd smem size")
        n = nbytes // 2
        self.n = n
        self.nbytes = nbytes
        self.val = np.full(n, np.nan)
        self.init = np.zeros(n, bool)
        self.w_lo = np.full(n, -1)
        self.w_hi = np.full(n, -1)
        self.w_thr = np.full(n, -1)
        self.r_ep = np.full(n, -1)
        self.r_thr = np.full(n, -1)  # -2: several readers
        self.epoch = 0
        self.pending = []  # cp.async: (slots, values, threads, issue epoch)
        self.name = name
        self.max_slot = -1

    def syncthreads(self):
        self.epoch += 1

    def _bounds(self, idx):
        check((idx >= 0) & (idx < self.n), "%s: slot out of range (max %d, size %d)" % (self.name, idx.max(), self.n))
        self.max_slot = max(self.max_slot, int(idx.max()))

    def _war(self, idx, thr):
        bad = (self.r_ep[idx] == self.epoch) & (self.r_thr[idx] != thr)
        check(~bad, "%s: write-after-read race in epoch %d (slot %s)" % (self.name, self.epoch, idx[bad][:4]))

    def write(self, idx, vals, thr):
        idx = np.asarray(idx).ravel()
        vals = np.broadcast_to(np.asarray(vals, float), idx.shape) if np.ndim(vals) == 0 else np.asarray(vals).ravel()
        thr = np.broadcast_to(np.asarray(thr), idx.shape).ravel()
        self._bounds(idx)
        self._war(idx, thr)
        self.val[idx] = vals
        self.init[idx] = True
        self.w_lo[idx] = self.w_hi[idx] = self.epoch
        self.w_thr[idx] = thr

    def cp_async(self, idx, vals, thr):
        idx = np.asarray(idx).ravel()
        thr = np.broadcast_to(np.asarray(thr), idx.shape).ravel()
        self._bounds(idx)
        self._war(idx, thr)
        self.pending.append((idx, np.asarray(vals, float).ravel(), thr, self.epoch))
        # until it lands the slot holds garbage
        self.init[idx] = False

    def wait_all(self):
        for idx, vals, thr, ep in self.pending:
            self.val[idx] = vals
            self.init[idx] = True
            self.w_lo[idx] = ep
            self.w_hi[idx] = self.epoch
            self.w_thr[idx] = thr
        self.pending = []

    def read(self, idx, thr):
        idx = np.asarray(idx)
        thr = np.broadcast_to(np.asarray(thr), idx.shape)
        fi, ft = idx.ravel(), thr.ravel()
        self._bounds(fi)
        check(self.init[fi], "%s: read of a slot never written / not landed (slots %s)" % (self.name, fi[~self.init[fi]][:4]))
        race = (self.w_hi[fi] >= self.epoch) & (self.w_thr[fi] != ft)
        check(~race, "%s: read-after-write race in epoch %d (slots %s)" % (self.name, self.epoch, fi[race][:4]))
        # reader bookkeeping
        same = self.r_ep[fi] == self.epoch
        new_thr = np.where(same & (self.r_thr[fi] != ft), -2, ft)
        self.r_thr[fi] = new_thr
        self.r_ep[fi] = self.epoch
        return self.val[idx]


BANK_WAYS = {}  # access kind -> worst n-way shared-memory bank conflict seen


def _bank_ways(word_addr):
    """n-way conflict of one warp-wide access: most distinct 4-byte words falling in one bank."""
    words = np.unique(np.asarray(word_addr).ravel())
    return int(np.bincount(words % 32, minlength=32).max())


def note_banks(kind, word_addr):
    BANK_WAYS[kind] = max(BANK_WAYS.get(kind, 0), _bank_ways(word_addr))


def ld32(sm, p, thr):
    """32-bit load of two 16-bit elements at element index p (per lane)."""
    p = np.asarray(p)
    check(p % 2 == 0, "ld32: address not 4-byte aligned")
    if p.shape == (32,):
        note_banks("ld32 (fragment loads)", p // 2)
    return np.stack([sm.read(p, thr), sm.read(p + 1, thr)], axis=-1)


def st32(sm, p, pair, thr):
    p = np.asarray(p)
    check(p % 2 == 0, "st32: address not 4-byte aligned")
    if p.shape == (32,):
        note_banks("st32 (P / dS stores)", p // 2)
    sm.write(p, pair[..., 0], thr)
    sm.write(p + 1, pair[..., 1], thr)


def ldmatrix_x4(sm, row_addr, thr, trans):
    """row_addr: (32,) element index of the row each lane supplies. Returns (32, 4, 2)."""
    row_addr = np.asarray(row_addr)
    check(row_addr % 8 == 0, "ldmatrix: row address not 16-byte aligned")
    out = np.zeros((32, 4, 2))
    for m in range(4):  # one 8x8 matrix (8 rows of 16 bytes) per phase
        note_banks("ldmatrix (per 8-row phase)", (row_addr[8 * m: 8 * m + 8, None] // 2 + np.arange(4)[None, :]))
        rows = row_addr[8 * m: 8 * m + 8]  # row r of matrix m from lane 8m + r
        mat = sm.read(rows[:, None] + np.arange(8)[None, :], thr[8 * m: 8 * m + 8, None])  # [r][c]
        if trans:
            out[:, m, 0], out[:, m, 1] = mat[2 * T, G], mat[2 * T + 1, G]
        else:
            out[:, m, 0], out[:, m, 1] = mat[G, 2 * T], mat[G, 2 * T + 1]
    return out


def shfl_xor(x, mask):
    """x: (32, ...) one value per lane."""
    return x[LANES ^ mask]


# ------------------------------------------------------------------------------------------------
# Global memory
# ------------------------------------------------------------------------------------------------
class GMem:
    """A flat buffer. Reads are bounds checked; `out=True` buffers count writes per element."""

    def __init__(self, data, name, out=False):
        self.a = np.asarray(data, float).ravel().copy()
        self.name = name
        self.writes = np.zeros(self.a.size, int) if out else None

    def read(self, idx):
        idx = np.asarray(idx)
        check((idx >= 0) & (idx < self.a.size), "%s: global read out of bounds (%s of %d)" % (
            self.name, idx[(idx < 0) | (idx >= self.a.size)][:4], self.a.size))
        return self.a[idx]

    def write(self, idx, vals):
        idx = np.asarray(idx).ravel()
        vals = np.broadcast_to(np.asarray(vals, float), np.asarray(idx).shape).ravel() if np.ndim(vals) == 0 \
            else np.asarray(vals, float).ravel()
        check((idx >= 0) & (idx < self.a.size), "%s: global write out of bounds (%s of %d)" % (
            self.name, idx[(idx < 0) | (idx >= self.a.size)][:4], self.a.size))
        self.a[idx] = vals
        if self.writes is not None:
            np.add.at(self.writes, idx, 1)


def self_test(seed=0):
    """mma + ldmatrix on random tiles against numpy products."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((16, 16))
    B = rng.standard_normal((16, 8))
    C = rng.standard_normal((16, 8))
    a = np.zeros((32, 4, 2))
    for lane in range(32):
        for i in range(8):
            a[lane, i // 2, i % 2] = A[A_RC[0][lane, i], A_RC[1][lane, i]]
    b = np.zeros((32, 4))
    for lane in range(32):
        for i in range(4):
            b[lane, i] = B[B_RC[0][lane, i], B_RC[1][lane, i]]
    c = C[C_RC]
    d = mma16816(c, a, b[:, 0:2], b[:, 2:4])
    D = np.zeros((16, 8))
    D[C_RC] = d
    check(np.abs(D - (A @ B + C)).max() < 1e-12, "mma self test")
    # ldmatrix.trans of a row-major [k][n] 16x16 tile gives the B fragments of two n-tiles
    sm = Smem(2 * 16 * 24)
    Bt = rng.standard_normal((16, 16))
    for r in range(16):
        sm.write(r * 24 + np.arange(16), Bt[r], 0)
    sm.syncthreads()
    addr = np.array([((l & 7) + ((l >> 3) & 1) * 8) * 24 + (l >> 4) * 8 for l in range(32)])
    regs = ldmatrix_x4(sm, addr, LANES, trans=True)
    for half in range(2):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            exp = [Bt[2 * t, 8 * half + g], Bt[2 * t + 1, 8 * half + g], Bt[2 * t + 8, 8 * half + g],
                   Bt[2 * t + 9, 8 * half + g]]
            got = list(regs[lane, 2 * half]) + list(regs[lane, 2 * half + 1])
            check(np.allclose(exp, got), "ldmatrix.trans self test")
    return True
