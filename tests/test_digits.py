"""center_digit: MNIST's framing (20x20 box, centre of mass at the centre of 28x28)."""

import numpy as np
import pytest

import xcnn
from xcnn.digits import BOX, CENTRE, FIELD, center_digit, resize


def centre_of_mass(img):
    mass = img.sum()
    ys, xs = np.indices(img.shape)
    return (ys * img).sum() / mass, (xs * img).sum() / mass


def ink_box(img, level=0.0):
    rows, cols = np.nonzero(img > level)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


@pytest.fixture(scope="module")
def sample():
    return xcnn.datasets.sample()


@pytest.fixture(scope="module")
def seed_model(sample):
    """The tutorial's net, trained for one epoch on the embedded sample (a few seconds)."""
    model = xcnn.build_model("seed", seed=0)
    opt = xcnn.make_optimizer("adam", model, 0.005)
    xcnn.fit(model, opt, sample.x_train, sample.y_train, epochs=1, batch_size=32, progress=False)
    return model


def displaced(digit, factor, top, left, shape):
    """A 28x28 MNIST digit enlarged ``factor`` times (whole pixels, as a sharp drawing would
    be) and put at (top, left) of a bigger black canvas."""
    big = np.kron(digit, np.ones((factor, factor)))
    canvas = np.zeros(shape)
    canvas[top : top + big.shape[0], left : left + big.shape[1]] = big
    return canvas


def test_output_shape_dtype_range_and_box(sample):
    for digit in sample.x_test[:50, 0] / 255.0:
        out = center_digit(digit)
        assert out.shape == (28, 28) and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
        h, w = ink_box(out)
        assert max(h, w) == BOX  # the longer side fills the 20 px box exactly


def test_centre_of_mass_within_half_a_pixel(sample):
    rng = np.random.default_rng(0)
    for digit in sample.x_test[:40, 0] / 255.0:
        factor = int(rng.integers(1, 5))
        size = FIELD * factor
        top, left = rng.integers(0, 140 - size + 1), rng.integers(0, 120 - size + 1)
        out = center_digit(displaced(digit, factor, top, left, (140, 120)))
        cy, cx = centre_of_mass(out)
        assert abs(cy - CENTRE) <= 0.5 and abs(cx - CENTRE) <= 0.5, (cy, cx)


def test_mnist_digits_are_nearly_unchanged(sample):
    """MNIST digits are already framed this way: recentring most leaves them as they were."""
    x = sample.x_test[:100, 0] / 255.0
    out = np.stack([center_digit(d) for d in x])
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(x, out, strict=True)]
    assert np.median(corr) > 0.99, np.median(corr)
    assert np.mean(np.array(corr) > 0.999) > 0.95  # measured: 99.9% of the test digits


def test_centre_is_mnists(sample):
    """MNIST's centres of mass lie within half a pixel of CENTRE (the target is measured)."""
    x = sample.x_test[:, 0] / 255.0
    ys, xs = np.indices((28, 28))
    m = x.sum(axis=(1, 2))
    cy, cx = (x * ys).sum(axis=(1, 2)) / m, (x * xs).sum(axis=(1, 2)) / m
    assert np.all(np.abs(cy - CENTRE) <= 0.5 + 1e-9) and np.all(np.abs(cx - CENTRE) <= 0.5 + 1e-9)
    assert abs(cy.mean() - CENTRE) < 0.05 and abs(cx.mean() - CENTRE) < 0.05


def test_aspect_ratio_is_kept():
    tall = np.zeros((300, 300))
    tall[10:210, 150:200] = 1.0  # 200 x 50: a 4:1 bar
    h, w = ink_box(center_digit(tall), 0.5)
    assert (h, w) == (20, 5)
    wide = tall.T
    h, w = ink_box(center_digit(wide), 0.5)
    assert (h, w) == (5, 20)
    dot = np.zeros((50, 50))
    dot[7, 40] = 1.0  # one pixel: scaled to fill the box
    assert ink_box(center_digit(dot), 0.5) == (20, 20)


def test_shifted_and_scaled_digits_are_classified_after_centring(sample, seed_model):
    """Displaced digits fool the model; centred again they are read as well as the originals."""
    rng = np.random.default_rng(1)
    x, y = sample.x_test[:200, 0] / 255.0, sample.y_test[:200]
    moved, centred = [], []
    for digit in x:
        factor = int(rng.integers(2, 5))
        size = FIELD * factor
        top, left = rng.integers(0, 140 - size + 1), rng.integers(0, 120 - size + 1)
        canvas = displaced(digit, factor, top, left, (140, 120))
        moved.append(np.clip(resize(canvas, 28, 28), 0, 1))  # a plain resize, no framing
        centred.append(center_digit(canvas))

    def accuracy(images):
        batch = (np.stack(images)[:, None] * 255).astype(np.float32)
        pred = xcnn.predict(seed_model, np.rint(batch).astype(np.uint8))
        return float((np.asarray(pred).argmax(axis=1) == y).mean())

    original, plain, framed = accuracy(list(x)), accuracy(moved), accuracy(centred)
    assert original > 0.85, original
    assert framed >= original - 0.05, (framed, original)
    assert plain < original - 0.3, (plain, original)  # the check can fail: framing matters


def test_blank_and_faint_images_give_zeros():
    assert not center_digit(np.zeros((40, 30))).any()
    assert not center_digit(np.full((5, 5), 0.5 / 255)).any()  # below the ink level
    assert center_digit(np.zeros((1, 1))).shape == (28, 28)


def test_accepts_lists_and_float32():
    img = np.zeros((30, 30), np.float32)
    img[5:20, 8:12] = 1
    assert np.array_equal(center_digit(img), center_digit(img.astype(np.float64).tolist()))


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((3, 28, 28)), "2-D"),
        (np.zeros(28), "2-D"),
        (np.zeros((0, 5)), "non-empty"),
        (np.full((5, 5), np.nan), "NaN"),
        (np.full((5, 5), np.inf), "NaN or infinite"),
        (np.full((5, 5), 2.0), "0..1"),
        (np.full((5, 5), -0.1), "0..1"),
        (np.zeros((5, 5), np.uint8), "divide 8-bit"),
        (np.zeros((5, 5), bool), "real-valued"),
        (np.array([["a"]]), "real-valued"),
        ([[0.0, 1.0], [0.0]], "not readable"),
    ],
)
def test_bad_input_raises_clearly(image, message):
    with pytest.raises(ValueError, match=message):
        center_digit(image)


def test_resize_keeps_constants_and_range():
    img = np.full((37, 91), 0.25)
    for shape in [(5, 7), (20, 20), (200, 300)]:
        out = resize(img, *shape)
        assert out.shape == shape and np.allclose(out, 0.25)
    rng = np.random.default_rng(0)
    noisy = rng.random((50, 60))
    out = resize(noisy, 13, 17)
    assert out.min() >= 0 and out.max() <= 1
    # Down by an integer factor, the triangle filter is a weighted mean of each 2x2 block's
    # neighbourhood: the total mean is kept up to the edge weighting.
    assert abs(resize(noisy, 25, 30).mean() - noisy.mean()) < 0.01
    with pytest.raises(ValueError, match="size"):
        resize(img, 0, 3)
