"""Compiled CPU loops for stage 2: RandAugment's pixel work and normalize on a uint8 NHWC batch.

Why these exist: on a CPU, eager torch runs each op as several passes over float32 or int32
copies of the selected images (4 bytes per value, plus a gather before and a scatter after),
while PIL runs one uint8 loop per op. These numba loops are that single uint8 pass, in place,
on the channels_last memory stage 1 delivers (no NCHW transposition, no gather/scatter), with
the images of a call split over ``torch.get_num_threads()`` of numba's threads.

The op semantics stay in ``ops.py``, which the torch backend (CUDA) runs: the 256-entry tables
of the value ops, Contrast, Equalize and AutoContrast are built there and only looked up here;
Rotate's matrix and every op argument come from there. What is left here is arithmetic that
mirrors the torch code op for op in float32 (``_blend``'s truncating blend, PIL's grey weights,
the SMOOTH filter, ``ops.shift_taps``'s per-line taps and weights, recomputed per line so that no
[k, H] tables are built in Python, and ``grid_sample``'s bilinear and a = -0.75 bicubic with
border clamping), so the two backends agree to float rounding; tests/test_randaugment.py checks
both against timm and tests/test_cpu_kernels.py checks them against each other.

Compiled on first use (about 10 s for all) and cached on disk by numba.
"""
from __future__ import annotations

import math

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:  # the torch backend runs everywhere; these loops are an optional CPU speed-up
    numba = None

AVAILABLE = numba is not None
_f32 = np.float32

if AVAILABLE:
    _jit = njit(nogil=True, cache=True, fastmath=False, error_model="numpy")
    # Kernels over a set of images: one image per parallel iteration. numba's own thread pool
    # (TBB or OpenMP: both are safe next to FFCV's numba threads) hands work over far faster than
    # a Python thread pool: on the 2-core machine a ThreadPoolExecutor split gained nothing,
    # prange 1.45x on normalize (measured).
    _pjit = njit(nogil=True, cache=True, fastmath=False, error_model="numpy", parallel=True)

    # Each op is a function of one image [H, W, 3] (a view into the batch, changed in place);
    # ``_layer`` runs a whole RandAugment layer's images, whatever their ops, in one parallel loop.
    @_jit
    def _lut1(im, lut):
        flat = im.reshape(im.shape[0] * im.shape[1] * 3)  # a view: pixels are (R, G, B) triples
        lut_r, lut_g, lut_b = lut[0], lut[1], lut[2]
        for m in range(0, flat.shape[0], 3):  # uint8 values index the tables: no sign checks
            flat[m] = lut_r[flat[m]]
            flat[m + 1] = lut_g[flat[m + 1]]
            flat[m + 2] = lut_b[flat[m + 2]]

    @_pjit
    def _histogram(img, sel, out):
        n = img.shape[1] * img.shape[2] * 3
        for i in prange(sel.shape[0]):
            flat = img[sel[i]].reshape(n)
            h_r, h_g, h_b = out[i, 0], out[i, 1], out[i, 2]
            for m in range(0, n, 3):
                h_r[flat[m]] += 1
                h_g[flat[m + 1]] += 1
                h_b[flat[m + 2]] += 1

    @_jit
    def _grey(r, g, b):
        return (np.int32(r) * 19595 + np.int32(g) * 38470 + np.int32(b) * 7471 + 0x8000) >> 16

    @_pjit
    def _grey_sum(img, sel, out):
        for i in prange(sel.shape[0]):
            flat = img[sel[i]].reshape(img.shape[1] * img.shape[2] * 3)
            s = 0
            for m in range(0, flat.shape[0], 3):
                s += _grey(flat[m], flat[m + 1], flat[m + 2])
            out[i] = s

    @_jit
    def _blend1(d, v, f):
        """``ops._blend`` for one value: float32 d + f * (v - d), clipped, truncated."""
        d = _f32(d)  # float32 throughout, as torch does it: a float64 step changes truncations
        r = d + f * (_f32(v) - d)
        return np.uint8(min(max(r, _f32(0.0)), _f32(255.0)))  # branch-free: compiles to min/max

    @_jit
    def _color1(im, f):
        flat = im.reshape(im.shape[0] * im.shape[1] * 3)
        for m in range(0, flat.shape[0], 3):
            d = _f32(_grey(flat[m], flat[m + 1], flat[m + 2]))
            flat[m] = _blend1(d, flat[m], f)
            flat[m + 1] = _blend1(d, flat[m + 1], f)
            flat[m + 2] = _blend1(d, flat[m + 2], f)

    @_jit
    def _sharpness1(img3, f):
        h, row = img3.shape[0], img3.shape[1] * 3
        im = img3.reshape(h, row)
        src = im.copy()
        for y in range(1, h - 1):  # PIL leaves the border unfiltered
            # Rows as flat slices starting one pixel left of the output, so every index below
            # is a plain counter plus a constant (vectorisable, no sign checks).
            up, mid, dn = src[y - 1], src[y], src[y + 1]
            out = im[y, 3:row - 3]
            for m in range(row - 6):
                s = (np.int32(up[m]) + np.int32(up[m + 3]) + np.int32(up[m + 6])
                     + np.int32(mid[m]) + np.int32(mid[m + 3]) * 5 + np.int32(mid[m + 6])
                     + np.int32(dn[m]) + np.int32(dn[m + 3]) + np.int32(dn[m + 6]))
                d = _f32(np.round(_f32(s) / _f32(13.0)))  # never half-way: 13 is odd
                out[m] = _blend1(d, mid[m + 3], f)

    @_jit
    def _to_u8(acc):
        acc += _f32(0.005)  # the torch code's bias before truncating (see ops.shift_resample)
        return np.uint8(min(max(acc, _f32(0.0)), _f32(255.0)))

    @_jit
    def _resample_line(line, out, length, base, w, first, stop, fill):
        """One row of ``ops.shift_resample``: out[j] = sum_t line[clamp(base + j + t)] * w[t]
        for j in [first, stop), fill elsewhere. ``line``/``out`` are flat (length * 3) uint8."""
        n_taps = w.shape[0]
        a, b = max(0, first), min(length, stop)
        for j in range(0, a):
            for c in range(3):
                out[j * 3 + c] = fill[c]
        for j in range(max(b, 0), length):
            for c in range(3):
                out[j * 3 + c] = fill[c]
        # Where no tap needs clamping, a flat loop over (pixel, channel) that LLVM vectorises.
        # Slices, so that the loop indices are plain counters: a computed (possibly negative)
        # index costs numba a wrap-around check per access and 10x in speed (measured).
        lo, hi = max(a, -base), min(b, length - n_taps + 1 - base)
        if hi > lo:
            src = line[(lo + base) * 3:]
            dst = out[lo * 3:hi * 3]
            if n_taps == 2:
                w0, w1 = w[0], w[1]
                for m in range(dst.shape[0]):
                    acc = _f32(src[m]) * w0
                    acc += _f32(src[m + 3]) * w1
                    dst[m] = _to_u8(acc)
            else:
                w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
                for m in range(dst.shape[0]):
                    acc = _f32(src[m]) * w0
                    acc += _f32(src[m + 3]) * w1
                    acc += _f32(src[m + 6]) * w2
                    acc += _f32(src[m + 9]) * w3
                    dst[m] = _to_u8(acc)
        else:
            lo = hi = a
        for j in list(range(a, lo)) + list(range(hi, b)):  # border pixels: taps clamped to the line
            for c in range(3):
                acc = _f32(line[min(max(base + j, 0), length - 1) * 3 + c]) * w[0]
                for t in range(1, n_taps):
                    acc += _f32(line[min(max(base + j + t, 0), length - 1) * 3 + c]) * w[t]
                out[j * 3 + c] = _to_u8(acc)

    @_jit
    def _line_taps(shift, bicubic, length, wts):
        """``ops.shift_taps`` for one line, op for op (float64 shift, float32 weights): fills
        ``wts`` and returns (integer shift + first tap offset, first, stop)."""
        whole = math.floor(shift)
        t = _f32(shift - whole)
        if bicubic:
            t2 = t * t
            t3 = t2 * t
            wts[0] = -t + _f32(2.0) * t2 - t3
            wts[1] = _f32(1.0) - _f32(2.0) * t2 + t3
            wts[2] = t + t2 - t3
            wts[3] = -t2 + t3
            lo = -1
        else:
            wts[0] = _f32(1.0) - t
            wts[1] = t
            lo = 0
        first = int(math.ceil(-0.5 - shift))
        stop = int(math.ceil(length - 0.5 - shift))
        return int(whole) + lo, first, stop

    @_jit
    def _shift1(im, slope, offset, bicubic, axis, fill):
        """``ops.shift_along``: line r (a row for axis 0, a column for axis 1) is resampled at
        shift slope * (r + 0.5) + offset, which is what ``ops.row_shifts`` gives for translate
        (slope 0) and shear; a column is copied out and back as a line."""
        h, w = im.shape[0], im.shape[1]
        length = w if axis == 0 else h
        line = np.empty(length * 3, np.uint8)
        out = np.empty(length * 3, np.uint8)
        wts = np.empty(4 if bicubic else 2, np.float32)
        for r in range(h if axis == 0 else w):
            base, first, stop = _line_taps(slope * (r + 0.5) + offset, bicubic, length, wts)
            if axis == 0:
                src = im[r].reshape(length * 3)
                line[:] = src
                _resample_line(line, src, length, base, wts, first, stop, fill)
            else:
                for j in range(length):
                    for c in range(3):
                        line[j * 3 + c] = im[j, r, c]
                _resample_line(line, out, length, base, wts, first, stop, fill)
                for j in range(length):
                    for c in range(3):
                        im[j, r, c] = out[j * 3 + c]

    @_jit
    def _cc1(t, a):
        return ((a + _f32(2.0)) * t - (a + _f32(3.0))) * t * t + _f32(1.0)

    @_jit
    def _cc2(t, a):
        return ((a * t - _f32(5.0) * a) * t + _f32(8.0) * a) * t - _f32(4.0) * a

    @_jit
    def _bicubic_at(src, x0, y0, c, w, h, wx0, wx1, wx2, wx3, wy0, wy1, wy2, wy3):
        """grid_sample's bicubic sum over the 4x4 taps around (x0, y0), rows first."""
        acc = _f32(0.0)
        for r in range(4):
            yy = np.uintp(min(max(y0 - 1 + r, 0), h - 1))
            if x0 >= 1 and x0 + 2 < w:
                q = np.uintp(x0 - 1)
                row = (_f32(src[yy, q, c]) * wx0 + _f32(src[yy, q + 1, c]) * wx1
                       + _f32(src[yy, q + 2, c]) * wx2 + _f32(src[yy, q + 3, c]) * wx3)
            else:
                row = (_f32(src[yy, np.uintp(min(max(x0 - 1, 0), w - 1)), c]) * wx0
                       + _f32(src[yy, np.uintp(min(max(x0, 0), w - 1)), c]) * wx1
                       + _f32(src[yy, np.uintp(min(max(x0 + 1, 0), w - 1)), c]) * wx2
                       + _f32(src[yy, np.uintp(min(max(x0 + 2, 0), w - 1)), c]) * wx3)
            acc += row * (wy0 if r == 0 else (wy1 if r == 1 else (wy2 if r == 2 else wy3)))
        return acc

    @_jit
    def _affine1(im, m, bic, fill):
        """``ops.affine``: ``grid_sample`` (align_corners=False, border) at the source point of
        each output pixel centre; PIL's fill where that point is outside the image."""
        h, w = im.shape[0], im.shape[1]
        a = _f32(-0.75)
        one = _f32(1.0)
        src = im.copy()
        # The taps read float32 rows: converting each tap of a pixel (12 bilinear, 48 bicubic)
        # from uint8 costs more than converting the image once (bicubic 1.96 -> 1.24 ms, measured).
        flat = src.reshape(h, w * 3).astype(np.float32)
        for y in range(h):
            fy = _f32(y) + _f32(0.5)
            out = im[y]
            for x in range(w):
                fx = _f32(x) + _f32(0.5)
                sx = m[0, 0] * fx + m[0, 1] * fy + m[0, 2]
                sy = m[1, 0] * fx + m[1, 1] * fy + m[1, 2]
                if not (sx >= 0 and sx < w and sy >= 0 and sy < h):
                    for c in range(3):
                        out[x, c] = fill[c]
                    continue
                ix = sx - _f32(0.5)  # grid_sample's unnormalized source index
                iy = sy - _f32(0.5)
                if not bic:
                    ix = min(max(ix, _f32(0.0)), _f32(w - 1))
                    iy = min(max(iy, _f32(0.0)), _f32(h - 1))
                x0 = int(ix + _f32(2.0)) - 2  # floor: ix >= -0.5 here, and int() truncates
                y0 = int(iy + _f32(2.0)) - 2
                tx = ix - _f32(x0)
                ty = iy - _f32(y0)
                if bic:
                    wx0, wx1, wx2, wx3 = _cc2(tx + one, a), _cc1(tx, a), _cc1(one - tx, a), _cc2(_f32(2.0) - tx, a)
                    wy0, wy1, wy2, wy3 = _cc2(ty + one, a), _cc1(ty, a), _cc1(one - ty, a), _cc2(_f32(2.0) - ty, a)
                    if x0 >= 1 and x0 + 2 < w and y0 >= 1 and y0 + 2 < h:  # no clamping: flat rows
                        q = np.uintp((x0 - 1) * 3)
                        r0 = np.uintp(y0 - 1)
                        r1, r2, r3 = r0 + np.uintp(1), r0 + np.uintp(2), r0 + np.uintp(3)
                        for c in range(3):
                            qc = q + np.uintp(c)
                            q1, q2, q3 = qc + np.uintp(3), qc + np.uintp(6), qc + np.uintp(9)
                            v0 = ((flat[r0, qc]) * wx0 + (flat[r0, q1]) * wx1
                                  + (flat[r0, q2]) * wx2 + (flat[r0, q3]) * wx3)
                            v1 = ((flat[r1, qc]) * wx0 + (flat[r1, q1]) * wx1
                                  + (flat[r1, q2]) * wx2 + (flat[r1, q3]) * wx3)
                            v2 = ((flat[r2, qc]) * wx0 + (flat[r2, q1]) * wx1
                                  + (flat[r2, q2]) * wx2 + (flat[r2, q3]) * wx3)
                            v3 = ((flat[r3, qc]) * wx0 + (flat[r3, q1]) * wx1
                                  + (flat[r3, q2]) * wx2 + (flat[r3, q3]) * wx3)
                            acc = _f32(0.0)
                            acc += v0 * wy0
                            acc += v1 * wy1
                            acc += v2 * wy2
                            acc += v3 * wy3
                            out[x, c] = _to_u8(acc)
                        continue
                    for c in range(3):
                        out[x, c] = _to_u8(_bicubic_at(src, x0, y0, c, w, h, wx0, wx1, wx2, wx3,
                                                       wy0, wy1, wy2, wy3))
                else:
                    xa, ya = np.uintp(x0 * 3), np.uintp(y0)
                    xb, yb = np.uintp(min(x0 + 1, w - 1) * 3), np.uintp(min(y0 + 1, h - 1))
                    for c in range(3):
                        cc = np.uintp(c)
                        top = flat[ya, xa + cc] * (one - tx) + flat[ya, xb + cc] * tx
                        bot = flat[yb, xa + cc] * (one - tx) + flat[yb, xb + cc] * tx
                        out[x, c] = _to_u8(top * (one - ty) + bot * ty)

    LUT, COLOR, SHARPNESS, SHIFT, AFFINE = 0, 1, 2, 3, 4

    @_pjit
    def _layer(img, order, code, luts, factor, slope, offset, bicubic, axis, mats, fill):
        """One RandAugment layer: image i = order[j] gets op code[i] with its own arguments (the
        per-image arrays are indexed by image). Within a layer every image has at most one op, so
        all run in one parallel loop (per op, a layer has only ~4 of 64 images: too few to spread
        over threads, measured)."""
        for j in prange(order.shape[0]):
            i = order[j]
            im = img[i]
            c = code[i]
            if c == LUT:
                _lut1(im, luts[i])
            elif c == COLOR:
                _color1(im, factor[i])
            elif c == SHARPNESS:
                _sharpness1(im, factor[i])
            elif c == SHIFT:
                _shift1(im, slope[i], offset[i], bicubic[i], axis[i], fill)
            else:
                _affine1(im, mats[i], bicubic[i], fill)

    @_pjit
    def _copy(src, dst):
        n = src.shape[0]
        s2, d2 = src.reshape(n, src.size // n), dst.reshape(n, src.size // n)
        for i in prange(n):
            d2[i, :] = s2[i, :]

    @_jit
    def _norm_span(src, dst, scale, shift, a, b):
        for m in range(a, b):
            dst[m] = _f32(src[m]) * scale[m] + shift[m]

    @_jit
    def _norm_mix_span(src, partner, dst, scale, shift, wt, a, b):
        """``mixup._mix_pairs_`` on normalized values: own + wt * (partner - own)."""
        for m in range(a, b):
            own = _f32(src[m]) * scale[m] + shift[m]
            other = _f32(partner[m]) * scale[m] + shift[m]
            dst[m] = own + wt * (other - own)

    @_pjit
    def _normalize_mix(src, dst, scale, shift, wt, cut, boxes):
        """Rows of W * 3 values: dst = src * scale + shift (the per-channel constants repeated
        along a row), then mixed with sample N-1-n: CutMix takes the partner's pixels inside
        the box, mixup blends with weight ``wt`` = 1 - lambda; 0 leaves a sample unmixed."""
        n_img, h, row = src.shape[0], src.shape[1], src.shape[2] * 3
        s2 = src.reshape(n_img, h, row)
        d2 = dst.reshape(n_img, h, row)
        for n in prange(n_img):
            p = n_img - 1 - n
            for y in range(h):
                s_row, p_row, d_row = s2[n, y], s2[p, y], d2[n, y]
                if cut[n]:
                    _norm_span(s_row, d_row, scale, shift, 0, row)
                    if boxes[n, 0] <= y < boxes[n, 1] and boxes[n, 3] > boxes[n, 2]:
                        _norm_span(p_row, d_row, scale, shift, boxes[n, 2] * 3, boxes[n, 3] * 3)
                elif wt[n] != 0:
                    _norm_mix_span(s_row, p_row, d_row, scale, shift, wt[n], 0, row)
                else:
                    _norm_span(s_row, d_row, scale, shift, 0, row)



# Cost per image of each op code (LUT, COLOR, SHARPNESS, SHIFT, AFFINE bilinear; a bicubic rotation
# adds 0.7), ms at 224 px on one core of the 2-core machine: only used to order the work.
_COST = np.array([0.07, 0.27, 0.11, 0.12, 0.56])
_BICUBIC_AFFINE_EXTRA = 0.7


def _set_threads() -> None:
    """numba's thread count is per calling thread: follow torch's."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _dynamic(kernel, *args) -> None:
    """Run a parallel kernel with its images handed out one at a time. In a training loop the
    kernels share the cores with stage 1's decode threads; with numba's default equal static
    chunks a call waits for whichever thread got less CPU."""
    _set_threads()
    previous = numba.set_parallel_chunksize(1)
    try:
        kernel(*args)
    finally:
        numba.set_parallel_chunksize(previous)


def nhwc(x: torch.Tensor) -> np.ndarray:
    """The [N, H, W, 3] numpy view of a channels_last uint8 (or float) CPU batch."""
    v = x.permute(0, 2, 3, 1)
    assert v.is_contiguous(), "expected channels_last memory"
    return v.numpy()


class OpPlan:
    """Every (layer, sample)'s op and arguments as the arrays ``_layer`` reads, rows in
    layer-major order (row = layer * N + sample; code -1: no op). Filled op by op for all layers
    at once, so each op's arguments and tables are computed in one call rather than one per
    layer (Python's per-call overhead was ~1/4 of the CPU RandAugment time); only the tables
    that need the image as the previous layer left it (Contrast, Equalize, AutoContrast) are
    added per layer, just before ``run_layer``."""

    def __init__(self, img: np.ndarray, num_layers: int, fill=(0, 0, 0)):
        self.img, self.n = img, img.shape[0]
        k = num_layers * self.n
        self.fill = np.asarray(fill, np.uint8)
        self.code = np.full(k, -1, np.int64)
        self.luts = np.zeros((k, 3, 256), np.uint8)
        self.factor = np.zeros(k, np.float32)
        self.slope, self.offset = np.zeros(k, np.float64), np.zeros(k, np.float64)
        self.bicubic = np.zeros(k, np.bool_)
        self.axis = np.zeros(k, np.int64)
        self.mats = np.zeros((k, 2, 3), np.float32)

    def lut(self, rows: np.ndarray, luts: torch.Tensor) -> None:
        self.code[rows] = LUT
        self.luts[rows] = luts.to(torch.uint8).numpy()

    def color(self, rows: np.ndarray, factor: torch.Tensor) -> None:
        self.code[rows] = COLOR
        self.factor[rows] = factor.numpy()

    def sharpness(self, rows: np.ndarray, factor: torch.Tensor) -> None:
        self.code[rows] = SHARPNESS
        self.factor[rows] = factor.numpy()

    def shift(self, rows: np.ndarray, matrix: torch.Tensor, axis: str, bicubic: torch.Tensor) -> None:
        """``ops.shift_along`` for translate/shear matrices along ``axis`` ('x' or 'y')."""
        m = matrix.numpy()
        self.code[rows] = SHIFT
        self.slope[rows], self.offset[rows] = (m[:, 0, 1], m[:, 0, 2]) if axis == "x" else (m[:, 1, 0], m[:, 1, 2])
        self.axis[rows] = 0 if axis == "x" else 1
        self.bicubic[rows] = bicubic.numpy()

    def affine(self, rows: np.ndarray, matrix: torch.Tensor, bicubic: torch.Tensor) -> None:
        self.code[rows] = AFFINE
        self.mats[rows] = matrix.numpy()
        self.bicubic[rows] = bicubic.numpy()

    def histograms(self, images: np.ndarray) -> np.ndarray:
        """[k, 3, 256] per-channel histograms of ``images``, as they are now."""
        out = np.zeros((len(images), 3, 256), np.int64)
        _dynamic(_histogram, self.img, images, out)
        return out

    def grey_sums(self, images: np.ndarray) -> np.ndarray:
        """Sums of PIL's grey values of ``images``, as they are now."""
        out = np.zeros(len(images), np.int64)
        _dynamic(_grey_sum, self.img, images, out)
        return out

    def run_layer(self, layer: int) -> None:
        rows = slice(layer * self.n, (layer + 1) * self.n)
        code, bicubic = self.code[rows], self.bicubic[rows]
        images = np.flatnonzero(code >= 0)
        if not len(images):
            return
        # Costliest images first, handed out one at a time: the op costs differ by ~18x (a table
        # look-up 0.07 ms, a bicubic rotation 1.26 ms per image): equal static chunks would not balance.
        cost = _COST[code[images]] + _BICUBIC_AFFINE_EXTRA * (bicubic[images] & (code[images] == AFFINE))
        order = images[np.argsort(-cost, kind="stable")]
        _dynamic(_layer, self.img, order, code, self.luts[rows], self.factor[rows], self.slope[rows], self.offset[rows],
                 bicubic, self.axis[rows], self.mats[rows], self.fill)


def copy_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out.copy_(x)`` for channels_last uint8 CPU batches, on numba's threads rather than
    torch's: a parallel torch op leaves torch's OpenMP threads spinning for milliseconds after it,
    on the very cores the next numba kernel wants (measured: RandAugment's layer kernels 10-12 ms
    per batch right after a torch copy, 7 ms with torch's threads passive)."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return out.copy_(x)
    _dynamic(_copy, nhwc(x), nhwc(out))
    return out


def normalize_mix(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, lam=None, cutmix=None,
                  boxes=None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """A channels_last uint8 CPU batch -> a channels_last float32 batch ``x * scale + shift``
    (per channel), mixed with the flipped batch as ``mixup.apply_mix`` does when ``lam``/
    ``cutmix``/``boxes`` (a ``MixParams``'s arrays) are given: one pass writing the output once,
    into ``out`` when given (same shape, float32, channels_last)."""
    n, _, h, w = x.shape
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, memory_format=torch.channels_last)
    scale_row = scale.to(torch.float32).repeat(w).numpy()
    shift_row = shift.to(torch.float32).repeat(w).numpy()
    if lam is None:
        wt, cut, boxes = np.zeros(n, np.float32), np.zeros(n, np.bool_), np.zeros((n, 4), np.int64)
    else:
        wt = (1.0 - np.asarray(lam, np.float64)).astype(np.float32)
        cut, boxes = np.asarray(cutmix, np.bool_), np.ascontiguousarray(boxes, np.int64)
    src, dst = nhwc(x), nhwc(out)
    _dynamic(_normalize_mix, src, dst, scale_row, shift_row, wt, cut, boxes)
    return out
