"""RandAugment's image ops, batched over a uint8 tensor ``[k, 3, H, W]`` with one argument per sample.

Each op reproduces the PIL function timm calls (``timm/data/auto_augment.py``), including
PIL's integer behaviour, so that a batched op on a tensor gives the pixels timm's op gives on
the same image:

* ``ImageEnhance`` ops are ``Image.blend(degenerate, img, f)``, which truncates (not rounds)
  ``d + f * (x - d)`` after clipping to 0..255;
* grey is PIL's ``convert('L')``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``;
* affine ops sample at pixel centres, fill where the source point falls outside the image,
  and clamp neighbours at the border (PIL ``Geometry.c``); the result is truncated to uint8.
  Translate/shear use PIL's own bilinear and bicubic (a = -1) weights; Rotate uses
  ``grid_sample``, whose bicubic kernel (a = -0.75) differs from PIL's.

Ops return uint8 so rounding happens after every op, as between PIL ops.
Where the per-sample arguments come from is ``randaugment.py``'s business.

On CUDA nothing here makes the host wait: per-sample arguments arrive through
``transfer.to_device`` (pinned, non-blocking), constants are made once per device, and the
histograms of Equalize have a fixed size (``index_add_`` into 256 bins per channel; ``bincount``
would read the input's max back to size its output). ``tests/test_host_syncs.py`` counts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .transfer import constant, to_device


def _col(v: torch.Tensor, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Per-sample values as a [k, 1, 1, 1] tensor on x's device (host values: a non-blocking copy)."""
    return to_device(v.to(dtype), x.device).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend``: truncate(clip(d + f * (x - d))) in float32."""
    f = _col(factor, x)
    out = degenerate + f * (x.float() - degenerate)
    return out.clamp_(0, 255).to(torch.uint8)  # float->uint8 truncates toward zero, like PIL


def grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB->L conversion as [k, 1, H, W] float (exact integers)."""
    xi = x.to(torch.int32)
    g = (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 0x8000) >> 16
    return g.float()


def _flat_index(x: torch.Tensor) -> torch.Tensor:
    """Each value's slot in per-(sample, channel) 256-entry tables, flat int32: value +
    256 * (sample * C + channel). int32 rather than int64 halves the traffic of this
    full-size temporary; ``index_add_`` and ``index_select`` take it (2-3x faster, measured)."""
    k, c = x.shape[:2]
    offset = (torch.arange(k * c, device=x.device, dtype=torch.int32) * 256).view(k, c, 1, 1)
    return x.to(torch.int32, memory_format=torch.contiguous_format).add_(offset).view(-1)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) 256-bin histograms, [k, 3, 256] int32. The output size is known
    up front, so on CUDA this is one atomic-add kernel with no read-back (``bincount`` copies the
    input's max to the host to size its result)."""
    k, c = x.shape[:2]
    idx = _flat_index(x)
    hist = torch.zeros(k * c * 256, dtype=torch.int32, device=x.device)
    ones = torch.ones((), dtype=torch.int32, device=x.device).expand(idx.numel())
    return hist.index_add_(0, idx, ones).view(k, c, 256)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Look up each (sample, channel) in its own 256-entry table; lut is [k, 3, 256] uint8."""
    return lut.reshape(-1).index_select(0, _flat_index(x)).view(x.shape)


# --------------------------------------------------------------------------- colour / LUT ops
def auto_contrast(x: torch.Tensor, _arg=None) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
    k, c = x.shape[:2]
    flat = x.view(k, c, -1) if x.is_contiguous() else x.reshape(k, c, -1)
    return _apply_lut(x, autocontrast_lut(flat.amin(-1), flat.amax(-1)))


def autocontrast_lut(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """AutoContrast's [k, 3, 256] uint8 tables from each channel's min and max value."""
    lo, hi = lo.double(), hi.double()
    i = torch.arange(256, device=lo.device, dtype=torch.float64)
    span = (hi - lo).clamp(min=1)
    scale = torch.full_like(span, 255.0) / span  # tensor/tensor: `255.0 / t` rounds differently from PIL
    # Truncation by the integer cast, not .trunc(): on CPU torch's trunc/floor start an OpenMP
    # parallel region even for these few hundred values, and its threads then spin for
    # milliseconds on the cores the compiled kernels run on next (measured, see cpu_kernels).
    lut = (i * scale[..., None] - (lo * scale)[..., None]).to(torch.int64).clamp(0, 255)
    lut = torch.where((hi > lo)[..., None], lut, i.to(torch.int64))  # flat channel: PIL leaves it unchanged
    return lut.to(torch.uint8)


def equalize(x: torch.Tensor, _arg=None) -> torch.Tensor:
    """ImageOps.equalize, one table per (sample, channel) from its histogram."""
    return _apply_lut(x, equalize_lut(_histogram(x)))


def occupied_range(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest occupied bin of [..., 256] histograms: each channel's min and max."""
    occupied = hist > 0
    return occupied.int().argmax(-1), 255 - torch.flip(occupied, dims=[-1]).int().argmax(-1)


def equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """Equalize's [k, 3, 256] uint8 tables from [k, 3, 256] histograms, PIL's rule: step =
    (pixels - count of the top value) // 255, lut[i] = (step // 2 + pixels below i) // step;
    identity when step is 0."""
    hist = hist.to(torch.int64)
    total = hist.sum(-1)
    _, top = occupied_range(hist)
    step = (total - hist.gather(-1, top[..., None]).squeeze(-1)) // 255
    below = torch.cumsum(hist, -1) - hist
    safe = step.clamp(min=1)[..., None]
    lut = ((safe // 2 + below) // safe).clamp(max=255)
    ident = torch.arange(256, device=hist.device).expand_as(lut)
    lut = torch.where((step > 0)[..., None], lut, ident)
    return lut.to(torch.uint8)


def invert(x: torch.Tensor, _arg=None) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits (bits >= 8: unchanged, 0: black)."""
    shift = (8 - bits.clamp(0, 8)).to(torch.int64)
    mask = (256 - (1 << shift)).to(torch.uint8)  # ~(2**(8-bits) - 1) & 0xFF
    return x & _col(mask, x, torch.uint8)


def solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """Invert pixels >= thresh (thresh 256: unchanged)."""
    return torch.where(x.to(torch.int16) < _col(thresh, x, torch.int16), x, 255 - x)


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Add to pixels below 128, saturating at 255."""
    added = (x.to(torch.int16) + _col(add, x, torch.int16)).clamp_(max=255).to(torch.uint8)
    return torch.where(x < 128, added, x)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the grey image."""
    return _blend(grey(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a flat image at the rounded mean grey level."""
    return _blend(_col(contrast_level(grey(x).sum(dim=(1, 2, 3), dtype=torch.float64), x[0, 0].numel()), x),
                  x, factor)


def contrast_level(grey_sum: torch.Tensor, pixels: int) -> torch.Tensor:
    """The flat grey level Contrast blends with: the mean of PIL's L image, rounded half up.
    From the (exact, integer-valued) sum of grey values so every backend agrees."""
    return torch.floor(grey_sum.double() / pixels + 0.5)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros((), device=x.device), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH-filtered image (border pixels unfiltered).

    The SMOOTH sum (3x3 box + 4 x centre) is computed exactly in int16 as a separable box sum
    (a few shifted adds instead of a float ``conv2d``, which was the slowest colour op on CPU);
    PIL then rounds sum / 13, which is never exactly half-way (13 is odd), so the rounding is
    unambiguous."""
    xi = x.to(torch.int16)
    rows = xi[:, :, :, :-2] + xi[:, :, :, 1:-1] + xi[:, :, :, 2:]  # horizontal 3-sums
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
    total = box.add_(xi[:, :, 1:-1, 1:-1], alpha=4)  # <= 13 * 255: fits int16
    degenerate = x.float()
    degenerate[:, :, 1:-1, 1:-1] = total.float().div_(13.0).round_()
    return _blend(degenerate, x, factor)


# Ops whose output value depends only on the input value and the sample's argument, so that
# on CPU they run as one 256-entry table per sample (``cpu_kernels``); the table is the op itself
# applied to the values 0..255, so both backends share these definitions.
VALUE_OPS = ("Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing", "SolarizeAdd",
             "Brightness", "BrightnessIncreasing")


def value_lut(fn, arg: torch.Tensor, k: int) -> torch.Tensor:
    """[k, 3, 256] uint8 tables: ``fn`` (a VALUE_OPS op) applied to every value 0..255."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(k, 3, 1, 256).contiguous()
    return fn(values, arg).view(k, 3, 256)


def contrast_lut(level: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Contrast as [k, 3, 256] tables, given each sample's ``contrast_level``."""
    k = len(factor)
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(k, 3, 1, 256).contiguous()
    return _blend(_col(level, values), values, factor).view(k, 3, 256)


# --------------------------------------------------------------------------- geometric ops
def affine(x: torch.Tensor, matrix: torch.Tensor, fill: tuple[int, int, int], mode: str) -> torch.Tensor:
    """PIL ``Image.transform(AFFINE)`` per sample. ``matrix`` [k, 2, 3] maps an output pixel
    centre (x + .5, y + .5) to the source point, PIL's convention; ``mode`` bilinear/bicubic."""
    k, _, h, w = x.shape
    dev = x.device
    m = to_device(matrix.to(torch.float32), dev)
    ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5).view(1, 1, w)
    src_x = m[:, 0, 0, None, None] * xs + m[:, 0, 1, None, None] * ys + m[:, 0, 2, None, None]
    src_y = m[:, 1, 0, None, None] * xs + m[:, 1, 1, None, None] * ys + m[:, 1, 2, None, None]
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    # align_corners=False: normalized -1..1 spans pixel edges, matching PIL's centre convention;
    # 'border' padding = PIL clamping neighbour indices at the edge.
    grid = torch.stack((src_x * (2.0 / w) - 1.0, src_y * (2.0 / h) - 1.0), dim=-1)
    out = F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    # PIL truncates; the small bias absorbs float32 grid error on exact values (pure shifts).
    out = out.add_(0.005).clamp_(0, 255).to(torch.uint8)
    fill_t = constant(fill, torch.uint8, dev).view(1, 3, 1, 1)
    return torch.where(inside.unsqueeze(1), out, fill_t)


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """PIL's affine bicubic (``Geometry.c``: cubic convolution with a = -1) weights of the
    taps at offsets -1, 0, 1, 2 for fractional positions ``t`` in [0, 1)."""
    t2, t3 = t * t, t * t * t
    return [-t + 2 * t2 - t3, 1 - 2 * t2 + t3, t + t2 - t3, -t2 + t3]


def shift_taps(shift: torch.Tensor, mode: str, w: int):
    """Everything 1-D resampling of rows of length ``w`` needs, from float64 shifts [k, H]:
    per row the integer shift [k, H] int64, the tap offsets, the tap weights [k, H, taps]
    float32 (PIL's bilinear, or bicubic with a = -1) and the output range [first, stop) whose
    source pixel centre lies inside the row (PIL fills the rest). Shared by both backends."""
    shift = shift.to(torch.float64)
    whole = torch.floor(shift)
    frac = (shift - whole).to(torch.float32).unsqueeze(-1)
    if mode == "bilinear":
        taps, weights = (0, 1), [1.0 - frac, frac]
    elif mode == "bicubic":
        taps, weights = (-1, 0, 1, 2), _cubic_weights(frac)
    else:
        raise ValueError(f"mode must be bilinear or bicubic, got {mode!r}")
    # PIL fills where the source pixel centre is outside the row: j + shift not in [-0.5, w - 0.5).
    first = torch.ceil(-0.5 - shift).to(torch.int64)
    stop = torch.ceil(w - 0.5 - shift).to(torch.int64)
    return whole.to(torch.int64), taps, torch.cat(weights, -1), first, stop


def shift_resample(x: torch.Tensor, shift: torch.Tensor, fill: tuple[int, int, int], mode: str) -> torch.Tensor:
    """PIL ``Image.transform(AFFINE)`` for maps that move pixels along rows only: output pixel
    (y, j) samples source column j + shift[k, y] of the same row (pixel-index coordinates).

    TranslateX (one shift per image) and ShearX (one per row) have this form; their Y versions
    are the same on the transposed image. A row shifted by a constant has one fractional part,
    so resampling is 2 (bilinear) or 4 (bicubic) gathered taps with per-row weights instead of
    ``grid_sample``'s per-pixel 2-D work; the taps and weights are PIL's (``shift_taps``).
    ``shift`` is float64 [k, H]; ``x`` uint8 [k, 3, H, W]."""
    k, c, h, w = x.shape
    dev = x.device
    whole, taps, weights, first, stop = shift_taps(shift, mode, w)
    weights = to_device(weights, dev).view(k, 1, h, len(taps)).unbind(-1)
    weights = [t.unsqueeze(-1) for t in weights]
    # One gather of the row segment every tap reads (columns taps[0] .. w - 1 + taps[-1]
    # around the integer shift, clamped at the border); each tap is then a slice of it.
    lo, span = taps[0], w + taps[-1] - taps[0]
    cols = torch.arange(lo, lo + span, device=dev)
    idx = (to_device(whole, dev).unsqueeze(-1) + cols).clamp_(0, w - 1)  # [k, H, span]
    seg = torch.gather(x, 3, idx.unsqueeze(1).expand(k, c, h, span)).float()
    out = seg[..., 0:w] * weights[0]
    for i in range(1, len(taps)):
        out.addcmul_(seg[..., i:i + w], weights[i])
    # PIL truncates; the small bias absorbs float32 error on exact values, as in ``affine``.
    out = out.add_(0.005).clamp_(0, 255).to(torch.uint8)
    j = torch.arange(w, device=dev)
    inside = (j >= to_device(first, dev).unsqueeze(-1)) & (j < to_device(stop, dev).unsqueeze(-1))
    fill_t = constant(fill, torch.uint8, dev).view(1, 3, 1, 1)
    return torch.where(inside.unsqueeze(1), out, fill_t)


def shift_along(x: torch.Tensor, shift: torch.Tensor, axis: str, fill: tuple[int, int, int],
                mode: str) -> torch.Tensor:
    """``shift_resample`` along rows (``axis='x'``, shift [k, H]) or columns (``'y'``, [k, W])."""
    if axis == "x":
        return shift_resample(x, shift, fill, mode)
    return shift_resample(x.transpose(2, 3), shift, fill, mode).transpose(2, 3)


def row_shifts(matrix: torch.Tensor, h: int, w: int) -> tuple[str, torch.Tensor] | None:
    """For a PIL affine matrix [k, 2, 3] that is a translation or shear along one axis, the axis
    and per-row (or per-column) shifts ``shift_along`` takes; None for any other map."""
    m = matrix.double()
    if not (torch.all(m[:, 0, 0] == 1) and torch.all(m[:, 1, 1] == 1)):
        return None
    if torch.all(m[:, 1, 0] == 0) and torch.all(m[:, 1, 2] == 0):  # src_x = x + b y + c
        ys = torch.arange(h, dtype=torch.float64) + 0.5
        return "x", m[:, 0, 1, None] * ys + m[:, 0, 2, None]
    if torch.all(m[:, 0, 1] == 0) and torch.all(m[:, 0, 2] == 0):  # src_y = y + a x + c
        xs = torch.arange(w, dtype=torch.float64) + 0.5
        return "y", m[:, 1, 0, None] * xs + m[:, 1, 2, None]
    return None


def rotate_matrix(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL ``Image.rotate`` (counter-clockwise, about the image centre) as an affine matrix."""
    a = -degrees.double() * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = w / 2.0, h / 2.0
    m = torch.zeros(len(degrees), 2, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
    m[:, 0, 2] = -cos * cx - sin * cy + cx
    m[:, 1, 2] = sin * cx - cos * cy + cy
    return m


def shear_matrix(factor: torch.Tensor, axis: str) -> torch.Tensor:
    m = torch.zeros(len(factor), 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    if axis == "x":
        m[:, 0, 1] = factor  # source x = x + f * y
    else:
        m[:, 1, 0] = factor
    return m


def translate_matrix(pixels: torch.Tensor, axis: str) -> torch.Tensor:
    m = torch.zeros(len(pixels), 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    m[:, 0 if axis == "x" else 1, 2] = pixels
    return m


# The table randaugment.py dispatches on. Geometric ops are batched together there.
POINT_OPS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
    "Posterize": posterize, "PosterizeIncreasing": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color, "Contrast": contrast, "ContrastIncreasing": contrast,
    "Brightness": brightness, "BrightnessIncreasing": brightness,
    "Sharpness": sharpness, "SharpnessIncreasing": sharpness,
}
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SHIFT_OPS = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")  # resampled by ``shift_along``
