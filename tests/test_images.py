"""Reading real pictures (every mode, full range, hostile files) and preparing them for models."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xcnn import images
from xcnn.digits import center_digit
from xcnn.images import ImageError, prepare_image, read_image

Image = pytest.importorskip("PIL.Image", reason="pictures are decoded by Pillow")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path, width: int, height: int, *, full: bool = False) -> None:
    """A PNG whose header declares width x height grey pixels, in a small file.

    ``full``: all rows present (zeros compress about 1000:1), so decoding would succeed and
    allocate the whole picture; otherwise only two rows, enough to look like a PNG.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = height if full else 2
    idat = zlib.compress(b"\x00" * (width + 1) * rows, 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )  # fmt: skip


def test_sixteen_bit_grey_keeps_its_range(tmp_path):
    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I;16")
    got = read_image(tmp_path / "g16.png")
    assert got.dtype == np.float32 and got.shape == (64, 64)
    np.testing.assert_allclose(got, a / 65535.0, rtol=1e-6)
    assert len(np.unique(got)) == 4096  # not binarised, not cut to 256 levels


def test_palette_alpha_one_bit_and_rgb(tmp_path):
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0], rgb[2, 3] = 200, (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_allclose(read_image(tmp_path / "c.png"), rgb / 255.0, rtol=1e-6)

    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(
        tmp_path / "p.png"
    )
    pal = read_image(tmp_path / "p.png")
    assert pal.shape == (5, 6, 3)
    np.testing.assert_allclose(pal, rgb / 255.0, atol=1 / 255)

    bits = np.zeros((4, 8), bool)
    bits[1, 2:5] = True
    Image.fromarray(bits).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), bits.astype(np.float32))

    # A black pen on a transparent canvas: black on white, not black on black.
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 3, 3] = 255  # opaque black stroke; elsewhere transparent black
    Image.fromarray(rgba).save(tmp_path / "pen.png")
    pen = read_image(tmp_path / "pen.png")
    assert pen.shape == (8, 8) and pen[0, 0] == 1.0 and pen[3, 3] == 0.0
    rgba[..., :3] = 255  # white pen
    Image.fromarray(rgba).save(tmp_path / "chalk.png")
    chalk = read_image(tmp_path / "chalk.png")
    assert chalk[0, 0] == 0.0 and chalk[3, 3] == 1.0
    # Grey content saved as RGB comes back as one channel.
    Image.fromarray(np.full((3, 3, 3), 77, np.uint8)).save(tmp_path / "grey.bmp")
    assert read_image(tmp_path / "grey.bmp").shape == (3, 3)


def test_npy_arrays(tmp_path):
    np.save(tmp_path / "u16.npy", np.array([[0, 65535]], np.uint16))
    np.testing.assert_array_equal(read_image(tmp_path / "u16.npy"), [[0.0, 1.0]])
    np.save(tmp_path / "chw.npy", np.ones((3, 4, 5), np.uint8) * 255)
    assert read_image(tmp_path / "chw.npy").shape == (4, 5)  # equal channels: grey
    np.save(tmp_path / "mask.npy", np.ones((4, 4), bool))
    with pytest.raises(ImageError, match="mask.npy: a bool array is a mask"):
        read_image(tmp_path / "mask.npy")
    np.save(tmp_path / "hot.npy", np.full((4, 4), 1.5))
    with pytest.raises(ImageError, match=r"hot.npy: float images .*\[0, 1\]"):
        read_image(tmp_path / "hot.npy")
    np.save(tmp_path / "cube.npy", np.zeros((4, 4, 4, 4), np.uint8))
    with pytest.raises(ImageError, match="cube.npy: expected an image"):
        read_image(tmp_path / "cube.npy")
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError, match="obj.npy: not a readable .npy"):
        read_image(tmp_path / "obj.npy")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "none.npy")


def test_npy_header_declaring_terabytes_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as fh:
        header = {"descr": "|u1", "fortran_order": False, "shape": (1 << 20, 1 << 20)}
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(bytes(16))
    with pytest.raises(ImageError, match="huge.npy"):
        read_image(path)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb, 30000, 30000)  # 900 Mpx declared: Pillow's own limit warns or raises
    with pytest.raises(ImageError, match="bomb.png: refused"):
        read_image(bomb)
    bomb_png(bomb, 5000, 5000)  # 25 Mpx: under Pillow's limit, over ours when it is lowered
    with pytest.raises(ImageError, match=r"bomb.png: refused: the header declares 5000x5000"):
        read_image(bomb, max_pixels=1_000_000)


BOMB_CHILD = """
import resource, sys
import numpy, PIL.Image, PIL.PngImagePlugin
from xcnn.images import read_image, ImageError
# The cap: what the interpreter uses now plus 150 MB. Decoding the 64 Mpx bomb needs 64 MB
# for the 8-bit picture and 256 MB for its float32 copy.
with open("/proc/self/status") as fh:
    vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize")) * 1024
limit = vm + (150 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    read_image(sys.argv[1], max_pixels=int(sys.argv[2]))
    print("decoded")
except ImageError as e:
    print("refused" if "refused" in str(e) else "failed", e)
except MemoryError:
    print("failed MemoryError")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_bomb_peak_memory_is_bounded_in_a_child(tmp_path):
    """A 64-megapixel PNG of 64 KB is refused under a 150 MB memory cap; without the pixel
    cap, the same file does not fit (so the cap is what keeps the memory bounded)."""
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb, 8000, 8000, full=True)
    assert bomb.stat().st_size < 200_000
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def child(max_pixels: int) -> str:
        argv = [sys.executable, "-c", BOMB_CHILD, str(bomb), str(max_pixels)]
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        return out.stdout + out.stderr

    assert child(images.MAX_PIXELS).startswith("refused"), child(images.MAX_PIXELS)
    assert not child(10**9).startswith(("refused", "decoded"))  # the checker can fail


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\x93NUMPY\x01\x00"]))
def test_random_bytes_give_a_clean_error(tmp_path, data, prefix):
    for suffix in (".png", ".npy"):
        path = tmp_path / f"fuzz{suffix}"
        path.write_bytes(prefix + data)
        try:
            image = read_image(path)
        except ImageError as e:
            assert str(path) in str(e)
        else:  # random bytes that happen to form a valid picture
            assert image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1


def test_truncated_png_is_named(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(
        tmp_path / "t.png"
    )
    raw = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageError, match="t.png: cannot decode"):
        read_image(tmp_path / "t.png")


def test_dark_on_light_digit_is_inverted_and_centred():
    canvas = np.ones((200, 150), np.float32)  # white paper
    canvas[30:150, 60:75] = 0.0  # a dark "1", off centre
    x, notes = prepare_image(canvas, (1, 28, 28))
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert notes and "inverted" in notes[0]
    np.testing.assert_array_equal(x[0], center_digit(1.0 - canvas))
    # Forced off: no inversion, no note.
    _, quiet = prepare_image(canvas, (1, 28, 28), invert=False)
    assert quiet == []
    # A white-on-black 28x28 picture (MNIST's format) is used as given.
    digit = np.zeros((28, 28), np.float32)
    digit[3:9, 4:6] = 1.0
    same, notes = prepare_image(digit, (1, 28, 28))
    assert notes == [] and np.array_equal(same[0], digit)


def test_other_models_get_a_plain_resize():
    rgb = np.random.default_rng(0).random((64, 48, 3)).astype(np.float32)
    x, notes = prepare_image(rgb, (3, 32, 32))
    assert x.shape == (3, 32, 32) and notes == []
    np.testing.assert_allclose(x[1], images.resize(rgb[..., 1], 32, 32), rtol=1e-6)
    grey, _ = prepare_image(rgb[..., 0], (3, 8, 8))
    np.testing.assert_array_equal(grey[0], grey[2])  # grey pictures fill every channel
    one, _ = prepare_image(rgb, (1, 16, 16))  # never auto-inverted: not a digit model
    assert one.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="2-channel"):
        prepare_image(rgb, (2, 8, 8))


@pytest.mark.slow
def test_drawn_digits_are_recognised_about_as_well_as_mnist_ones(tmp_path):
    """MNIST test digits drawn large, dark on light and off centre on a 300x400 canvas: the
    preparation (invert, centre) recovers the model's accuracy; a plain resize does not."""
    import xcnn
    from xcnn.training import scale_images

    s = xcnn.datasets.sample()
    model = xcnn.build_model("seed", seed=0)
    xcnn.fit(model, xcnn.make_optimizer("adam", model, 0.005), s.x_train, s.y_train,
             batch_size=32, progress=False)  # fmt: skip
    rng = np.random.default_rng(0)
    idx = rng.choice(len(s.x_test), 60, replace=False)
    paths = []
    for n, i in enumerate(idx):
        big = Image.fromarray(s.x_test[i, 0]).resize((150, 150), Image.Resampling.BILINEAR)
        canvas = np.full((300, 400), 255, np.uint8)
        y0, x0 = rng.integers(0, 150), rng.integers(0, 250)
        canvas[y0 : y0 + 150, x0 : x0 + 150] = 255 - np.asarray(big)
        Image.fromarray(canvas).save(tmp_path / f"{n}.png")
        paths.append(tmp_path / f"{n}.png")
    x, notes = images.prepare_images(paths, (1, 28, 28))
    assert all(note and "inverted" in note[0] for note in notes)
    prepared = xcnn.predict(model, scale_images(x * 255.0, "centered", np.float32)).argmax(1)
    direct = xcnn.predict(model, s.x_test[idx]).argmax(1)
    y = s.y_test[idx]
    plain = np.stack([images.resize(images.read_image(p), 28, 28) for p in paths])[:, None]
    naive = xcnn.predict(model, scale_images(plain * 255.0, "centered", np.float32)).argmax(1)
    assert np.mean(prepared == y) >= np.mean(direct == y) - 0.1
    assert np.mean(naive == y) < 0.5  # the checker can fail: without preparation it does
