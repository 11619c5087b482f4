"""Format-level checks of the writers against the real libraries: our FFCV dtypes equal ffcv's,
samples never cross FFCV pages (ffcv's Reader reads them back), our index text equals DALI's wds2idx
output, and the small pure helpers behave."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipelines.convert import dali_out, ffcv_out
from pipelines.convert.convert import Settings, sample_key, stored_as_jpeg
from pipelines.convert.decode import SkipImage, decode_rgb, fit_size


def test_ffcv_dtypes_match_ffcv():
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, TYPE_ID_HANDLER, get_metadata_type

    assert ffcv_out.HEADER == HeaderType and ffcv_out.FIELD_DESC == FieldDescType
    assert ffcv_out.ALLOC == ALLOC_TABLE_TYPE and ffcv_out.FORMAT_VERSION == CURRENT_VERSION
    assert ffcv_out.SAMPLE_META == get_metadata_type([RGBImageField(), IntField()])
    assert TYPE_ID_HANDLER[ffcv_out.TYPE_RGB_IMAGE] is RGBImageField and TYPE_ID_HANDLER[ffcv_out.TYPE_INT] is IntField


def test_beton_samples_never_cross_pages(tmp_path):
    """3 MiB payloads in 8 MiB pages: the third of each page must move to the next page."""
    from ffcv.reader import Reader

    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 255, size, dtype=np.uint8).tobytes() for size in (3 << 20, 3 << 20, 3 << 20, 5, 3 << 20)]
    w = ffcv_out.PartWriter(tmp_path / "p.bin")
    for i, p in enumerate(payloads):  # raw 1024x1024 RGB = 3 MiB; the 5-byte one stands in for a tiny JPEG
        w.add(i, ffcv_out.MODE_RAW, 1024, 1024, p) if len(p) > 5 else w.add(i, ffcv_out.MODE_JPG, 1, 1, p)
    w.close(tmp_path / "p.npy")
    stats = ffcv_out.write_beton(tmp_path / "x.beton", [(tmp_path / "p.bin", tmp_path / "p.npy")])
    r = Reader(str(tmp_path / "x.beton"))
    page = int(r.page_size)
    assert stats["page_size"] == page == ffcv_out.MIN_PAGE_SIZE and r.num_samples == len(payloads)
    data = (tmp_path / "x.beton").read_bytes()
    for i, p in enumerate(payloads):
        ptr, size = int(r.alloc_table["ptr"][i]), int(r.alloc_table["size"][i])
        assert r.alloc_table["sample_id"][i] == i and r.metadata["f1"][i] == i
        assert ptr == int(r.metadata["f0"]["data_ptr"][i]) and ptr % page + size <= page
        assert data[ptr:ptr + size] == p
    assert int(r.alloc_table["ptr"][2]) % page == 0  # moved to a fresh page


def test_builtin_index_equals_dali_wds2idx(tmp_path):
    pytest.importorskip("wds2idx")
    samples = [(f"{i:08d}_img{i}", bytes(range(256)) * (i + 1), i % 3) for i in range(5)]
    members = dali_out.write_shard(tmp_path / "s.tar", samples)
    assert dali_out.write_index(tmp_path / "s.tar", tmp_path / "s.idx", members) == "wds2idx"
    assert (tmp_path / "s.idx").read_text() == dali_out.index_text(members)
    assert dali_out.read_index(tmp_path / "s.idx")[0] == [("jpg", 512, 256, "00000000_img0.jpg"),
                                                         ("cls", 1536, 1, "00000000_img0.cls")]
    # deterministic bytes: the same samples give the same tar (what makes resumed runs identical)
    dali_out.write_shard(tmp_path / "t.tar", samples)
    assert (tmp_path / "s.tar").read_bytes() == (tmp_path / "t.tar").read_bytes()


def test_sample_keys_are_webdataset_safe():
    assert sample_key(7, "train/n01/n01_10026.JPEG") == "00000007_n01_10026"
    assert sample_key(1, "a/b/my photo.v2.jpg") == "00000001_my_photo"
    assert "." not in sample_key(3, "x/.hidden")


def test_fit_size_caps_longest_side_only():
    assert fit_size(400, 350, 500) == (400, 350)
    assert fit_size(1000, 750, 500) == (500, 375)
    assert fit_size(333, 1000, 500) == (166, 500)
    assert fit_size(5000, 3, 500) == (500, 1)
    assert fit_size(640, 480, None) == (640, 480)


def test_proportion_mode_is_deterministic_and_near_probability():
    s = Settings(write_mode="proportion", compress_probability=0.3)
    draws = [stored_as_jpeg(s, "train", i) for i in range(4000)]
    assert draws == [stored_as_jpeg(s, "train", i) for i in range(4000)]
    assert 0.27 < np.mean(draws) < 0.33
    assert all(stored_as_jpeg(Settings(write_mode="jpg"), "val", i) for i in range(10))


def _encoded(fmt: str) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_encoded("PNG"))
    at = data.index(b"IDAT") + 40
    data[at:at + 8] = b"\xff" * 8  # breaks the zlib stream (and the chunk CRC)
    return bytes(data)


@pytest.mark.parametrize("make, reason", [(lambda: b"", "empty file"), (lambda: b"hello world", "not an image"),
                                          (lambda: _encoded("JPEG")[:300], "truncated"),
                                          (lambda: _encoded("JPEG")[:-200], "truncated"),
                                          (_corrupt_png, "cannot decode")])
def test_decode_reasons(make, reason):
    with pytest.raises(SkipImage, match=reason):
        decode_rgb(make())


def test_decode_matches_reference_convert():
    import io

    from PIL import Image
    for mode in ("L", "CMYK", "RGBA", "P", "I;16"):
        img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(
            "I" if mode == "I;16" else mode)
        if mode == "I;16":
            img = img.convert("I;16")
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert np.array_equal(np.asarray(decode_rgb(buf.getvalue())), ref), mode


def test_item_list_round_trips_tabs_and_undecodable_names():
    from pipelines.dataroot import decode_items, encode_items

    names = ["train/a/x.JPEG", "train/a/tab\tin name.JPEG", "train/b/" + os.fsdecode(b"\xff\xfe.JPEG"),
             "train/b/ spaces and a CR \r"]
    assert decode_items(encode_items(names, [0, 0, 1, 1])) == (names, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="line break"):
        encode_items(["train/a/line\nbreak.JPEG"], [0])
    with pytest.raises(ValueError, match="line 2"):
        decode_items(b"train/a/x.JPEG\t0\nno label here\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_part_writer_reports_a_full_disk_as_enospc(tmp_path):
    """The converter's one-line disk-full message keys on ENOSPC; numpy's np.save into a file
    reported a full tmpfs as "N requested and M written" with no errno (seen in CI)."""
    import errno
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mount -t tmpfs failed here")
    try:
        w = ffcv_out.PartWriter(mnt / "p.bin")
        for i in range(300):  # bins take 2 of 3 pages; the 8.7 KB of metadata get 1
            w.add(i, ffcv_out.MODE_JPG, 1, 1, b"x" * 20)
        with pytest.raises(OSError) as info:
            w.close(mnt / "p.npy")
        assert info.value.errno == errno.ENOSPC
    finally:
        subprocess.run(["umount", str(mnt)])
