"""Data-parallel training from Python: ``mpiexec -n 2 python docs/distributed_train.py``.

Every rank runs this same script; ``distributed="auto"`` finds the ranks the
launcher started (one process alone trains as usual). Rank 0 alone prints
and saves.
"""

import numpy as np

import xcnn
from xcnn import datasets, distributed
from xcnn.models import build_model

comm = distributed.resolve("auto")
data = datasets.sample()
model = build_model("seed", seed=0)  # the same seed on every rank: the same weights
optimizer = xcnn.SGD(model, 0.01)
rng = np.random.default_rng(0)  # the same shuffle order on every rank
history = xcnn.fit(
    model,
    optimizer,
    data.x_train[:2000],
    data.y_train[:2000],
    epochs=1,
    batch_size=32,  # the global batch: 16 images per rank on 2 ranks
    rng=rng,
    progress=False,
    distributed=comm,
)
if comm.is_root:
    xcnn.save(model, "mpi_seed.npz", optimizer, epoch=1, rng=rng)
    print(f"{comm.size} rank(s): train accuracy {history['train_accuracy'][-1]:.1%}")
