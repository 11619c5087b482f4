"""Pillow's bilinear resize, compiled, for a batch of crops of different sizes (+ horizontal flip);
and Pillow's bicubic resize of a fractional box (``resample``), for FFCV's eval decoder.

Why: it is the resize torchvision's ``RandomResizedCrop`` runs on PIL images, i.e. what the
reference pipeline (and timm's loader) does to every train crop, and DALI's CPU ``fn.resize`` is
slow at it: on the project's 2-core machine the antialiased linear resize of a random-resized crop
to 224 took ~1.1 ms per image and ``fn.flip`` another ~0.2 ms, against ~0.55 ms for DALI's ROI
decode of the crop itself (benchmarks/results/pipelines_cpu.md). So DALI's CPU train graph stops
after the decode and this loop resizes and flips the crops straight into the output batch.

Algorithm (Pillow's separable resampling with its triangle filter): the filter's support grows
with the downscale factor (that is the antialiasing); per output pixel the taps' weights are
normalized to sum 1 and rounded to 22-bit fixed point; one pass along each axis, rounded to uint8
in between. Which pass goes first changes a few pixels by 1: Pillow up to 12 always ran the
horizontal one first, Pillow 13 runs the vertical one first when the height shrinks much more than
the width (python-pillow/Pillow#9549). Here the vertical pass goes first whenever it shrinks the
image, so the costlier horizontal pass sees fewer rows. The result is bit for bit PIL's own two
single-axis resizes in that order, and within 1 of a plain PIL ``resize`` (tests/test_pil_resize.py).
A flip mirrors the columns when the horizontal pass's result is transposed back (the vertical pass
treats columns independently, so this equals flipping the resized image, torchvision's order).
"""
from __future__ import annotations

import ctypes
import math

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is in install_requires; kept importable without it
    numba = None

AVAILABLE = numba is not None
_PRECISION = 22  # Pillow: 32 bits - 8 for the value - 2 of headroom for negative/overshooting filters
_HALF = 1 << (_PRECISION - 1)

if AVAILABLE:
    _jit = njit(nogil=True, cache=True, error_model="numpy")

    @_jit
    def vertical_first(in_height, out_height):
        """The pass order: vertical first exactly when it reduces the height."""
        return out_height < in_height

    @_jit
    def _filter(x, cubic):
        """Pillow's triangle (BILINEAR) or Keys cubic with a = -0.5 (BICUBIC) filter."""
        x = abs(x)
        if cubic:
            if x < 1.0:
                return (1.5 * x - 2.5) * x * x + 1.0
            if x < 2.0:
                return (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
            return 0.0
        return 1.0 - x if x < 1.0 else 0.0

    @_jit
    def _coefficients(in_size, out_size, in0=0.0, in1=-1.0, cubic=False):
        """Per output index: first input index, tap count, and the fixed-point weights, for the
        source span ``[in0, in1)`` (default: all of it) resized to ``out_size``. Taps may reach
        outside the span, up to the image's edges, as in Pillow's ``resize(box=...)``."""
        if in1 < 0.0:
            in1 = float(in_size)
        scale = (in1 - in0) / out_size
        filterscale = max(scale, 1.0)
        support = filterscale * (2.0 if cubic else 1.0)  # the filter's support, stretched when downscaling
        ksize = int(math.ceil(support)) * 2 + 1
        first = np.empty(out_size, np.int64)
        count = np.empty(out_size, np.int64)
        weights = np.zeros((out_size, ksize), np.int32)
        w = np.empty(ksize, np.float64)
        inv = 1.0 / filterscale
        for o in range(out_size):
            center = in0 + (o + 0.5) * scale
            lo = max(int(center - support + 0.5), 0)  # int(): truncation, as C's cast
            n = min(int(center + support + 0.5), in_size) - lo
            total = 0.0
            for t in range(n):
                w[t] = _filter((t + lo - center + 0.5) * inv, cubic)
                total += w[t]
            for t in range(n):
                k = w[t] / total if total != 0.0 else w[t]
                weights[o, t] = int(k * (1 << _PRECISION) - 0.5) if k < 0 else int(k * (1 << _PRECISION) + 0.5)
            first[o], count[o] = lo, n
        return first, count, weights

    @_jit
    def _clip8(acc):
        return np.uint8(min(max(acc >> _PRECISION, 0), 255))

    @_jit
    def _transpose_into(src, dst, flip):
        """dst[j, i] = src[i, j] for [a, b, 3] -> [b, a, 3] pixels; ``flip`` mirrors i."""
        a, b = src.shape[0], src.shape[1]
        for i in range(a):
            row = src[i]
            col = a - 1 - i if flip else i
            for j in range(b):
                d = dst[j, col]
                d[0], d[1], d[2] = row[j, 0], row[j, 1], row[j, 2]

    @_jit
    def _vertical(src, y0, first, count, weights, dst):
        """dst[o] = the vertical pass (rows of flat values; src row 0 is image row ``y0``)."""
        row = src.shape[1]
        acc = np.empty(row, np.int32)
        for o in range(dst.shape[0]):
            lo = first[o] - y0
            acc[:] = _HALF
            for t in range(count[o]):  # whole rows at a time: contiguous, vectorizes
                k = np.int32(weights[o, t])
                r = src[lo + t]
                for m in range(row):
                    acc[m] += np.int32(r[m]) * k
            out = dst[o]
            for m in range(row):
                out[m] = _clip8(acc[m])

    @_jit
    def _resample(src, x0, y0, x1, y1, out, flip, cubic):
        """The box ``[x0, x1) x [y0, y1)`` of ``src`` [h, w, 3] uint8 (float pixel edges) ->
        ``out`` [H, W, 3] uint8 with Pillow's BILINEAR or BICUBIC filter, optionally mirrored.

        Both passes run as the vertical loop (whole rows, which vectorizes); the horizontal one on
        the transposed image: 2.5-3x faster than a loop over each output pixel's taps, and the same
        integer sums. BILINEAR: the vertical pass goes first when it shrinks the image (the
        horizontal pass then sees fewer rows), else second (see the module doc)."""
        h, w = src.shape[0], src.shape[1]
        oh, ow = out.shape[0], out.shape[1]
        xf, xn, xk = _coefficients(w, ow, x0, x1, cubic)
        yf, yn, yk = _coefficients(h, oh, y0, y1, cubic)
        # BICUBIC (eval): horizontal first, Pillow's order whenever both passes run (tests); with
        # its overshoot clipped to uint8 between the passes, the order matters more than for BILINEAR.
        shrink = not cubic and vertical_first(y1 - y0, oh)
        if shrink:
            rows, r0 = oh, 0
            tmp = np.empty((oh, w, 3), np.uint8)
            _vertical(src.reshape(h, w * 3), 0, yf, yn, yk, tmp.reshape(oh, w * 3))
        else:
            r0 = yf[0]
            rows = yf[oh - 1] + yn[oh - 1] - r0  # only the rows the vertical pass will read
            tmp = src[r0:r0 + rows]
        c0 = xf[0]  # only the columns the horizontal pass will read
        cols = xf[ow - 1] + xn[ow - 1] - c0
        t = np.empty((cols, rows, 3), np.uint8)
        _transpose_into(tmp[:, c0:c0 + cols], t, False)
        u = np.empty((ow, rows, 3), np.uint8)
        _vertical(t.reshape(cols, rows * 3), c0, xf, xn, xk, u.reshape(ow, rows * 3))  # the horizontal pass
        if shrink:
            _transpose_into(u, out, flip)
        else:
            back = np.empty((rows, ow, 3), np.uint8)
            _transpose_into(u, back, flip)
            _vertical(back.reshape(rows, ow * 3), r0, yf, yn, yk, out.reshape(oh, ow * 3))

    @_jit
    def _resize_whole(src, out, flip, cubic):
        """All of ``src`` resized into ``out`` with Pillow's BILINEAR or BICUBIC filter, optionally
        mirrored: torchvision's ``resized_crop`` of a crop already cut out (crop, then resize)."""
        _resample(src, 0.0, 0.0, float(src.shape[1]), float(src.shape[0]), out, flip, cubic)

    @_jit
    def _resize1(src, out, flip):
        """All of ``src`` resized into ``out`` with Pillow's BILINEAR filter, optionally mirrored."""
        _resize_whole(src, out, flip, False)

    @njit(nogil=True, cache=True, error_model="numpy", parallel=True)
    def _resize_batch(flat, offsets, heights, widths, flips, cubics, out):
        for i in prange(out.shape[0]):
            h, w = heights[i], widths[i]
            src = flat[offsets[i]:offsets[i] + h * w * 3].reshape((h, w, 3))
            _resize_whole(src, out[i], flips[i], cubics[i])


if AVAILABLE:
    resize_into = _resize_whole  # the compiled per-image loop, callable from other numba code (FFCV's decoder)
    resample_into = _resample  # any box, BILINEAR or BICUBIC: FFCV's eval decoder (timm's resize + centre crop)


def resample(src: np.ndarray, box: tuple[float, float, float, float], out: np.ndarray, cubic: bool = True,
             flip: bool = False) -> np.ndarray:
    """PIL's ``Image.resize(out size, BICUBIC or BILINEAR, box=box)`` of ``src`` [h, w, 3] uint8
    into ``out`` [H, W, 3] (PIL's two passes, see the module doc: within 1 of PIL)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    _resample(np.ascontiguousarray(src), x0, y0, x1, y1, out, bool(flip), bool(cubic))
    return out


def resize_one(src: np.ndarray, out: np.ndarray, flip: bool = False) -> np.ndarray:
    """``src`` [h, w, 3] uint8 resized into ``out`` [H, W, 3] with PIL's BILINEAR filter (PIL's
    own two passes, see the module doc: within 1 of ``Image.resize``), mirrored if ``flip``."""
    _resize1(np.ascontiguousarray(src), out, bool(flip))
    return out


def resize_batch(crops: list[np.ndarray], flips: np.ndarray, out: np.ndarray, threads: int = 0,
                 cubic: np.ndarray | None = None) -> np.ndarray:
    """Resize every HWC uint8 crop into ``out[i]`` ([N, H, W, 3] uint8, C-contiguous), mirrored
    where ``flips[i]``, with PIL's BICUBIC filter where ``cubic[i]`` (default: BILINEAR for all). The crops may lie anywhere; when they are back to back in one block (as
    DALI's CPU outputs are) that block is read in place, else they are gathered once."""
    n = len(crops)
    if out.dtype != np.uint8 or out.ndim != 4 or out.shape[0] != n or out.shape[3] != 3:
        raise ValueError(f"resize_batch: out must be uint8 [{n}, H, W, 3], got {out.dtype} {out.shape}")
    if any(c.dtype != np.uint8 or c.ndim != 3 or c.shape[2] != 3 for c in crops):
        raise ValueError("resize_batch: every crop must be a uint8 [h, w, 3] array")
    if n == 0:
        return out
    heights = np.array([c.shape[0] for c in crops], np.int64)
    widths = np.array([c.shape[1] for c in crops], np.int64)
    sizes = heights * widths * 3
    offsets = np.zeros(n, np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    base = crops[0].ctypes.data
    in_place = all(c.flags.c_contiguous and c.ctypes.data == base + off for c, off in zip(crops, offsets))
    if in_place:
        flat = np.ctypeslib.as_array((ctypes.c_uint8 * int(sizes.sum())).from_address(base))
    else:
        flat = np.concatenate([np.ascontiguousarray(c).reshape(-1) for c in crops])
    if threads:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    # Images handed out one at a time: the loop shares the cores with the decoder's threads, and
    # with equal static halves the batch waited for whichever thread got less CPU.
    previous = numba.set_parallel_chunksize(1)
    try:
        cubics = np.zeros(n, np.bool_) if cubic is None else np.asarray(cubic, np.bool_)
        _resize_batch(flat, offsets, heights, widths, np.asarray(flips, np.bool_), cubics, out)
    finally:
        numba.set_parallel_chunksize(previous)
    return out
