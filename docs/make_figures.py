"""Draw every picture the docs use into docs/images/, from real data, with xcnn itself.

Usage (from the repository root; about 10 seconds on one CPU core)::

    python docs/make_figures.py            # writes docs/images/*.png
    python docs/make_figures.py --out DIR  # somewhere else

The data is the MNIST sample embedded in the package; training is seeded, so
a rerun draws the same pictures (up to floating-point differences between
machines).

- ``sobel.png``: the first 4 of the test set and its Sobel edge maps
  (:func:`xcnn.plots.sobel_figure`, the same picture as ``xcnn sobel --digit 4``);
- ``curves.png``, ``filters.png``, ``feature_maps.png``, ``confusion.png``:
  the tutorial's network (``build_model("seed")``) trained with its recipe
  (``xcnn.models.RECIPES["seed"]``: Adam, lr 0.005, batch 32) but for
  :data:`EPOCHS` epochs at a constant learning rate, so the curves show a
  trend, on the 8000 sample training digits, tested after every epoch on the
  2000 sample test digits (:func:`xcnn.plots.training_plots`). The feature
  maps are those of the first test digit (a 7). ``xcnn train --epochs 6
  --lr-decay 1 --plots DIR`` is the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"

#: Epochs of the pictured run, at a constant learning rate (lr_decay 1).
EPOCHS = 6
#: Seed of the initial weights and of the shuffle.
SEED = 0


def first_of(labels: np.ndarray, digit: int) -> int:
    """Index of the first image of ``digit``."""
    return int(np.flatnonzero(labels == digit)[0])


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=IMAGES, help="folder (default: docs/images)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)

    import xcnn
    from xcnn.datasets import sample
    from xcnn.models import RECIPES, build_model
    from xcnn.plots import sobel_figure, training_plots
    from xcnn.training import evaluate, fit

    data = sample()
    paths = [sobel_figure(data.x_test[first_of(data.y_test, 4), 0], args.out / "sobel.png")]

    recipe = RECIPES["seed"]
    epochs = args.epochs
    model = build_model("seed", seed=SEED)
    optimizer = xcnn.make_optimizer(recipe.optimizer, model, recipe.lr)
    history = fit(
        model,
        optimizer,
        data.x_train,
        data.y_train,
        epochs=epochs,
        batch_size=recipe.batch_size,
        lr_decay=1.0,
        validation_data=(data.x_test, data.y_test),
        scale=recipe.scale,
        seed=SEED,
        progress=False,
    )
    result = evaluate(model, data.x_test, data.y_test, scale=recipe.scale)
    print(
        "seed net, {} epochs: test accuracy {:.2%} (per epoch: {})".format(
            epochs,
            result["accuracy"],
            ", ".join(f"{a:.1%}" for a in history["val_accuracy"]),
        )
    )
    paths += training_plots(
        args.out,
        history=history,
        model=model,
        confusion=result["confusion"],
        image=data.x_test[0, 0],  # as xcnn train --plots
    )
    for p in paths:
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KB)")
    return paths


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
