"""``xcnn serve``: a page to draw a digit on, and the JSON API behind it.

The server is the standard library's :class:`http.server.ThreadingHTTPServer`:
no dependency to install or keep up to date, one thread per connection so a
slow client never blocks the page, and plenty for a local demo (it is not a
production server: no TLS, no authentication; it binds 127.0.0.1 unless told
otherwise).

Routes:

- ``GET /``: the page (``xcnn/static/serve.html``, one file, no external
  downloads): a 280 px canvas for mouse, pen and touch (pointer events), live
  top-3 probabilities while drawing, the first conv layer's feature maps, the
  28x28 image the model sees, a clear button and an invert switch.
- ``GET /api/model``: the layers, ``input_shape``, ``scale`` and ``classes``.
- ``POST /api/predict``: body ``{"image": [[...], ...]}``, rows of floats 0..1,
  white digit on black, any size up to :data:`MAX_SIDE` a side (Content-Type
  ``application/json``, at most :data:`MAX_BODY` bytes). The server frames it
  as MNIST was made (:func:`xcnn.digits.center_digit`) for a 28x28
  single-channel model, or resizes it to the model's input otherwise. The
  reply has ``class`` (k), ``probabilities`` (K floats), ``input`` (the
  prepared image, rows of floats), ``feature_maps`` (the first Conv2D's
  output, F maps of OH rows of OW floats; empty without a Conv2D) and, where
  the model has class names, ``classes``. A malformed request gets a 4xx
  reply ``{"error": "..."}`` (400 bad JSON, shape or values; 404; 405; 411;
  413 too large; 415 not JSON) and the server goes on serving.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import numpy as np

from .backend import to_numpy
from .digits import center_digit, resize
from .training import SCALES

__all__ = [
    "MAX_BODY",
    "MAX_SIDE",
    "Predictor",
    "RequestError",
    "make_server",
    "parse_request",
    "serve",
    "serve_file",
]

#: Largest request body accepted, in bytes (a 1024x1024 image as JSON is about 5 MB).
MAX_BODY = 8 * 1024 * 1024
#: Largest image side accepted, in pixels.
MAX_SIDE = 2048


class RequestError(ValueError):
    """A request the API refuses: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reject_constant(name: str) -> Any:
    raise RequestError(400, f"image values must be finite numbers, got {name}")


def parse_request(body: bytes) -> np.ndarray:
    """The ``image`` of a ``/api/predict`` body, checked: float64 (H, W) in 0..1.

    Raises
    ------
    RequestError
        400 with a message saying what is wrong (JSON, shape, type, NaN, range, size).
    """
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RequestError(400, f"body is not valid JSON ({e})") from None
    if not isinstance(data, dict) or "image" not in data:
        raise RequestError(400, 'expected a JSON object {"image": [[...], ...]}')
    image = data["image"]
    if not isinstance(image, list) or not image or not all(isinstance(r, list) for r in image):
        raise RequestError(400, "image must be a non-empty list of rows (lists of numbers)")
    try:
        a = np.array(image)
    except ValueError:  # ragged rows
        raise RequestError(400, "image rows must all have the same length") from None
    if a.ndim != 2 or 0 in a.shape:
        raise RequestError(400, f"image must be 2-D rows of numbers, got shape {list(a.shape)}")
    if a.dtype.kind not in "iuf":  # strings, null, booleans, nested lists
        raise RequestError(400, "image values must be numbers")
    if max(a.shape) > MAX_SIDE:
        raise RequestError(400, f"image is {a.shape[0]}x{a.shape[1]}; at most {MAX_SIDE} a side")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise RequestError(400, "image values must be finite numbers (NaN or infinity found)")
    if a.min() < 0 or a.max() > 1:
        raise RequestError(
            400, f"image values must be in 0..1 (white on black), got {a.min():g}..{a.max():g}"
        )
    return a


def _first_layer(model: Any) -> Any:
    layer = model.layers[0]
    while type(layer).__name__ == "Residual":
        layer = layer.layers[0]
    return layer


class Predictor:
    """A model with what the server needs: preparation, one locked forward, the reply.

    Parameters
    ----------
    model : Sequential
    scale : str
        The model's input scaling (:data:`xcnn.training.SCALES`); default
        ``model.scale``, else "centered".
    input_shape : (C, H, W), optional
        Default ``model.input_shape``, else the first layer's channels by 28x28.
    """

    def __init__(
        self, model: Any, *, scale: str | None = None, input_shape: tuple[int, ...] | None = None
    ) -> None:
        self.model = model
        self.scale = scale or getattr(model, "scale", None) or "centered"
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}: choose one of {sorted(SCALES)}")
        shape = input_shape or getattr(model, "input_shape", None)
        if shape is None:
            first = _first_layer(model)
            channels = getattr(first, "in_channels", None) or getattr(first, "num_features", 1)
            shape = (int(channels), 28, 28)
        self.input_shape = tuple(int(d) for d in shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"serve: needs a model of images (C, H, W), got {self.input_shape}")
        self.classes = getattr(model, "classes", None)
        self.conv = next(
            (i for i, lay in enumerate(model.layers) if type(lay).__name__ == "Conv2D"), None
        )
        # Layers keep a per-call cache: one forward at a time.
        self._lock = threading.Lock()
        try:
            probs = self.predict(np.zeros(self.input_shape[1:]))["probabilities"]
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"serve: the model does not take images {self.input_shape} ({e})"
            ) from None
        if self.classes is not None and len(self.classes) != len(probs):
            raise ValueError(f"serve: {len(self.classes)} class names for {len(probs)} outputs")

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """White-on-black (H, W) 0..1 -> the model's (C, H, W) input, before scaling."""
        c, h, w = self.input_shape
        if (c, h, w) == (1, 28, 28):
            framed = center_digit(image)  # as MNIST's digits were made
        else:
            framed = np.clip(resize(image, h, w), 0.0, 1.0).astype(np.float32)
        return np.broadcast_to(framed, (c, h, w))

    def predict(self, image: np.ndarray) -> dict[str, Any]:
        """The API's reply for a checked image (see the module docstring)."""
        x = self.prepare(image)
        shift, div = SCALES[self.scale]
        batch = ((x[None] - shift) / div).astype(np.float32)  # (1, C, H, W)
        model = self.model
        maps = None
        with self._lock, model.backend.activate():
            y = model.asarray(batch)
            for i, layer in enumerate(model.layers):
                y = layer.forward(y, train=False)
                if i == self.conv:
                    maps = to_numpy(y)[0]  # (F, OH, OW)
            logits = to_numpy(y).astype(np.float64).reshape(-1)
        e = np.exp(logits - logits.max())
        probs = e / e.sum()
        reply: dict[str, Any] = {
            "class": int(np.argmax(probs)),
            "probabilities": np.round(probs, 6).tolist(),
            "input": np.round(x[0].astype(np.float64), 3).tolist(),
            "feature_maps": [] if maps is None else np.round(maps.astype(np.float64), 4).tolist(),
        }
        if self.classes is not None:
            reply["classes"] = list(self.classes)
        return reply

    def info(self) -> dict[str, Any]:
        return {
            "layers": [repr(layer) for layer in self.model.layers],
            "input_shape": list(self.input_shape),
            "scale": self.scale,
            "classes": self.classes,
        }


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: the page sends many small requests
    server_version = "xcnn-serve"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: a drawing sends several requests a second

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if close:  # the body was not read: the connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", close)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._json(status, {"error": message}, close)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/model":
            self._json(200, self.server.predictor.info())
        elif path == "/api/predict":
            self._error(405, 'use POST with a JSON body {"image": [[...]]}')
        else:
            self._error(404, f"no such page: {path}")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/api/predict":
            self._error(404, f"no such endpoint: {self.path}", close=True)
            return
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        length = self.headers.get("Content-Length")
        if kind != "application/json":
            self._error(415, f"Content-Type must be application/json, got {kind or 'none'}", True)
        elif length is None:
            self._error(411, "Content-Length is required", close=True)
        elif not length.isdigit():
            self._error(400, f"bad Content-Length {length!r}", close=True)
        elif int(length) > MAX_BODY:
            self._error(413, f"body of {int(length):,} bytes is over {MAX_BODY:,}", close=True)
        else:
            try:
                image = parse_request(self.rfile.read(int(length)))
                self._json(200, self.server.predictor.predict(image))
            except RequestError as e:
                self._error(e.status, str(e))
            except Exception as e:  # a bug must not stop the server: report it, go on
                self._error(500, f"internal error: {type(e).__name__}: {e}")

    def do_PUT(self) -> None:
        self._error(405, "only GET and POST", close=True)

    do_DELETE = do_PATCH = do_PUT


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an open keep-alive connection never delays stopping
    predictor: Predictor
    page: bytes


def make_server(
    model: Any, *, host: str = "127.0.0.1", port: int = 8000, scale: str | None = None
) -> ThreadingHTTPServer:
    """A server for ``model``, bound but not yet serving (``port=0``: any free port).

    Call ``serve_forever()`` on it (in a thread for tests), ``shutdown()`` and
    ``server_close()`` to stop; ``server.server_port`` is the bound port.
    """
    predictor = Predictor(model, scale=scale)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    cls = type("_Server", (_Server,), {"address_family": family})
    server = cls((host, port), _Handler)
    server.predictor = predictor
    server.page = (resources.files("xcnn") / "static" / "serve.html").read_bytes()
    return server


def _url(server: ThreadingHTTPServer) -> str:
    host = server.server_address[0]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{server.server_port}/"


class _Stop(Exception):
    """Raised by the SIGINT/SIGTERM handler to leave ``serve_forever`` in the main thread."""


def serve(
    model: Any, *, host: str = "127.0.0.1", port: int = 8000, scale: str | None = None
) -> None:
    """Serve the drawing page for ``model`` until Ctrl-C (SIGINT) or SIGTERM; print its URL."""
    server = make_server(model, host=host, port=port, scale=scale)
    main = threading.current_thread() is threading.main_thread()
    previous: dict[int, Any] = {}
    if main:  # signal handlers can only be set in the main thread

        def stop(signum: int, frame: Any) -> None:
            raise _Stop

        # SIGINT too: a shell starting the server in the background ignores it otherwise.
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: bound to {host}: other machines may reach this server", flush=True)
    print(f"serving on {_url(server)} (press Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)


def serve_file(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000) -> int:
    """``xcnn serve``: load a checkpoint (or xcnn safetensors file) and :func:`serve` it."""
    from .export import load_model

    model, scale = load_model(checkpoint)
    serve(model, host=host, port=port, scale=scale)
    return 0
