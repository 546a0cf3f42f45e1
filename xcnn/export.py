"""Export a model for other runtimes: ONNX (graph and weights) and safetensors (weights).

ONNX (:func:`to_onnx`): the graph is built node by node from the model's own
layers with :mod:`onnx.helper`, each xcnn layer becoming documented ONNX
operators, so ONNX Runtime can check the result against xcnn:

- Conv2D: ``Conv``, with explicit ``pads`` from xcnn's own rule (for
  ``"same"`` on an input of unknown size, ``auto_pad=SAME_UPPER``: the same
  TensorFlow rule, the extra row/column at the bottom/right);
- MaxPool2D, AvgPool2D: ``MaxPool``, ``AveragePool`` with ``ceil_mode=0`` and
  no padding, so a window that does not fit is dropped, as in xcnn;
- Dense: ``Gemm`` with the weight (I, O) as stored (``transB=0``);
- ReLU, Flatten, Softmax: ``Relu``, ``Flatten(axis=1)`` (C, H, W order),
  ``Softmax(axis=-1)``;
- BatchNorm2D: ``BatchNormalization`` with the running statistics (inference);
- Dropout: ``Identity`` (evaluation mode);
- GlobalAvgPool2D: ``GlobalAveragePool`` then ``Flatten``, giving (N, C);
- Residual: the branch's and the shortcut's nodes, then ``Add``.

Interface of the exported graph (opset :data:`DEFAULT_OPSET` unless asked):

- input ``images``: float32 (N, C, H, W), pixel intensities / 255, in 0..1,
  white on black for MNIST models. The model's input scaling
  (:data:`xcnn.training.SCALES`, e.g. "centered": ``x - 0.5``) is the first
  node(s) of the graph, so callers never repeat it. N is dynamic; C, H, W
  are fixed when the model's input shape is known (``model.input_shape`` or
  ``input_shape=``), else H and W are dynamic too;
- output ``logits``: float32 (N, K), the model's output (its last layer);
- output ``probabilities``, only with ``probabilities=True``: float32 (N, K),
  the softmax of the logits.

Initializers are named as :meth:`xcnn.Sequential.state_dict` names the weights
(``"0.weight"``, ``"3.layers.1.running_mean"``); the architecture
(``model.config()``) and scaling are in the model's ``metadata_props``
(``xcnn.config``, ``xcnn.scale``, and ``xcnn.classes`` where the model has class
names). Weights are exported as float32 whatever the model's dtype.

safetensors (:func:`to_safetensors`): every tensor of
:meth:`~xcnn.Sequential.state_dict` under its key (parameters such as
``"0.weight"``, BatchNorm running statistics such as ``"2.running_mean"``), in
the model's dtype; the file's metadata holds ``format`` (``"xcnn"``),
``version``, ``config`` (``model.config()`` as JSON), ``scale`` and, where the
model has them, ``classes`` (JSON). :func:`xcnn.load` reads such a file back
(:func:`read_safetensors`).

Both writers are atomic (temporary file beside the target, fsync, rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import functional as F
from .atomic import atomic_write
from .backend import to_numpy
from .training import SCALES

__all__ = [
    "CONVERTERS",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "SAFETENSORS_FORMAT",
    "export_command",
    "export_file",
    "is_safetensors",
    "load_model",
    "onnx_graph",
    "read_safetensors",
    "read_safetensors_meta",
    "to_onnx",
    "to_safetensors",
]

#: The ONNX opset the graph is written for by default: opset 17 (ONNX 1.12, 2022) is
#: read by every ONNX Runtime since 1.12 and by the other common runtimes.
DEFAULT_OPSET = 17
#: The oldest opset accepted: 13 is where Softmax became per-axis and Gemm's bias optional.
MIN_OPSET = 13
#: The ``format`` value in the metadata of xcnn's safetensors files.
SAFETENSORS_FORMAT = "xcnn"
_SAFETENSORS_VERSION = "1"

Shape = tuple[Any, ...]  # (C, H, W) or (K,) without the batch axis; None: unknown


def _need(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(
            f"exporting needs {module.split('.')[0]}: pip install 'xcnn[export]'"
        ) from None


def _scale_of(model: Any, scale: str | None) -> str:
    scale = scale if scale is not None else getattr(model, "scale", None) or "centered"
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {sorted(SCALES)}")
    return scale


def _write_atomic(path: Path, data: bytes) -> None:
    """Through :func:`xcnn.atomic.atomic_write`: readers never see half a file, a symlink is
    written through to its target, modes follow the umask, a device is never replaced."""
    with atomic_write(path) as fh:
        fh.write(data)


# ---------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------


class _Graph:
    """Nodes and initializers being collected, with unique value names."""

    def __init__(self, helper: Any, numpy_helper: Any) -> None:
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def const(self, name: str, value: Any) -> str:
        array = np.ascontiguousarray(to_numpy(value), dtype=np.float32)
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add ``op``; its one output is named after the node."""
        self.nodes.append(self.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name


def _hw(shape: Shape) -> tuple[Any, Any]:
    return (shape[1], shape[2]) if len(shape) == 3 else (None, None)


def _out(n: Any, k: int, s: int, before: int = 0, after: int = 0) -> Any:
    return None if n is None else (n + before + after - k) // s + 1


def _conv(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    kh, kw = layer.kernel_size
    s = layer.stride
    w = layer.params["weight"]
    inputs = [x, g.const(f"{key}weight", w)]
    if "bias" in layer.params:
        inputs.append(g.const(f"{key}bias", layer.params["bias"]))
    h, wd = _hw(shape)
    attrs: dict[str, Any] = {"kernel_shape": [kh, kw], "strides": [s, s]}
    if layer.padding == "same" and (h is None or wd is None):
        attrs["auto_pad"] = "SAME_UPPER"  # TensorFlow's rule: what xcnn's "same" is
        oh, ow = None, None
    else:
        top, bottom, left, right = F.pad_amounts(h or 0, wd or 0, kh, kw, s, layer.padding)
        attrs["pads"] = [top, left, bottom, right]  # ONNX: all begins, then all ends
        oh, ow = _out(h, kh, s, top, bottom), _out(wd, kw, s, left, right)
    y = g.node("Conv", inputs, f"{key}Conv2D", **attrs)
    return y, (int(w.shape[0]), oh, ow)


def _pool(op: str) -> Callable[..., tuple[str, Shape]]:
    def convert(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
        k, s = layer.kernel_size, layer.stride
        # ceil_mode=0 and no pads: a window that does not fit is dropped, as xcnn does.
        name = f"{key}{type(layer).__name__}"
        y = g.node(op, [x], name, kernel_shape=[k, k], strides=[s, s], ceil_mode=0)
        h, w = _hw(shape)
        return y, (shape[0], _out(h, k, s), _out(w, k, s))

    return convert


def _dense(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    w = layer.params["weight"]
    inputs = [x, g.const(f"{key}weight", w)]  # (I, O): y = x @ W, so no transpose
    if "bias" in layer.params:
        inputs.append(g.const(f"{key}bias", layer.params["bias"]))
    return g.node("Gemm", inputs, f"{key}Dense"), (int(w.shape[1]),)


def _relu(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    return g.node("Relu", [x], f"{key}ReLU"), shape


def _flatten(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    size = None if any(d is None for d in shape) else int(np.prod(shape))
    return g.node("Flatten", [x], f"{key}Flatten", axis=1), (size,)


def _softmax(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    return g.node("Softmax", [x], f"{key}Softmax", axis=-1), shape


def _batch_norm(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    # Inference form: normalised with the running statistics (xcnn's eval mode).
    inputs = [
        x,
        g.const(f"{key}weight", layer.params["weight"]),
        g.const(f"{key}bias", layer.params["bias"]),
        g.const(f"{key}running_mean", layer.buffers["running_mean"]),
        g.const(f"{key}running_var", layer.buffers["running_var"]),
    ]
    y = g.node("BatchNormalization", inputs, f"{key}BatchNorm2D", epsilon=float(layer.eps))
    return y, shape


def _dropout(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    return g.node("Identity", [x], f"{key}Dropout"), shape  # evaluation: nothing dropped


def _global_avg(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    y = g.node("GlobalAveragePool", [x], f"{key}GlobalAvgPool2D")  # (N, C, 1, 1)
    return g.node("Flatten", [y], f"{key}GlobalAvgPool2D.Flatten", axis=1), (shape[0],)


def _residual(g: _Graph, layer: Any, x: str, shape: Shape, key: str) -> tuple[str, Shape]:
    y, y_shape = _sequence(g, layer.layers, x, shape, f"{key}layers.")
    s, _ = _sequence(g, layer.shortcut, x, shape, f"{key}shortcut.")  # empty: the identity
    return g.node("Add", [y, s], f"{key}Residual.Add"), y_shape


#: layer class name -> converter ``(graph, layer, input name, shape, key prefix) -> (out, shape)``.
#: Dispatch is by name, so the converters need nothing from the layer modules but the
#: documented attributes, ``params`` and ``buffers``.
CONVERTERS: dict[str, Callable[..., tuple[str, Shape]]] = {
    "Conv2D": _conv,
    "MaxPool2D": _pool("MaxPool"),
    "AvgPool2D": _pool("AveragePool"),
    "Dense": _dense,
    "ReLU": _relu,
    "Flatten": _flatten,
    "Softmax": _softmax,
    "BatchNorm2D": _batch_norm,
    "Dropout": _dropout,
    "GlobalAvgPool2D": _global_avg,
    "Residual": _residual,
}


def _sequence(g: _Graph, layers: list[Any], x: str, shape: Shape, prefix: str) -> tuple[str, Shape]:
    for i, layer in enumerate(layers):
        name = type(layer).__name__
        try:
            convert = CONVERTERS[name]
        except KeyError:
            raise ValueError(
                f"to_onnx: layer {prefix}{i} ({layer!r}) has no ONNX converter; "
                f"supported: {', '.join(sorted(CONVERTERS))}"
            ) from None
        x, shape = convert(g, layer, x, shape, f"{prefix}{i}.")
    return x, shape


def _input_shape(model: Any, input_shape: Any) -> Shape:
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is not None:
        shape = tuple(int(d) for d in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"to_onnx: input_shape must be (C, H, W), got {shape}")
        return shape
    # Unknown: the channels from the first layer that names them; H, W stay dynamic.
    layer = model.layers[0]
    while type(layer).__name__ == "Residual":
        layer = layer.layers[0]
    channels = getattr(layer, "in_channels", None) or getattr(layer, "num_features", None)
    if channels is None:
        raise ValueError("to_onnx: the model's input shape is unknown; pass input_shape=(C, H, W)")
    return (int(channels), None, None)


def onnx_graph(
    model: Any,
    *,
    probabilities: bool = False,
    opset: int = DEFAULT_OPSET,
    scale: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> Any:
    """The ONNX ``ModelProto`` of ``model`` (see the module docstring for its interface).

    Parameters are as for :func:`to_onnx`; nothing is written.
    """
    onnx = _need("onnx")
    from onnx import TensorProto, helper, numpy_helper

    if not isinstance(opset, int) or not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(
            f"to_onnx: opset must be an int from {MIN_OPSET} to "
            f"{onnx.defs.onnx_opset_version()} (this onnx), got {opset!r}"
        )
    scale = _scale_of(model, scale)
    shape = _input_shape(model, input_shape)
    g = _Graph(helper, numpy_helper)
    # The model's input scaling, on images / 255: (x - shift) / div.
    x, (shift, div) = "images", SCALES[scale]
    if shift:
        x = g.node("Sub", [x, g.const("scale.shift", np.float32(shift))], "scale.Sub")
    if div != 1.0:
        x = g.node("Div", [x, g.const("scale.div", np.float32(div))], "scale.Div")
    logits, out_shape = _sequence(g, list(model.layers), x, shape, "")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    outputs = [("logits", out_shape)]
    if probabilities:
        if len(out_shape) != 1:
            raise ValueError(
                f"to_onnx: probabilities need (N, K) logits; this model outputs "
                f"(N, {', '.join('?' if d is None else str(d) for d in out_shape)})"
            )
        g.node("Softmax", ["logits"], "probabilities", axis=-1)
        outputs.append(("probabilities", out_shape))

    def dims(s: Shape, names: tuple[str, ...]) -> list[Any]:
        return ["N", *(d if d is not None else n for d, n in zip(s, names, strict=True))]

    graph = helper.make_graph(
        g.nodes,
        "xcnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, dims(shape, ("C", "H", "W")))],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, dims(s, ("K",) * len(s)))
            for name, s in outputs
        ],
        initializer=g.initializers,
        doc_string=f"images (N, C, H, W) float32 = pixels / 255; {scale} scaling inside",
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="xcnn",
        producer_version=_version(),
        doc_string="Exported by xcnn.export.to_onnx",
    )
    # IR version: the oldest that holds this opset, so older runtimes read the file.
    proto.ir_version = helper.find_min_ir_version_for(list(proto.opset_import))
    meta = {"xcnn.config": json.dumps(model.config(), sort_keys=True), "xcnn.scale": scale}
    classes = getattr(model, "classes", None)
    if classes:
        meta["xcnn.classes"] = json.dumps(list(classes))
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _version() -> str:
    from . import __version__

    return __version__


def to_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    probabilities: bool = False,
    opset: int = DEFAULT_OPSET,
    scale: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> Path:
    """Write ``model`` as an ONNX file that ONNX Runtime runs with xcnn's results.

    Parameters
    ----------
    model : Sequential
        Any backend; weights are copied to the host. Evaluation-mode semantics
        (BatchNorm's running statistics, no dropout).
    path : path-like
        Written atomically, exactly as given (``.onnx`` is conventional).
    probabilities : bool
        Also output ``probabilities``, the softmax of ``logits``.
    opset : int
        ONNX opset, from :data:`MIN_OPSET` to what the installed onnx knows;
        default :data:`DEFAULT_OPSET` (17).
    scale : str, optional
        Input scaling put inside the graph (:data:`xcnn.training.SCALES`);
        default ``model.scale``, else "centered".
    input_shape : (C, H, W), optional
        Default ``model.input_shape``; when neither is known, ``H, W`` are dynamic.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        A layer without a converter, an unknown scale, a bad opset or input shape.
    ImportError
        onnx is not installed (``pip install 'xcnn[export]'``).

    Examples
    --------
    >>> import numpy as np, onnxruntime as ort, xcnn
    >>> from xcnn.export import to_onnx
    >>> model = xcnn.build_model("seed")
    >>> path = to_onnx(model, "seed.onnx", probabilities=True)
    >>> session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    >>> images = np.zeros((2, 1, 28, 28), np.float32)  # pixels / 255
    >>> logits, probs = session.run(None, {"images": images})
    >>> logits.shape, probs.shape
    ((2, 10), (2, 10))
    """
    proto = onnx_graph(
        model, probabilities=probabilities, opset=opset, scale=scale, input_shape=input_shape
    )
    path = Path(path)
    _write_atomic(path, proto.SerializeToString())
    return path


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


def to_safetensors(model: Any, path: str | os.PathLike[str], *, scale: str | None = None) -> Path:
    """Write every weight and running statistic of ``model``, and its architecture, to ``path``.

    Tensors are :meth:`~xcnn.Sequential.state_dict` under its keys, in the
    model's dtype; metadata ``format="xcnn"``, ``version``, ``config`` (JSON),
    ``scale`` and ``classes`` (JSON, where the model has names). Written atomically.

    Parameters
    ----------
    model : Sequential
    path : path-like
        ``.safetensors`` is conventional; :func:`xcnn.load` reads it back.
    scale : str, optional
        The input scaling recorded; default ``model.scale``, else "centered".

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> import xcnn
    >>> from safetensors.numpy import load_file
    >>> model = xcnn.build_model("seed")
    >>> path = xcnn.export.to_safetensors(model, "seed.safetensors")
    >>> sorted(load_file(path))
    ['0.weight', '3.bias', '3.weight']
    >>> xcnn.load(path).num_params()
    13602
    """
    st = _need("safetensors.numpy")
    tensors = {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    meta = {
        "format": SAFETENSORS_FORMAT,
        "version": _SAFETENSORS_VERSION,
        "config": json.dumps(model.config(), sort_keys=True),
        "scale": _scale_of(model, scale),
    }
    classes = getattr(model, "classes", None)
    if classes:
        meta["classes"] = json.dumps(list(classes))
    path = Path(path)
    _write_atomic(path, st.save(tensors, metadata=meta))
    return path


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a safetensors file: a little-endian u64 header size, then ``{``.

    Checked by content, not by name (a checkpoint is a zip and starts with ``PK``).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= os.path.getsize(path) - 8


def read_safetensors_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of an xcnn safetensors file, decoded: config, scale, classes."""
    safetensors = _need("safetensors")
    try:
        with safetensors.safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
    except (OSError, ValueError, safetensors.SafetensorError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise ValueError(
            f"{path}: a safetensors file, but not one written by xcnn (no format=xcnn metadata)"
        )
    if meta.get("version") != _SAFETENSORS_VERSION:
        raise ValueError(
            f"{path}: xcnn safetensors version {meta.get('version')!r} is not supported "
            f"(this xcnn reads {_SAFETENSORS_VERSION})"
        )
    try:
        config = json.loads(meta["config"])
        classes = json.loads(meta["classes"]) if "classes" in meta else None
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: invalid xcnn metadata in safetensors file ({e})") from None
    return {"config": config, "scale": meta.get("scale", "centered"), "classes": classes}


def read_safetensors(
    path: str | os.PathLike[str], *, backend: Any = "numpy", device: Any = None
) -> Any:
    """Rebuild the model saved by :func:`to_safetensors`, on ``backend``.

    Raises
    ------
    FileNotFoundError
    ValueError
        Not an xcnn safetensors file, or weights that do not fit its architecture
        (the message names the file).
    """
    from safetensors.numpy import load_file

    from .layers import layer_from_config
    from .model import Sequential

    info = read_safetensors_meta(path)
    config = info["config"]
    try:
        for cfg in config["layers"]:
            layer_from_config(cfg)  # validate before building anything on a device
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid model description in safetensors file ({e})") from None
    model = Sequential.from_config(config, backend=backend, device=device)
    try:
        model.load_state_dict(load_file(str(path)))
    except ValueError as e:
        raise ValueError(f"{path}: weights do not fit the saved architecture ({e})") from None
    return model


# ---------------------------------------------------------------------------
# Files in, files out (the CLI's ``xcnn export`` and ``xcnn serve``)
# ---------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike[str], *, backend: Any = "numpy", device: Any = None
) -> tuple[Any, str]:
    """A model from a checkpoint or an xcnn safetensors file, and its input scaling.

    The scaling is what the file recorded (a checkpoint's ``extra["scale"]``,
    written by ``xcnn train``; the safetensors metadata), else ``model.scale``
    where models carry it, else "centered".
    """
    from . import io

    if is_safetensors(path):
        model = read_safetensors(path, backend=backend, device=device)
        recorded = read_safetensors_meta(path)["scale"]
    else:
        ck = io.load_checkpoint(path, backend=backend, device=device)
        model, recorded = ck.model, ck.extra.get("scale")
    return model, _scale_of(model, recorded)


def export_file(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    format: str,
    probabilities: bool = False,
    opset: int | None = None,
) -> Path:
    """``xcnn export``: read ``checkpoint`` (or a safetensors file), write ``output``.

    Parameters
    ----------
    checkpoint : path-like
    output : path-like
    format : {"onnx", "safetensors"}
    probabilities, opset
        ONNX only (see :func:`to_onnx`); ``opset=None`` is :data:`DEFAULT_OPSET`.
    """
    if format not in ("onnx", "safetensors"):
        raise ValueError(f"unknown export format {format!r}: choose onnx or safetensors")
    if format == "safetensors" and (probabilities or opset is not None):
        raise ValueError("--probabilities and --opset apply to --format onnx only")
    if not Path(output).resolve().parent.is_dir():
        raise FileNotFoundError(2, "No such directory", str(Path(output).parent))
    model, scale = load_model(checkpoint)
    if format == "onnx":
        opset = DEFAULT_OPSET if opset is None else opset
        return to_onnx(model, output, probabilities=probabilities, opset=opset, scale=scale)
    return to_safetensors(model, output, scale=scale)


def export_command(
    checkpoint: str, output: str, *, format: str, probabilities: bool, opset: int | None
) -> int:
    """``xcnn export``: :func:`export_file`, then say what was written; returns 0."""
    path = export_file(checkpoint, output, format=format, probabilities=probabilities, opset=opset)
    print(f"wrote {path} ({format}, {path.stat().st_size:,} bytes)")
    return 0
