"""Run by tests/test_distributed.py under ``mpiexec -n N`` (and as one process).

``python tests/distributed_worker.py MODE DISTRIBUTED OUT [N B]``:

- ``train``: one epoch of SGD on the first N embedded-sample images with global
  batch B; rank 0 writes the weights and the history to OUT (.npz).
- ``raise`` / ``kill``: rank 0 saves a checkpoint to OUT after every epoch; at
  the end of epoch 2 rank 1 raises (or kills itself with SIGKILL).
- ``drift``: rank 1 changes a weight after epoch 1, outside fit.
- ``staging``: all-reduce an array_api_strict array (not NumPy: through the host).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

import xcnn
from xcnn import datasets, distributed
from xcnn.models import build_model


def main() -> None:
    mode, dist, out = sys.argv[1:4]
    n, batch = (int(v) for v in sys.argv[4:6]) if len(sys.argv) > 4 else (500, 25)
    comm = distributed.resolve(dist)
    if mode == "staging":  # a non-NumPy array goes through the host and comes back
        import array_api_strict as xp

        buf = xp.asarray(
            [1.0, 2.0, float(comm.rank)], dtype=xp.float32, device=xp.Device("device1")
        )
        total = comm.allreduce_sum(buf)
        assert type(total) is type(buf) and total.device == buf.device, (type(total), total.device)
        expected = [comm.size, 2.0 * comm.size, sum(range(comm.size))]
        assert xp.all(total == xp.asarray(expected, dtype=xp.float32, device=buf.device))
        print(f"rank {comm.rank} ok", flush=True)
        return
    data = datasets.sample()
    model = build_model("seed", seed=0)
    optimizer = xcnn.SGD(model, 0.01)
    rng = np.random.default_rng(0)

    def callback(epoch: int, logs: dict) -> None:
        if mode in ("raise", "kill") and comm.is_root:
            xcnn.save(model, out, optimizer, epoch=epoch, rng=rng)
        if comm.rank == 1 and epoch == 2 and mode == "raise":
            raise RuntimeError("simulated failure on rank 1")
        if comm.rank == 1 and epoch == 2 and mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if comm.rank == 1 and epoch == 1 and mode == "drift":
            layer = model.layers[-1]
            layer.params["bias"] = layer.params["bias"] + 1e-3

    history = xcnn.fit(
        model,
        optimizer,
        data.x_train[:n],
        data.y_train[:n],
        epochs=1 if mode == "train" else 50,
        batch_size=batch,
        validation_data=(data.x_test[:301], data.y_test[:301]),
        rng=rng,
        progress=False,
        callback=callback,
        distributed=comm,
    )
    if comm.is_root and mode == "train":
        np.savez(out, history=np.array(json.dumps(history)), **model.state_dict())


if __name__ == "__main__":
    main()
