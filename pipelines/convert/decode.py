"""Source bytes -> RGB pixels exactly as the reference loader sees them -> the stored JPEG.

The reference pipeline (torchvision ``ImageFolder`` / timm) loads ``Image.open(p).convert('RGB')``.
Every source is decoded fully with that call (the only reliable test for truncated data). A source
that already is an RGB JPEG (baseline or progressive) within the size cap and without an EXIF
rotation is then stored as its **original bytes**: the FFCV and DALI decoders see the very file timm
evaluates, with no second JPEG generation loss and no encode at conversion
(:func:`passes_through`). Everything else is re-encoded from the reference loader's pixels, so
every odd input agrees with the reference by construction: CMYK and Adobe-inverted CMYK JPEGs,
grayscale, palette and RGBA PNGs (even when named ``.JPEG``, as one ImageNet train file is),
oversize images. **EXIF orientation is ignored**, as the reference loader ignores it and as ImageNet
practice is (labels and boxes were made on the unrotated pixels): a JPEG whose EXIF asks for a
rotation is re-encoded as a fresh baseline JPEG that carries no EXIF block, so no downstream
decoder (DALI's applies EXIF orientation by default) can rotate it either.

Files that PIL cannot decode raise :class:`SkipImage` with a short reason for the manifest.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

# FFCV stores width/height as uint16 and baseline JPEG allows 65500 per side.
MAX_SIDE = 65500


class SkipImage(Exception):
    """A source file that cannot be converted; ``str(e)`` is the reason recorded in the manifest."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully (truncation is only detected on load) and convert like the reference loader."""
    return decode_source(data)[0]


def decode_source(data: bytes) -> tuple[Image.Image, bool]:
    """(RGB image as the reference loader sees it, whether ``data`` itself may be stored: an RGB
    JPEG whose EXIF, if any, asks for no rotation)."""
    if not data:
        raise SkipImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Corrupt-EXIF and palette-transparency warnings are noise here; errors still raise.
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            original = img.format == "JPEG" and img.mode == "RGB" and _orientation(img) in (None, 1)
            if img.mode != "RGB":
                img = img.convert("RGB")
        except Image.DecompressionBombError as e:
            raise SkipImage(f"too many pixels ({e})") from None
        except UnidentifiedImageError:
            raise SkipImage("not an image (format not recognised)") from None
        except OSError as e:
            text = str(e)
            if "truncated" in text.lower():
                raise SkipImage("truncated image data") from None
            raise SkipImage(f"cannot decode: {text}") from None
        except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
            # PIL's plugins raise these for malformed headers or unsupported pixel modes.
            raise SkipImage(f"cannot decode: {type(e).__name__}: {e}") from None
    if max(img.size) > MAX_SIDE:
        raise SkipImage(f"too large ({img.width}x{img.height}; longest side must be <= {MAX_SIDE})")
    return img, original


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag (0x0112) of a decoded JPEG, None without one or when EXIF is unreadable
    (a decoder that cannot read it cannot rotate by it either)."""
    try:
        return img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - PIL raises many kinds on malformed EXIF; the pixels are fine
        return None


def passes_through(original_ok: bool, img: Image.Image, stored: Image.Image) -> bool:
    """Whether the source bytes are stored as they are: an RGB JPEG without rotation (``original_ok``
    from :func:`decode_source`) that the size cap left unchanged (``stored is img``)."""
    return original_ok and stored is img


def fit_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """Size after capping the longest side at ``max_resolution`` (aspect kept, never upscaled)."""
    longest = max(width, height)
    if not max_resolution or longest <= max_resolution:
        return width, height
    ratio = max_resolution / longest
    if width >= height:
        return max_resolution, max(1, int(height * ratio))
    return max(1, int(width * ratio)), max_resolution


def resize_to_fit(img: Image.Image, max_resolution: int | None) -> Image.Image:
    """Area-averaging downscale (PIL's BOX filter, the counterpart of the cv2 INTER_AREA that FFCV's
    writer uses), so a beton from either writer holds the same kind of pixels."""
    size = fit_size(img.width, img.height, max_resolution)
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.BOX)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline (non-progressive) 4:2:0 JPEG: the fastest kind for DALI's and FFCV's decoders."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
