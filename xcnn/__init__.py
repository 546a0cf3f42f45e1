"""xcnn: a from-scratch CNN library written once against the Python array API.

The same layers, forward and backprop run on NumPy (CPU) or CuPy (CUDA GPU),
chosen by ``backend=`` when a model is built.
"""

from . import (
    callbacks,
    datasets,
    digits,
    export,
    functional,
    io,
    models,
    normalization,
    schedules,
    testing,
    training,
)
from .backend import Backend, BackendError, resolve_backend, to_numpy
from .blocks import BatchNorm2D, Dropout, GlobalAvgPool2D, Residual
from .io import load, save
from .layers import AvgPool2D, Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, Softmax
from .losses import softmax_cross_entropy
from .model import Sequential
from .models import build_model
from .optim import SGD, Adam, AdamW, Optimizer, make_optimizer
from .training import evaluate, fit, predict

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "AvgPool2D",
    "Backend",
    "BackendError",
    "BatchNorm2D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAvgPool2D",
    "Layer",
    "MaxPool2D",
    "Optimizer",
    "ReLU",
    "Residual",
    "SGD",
    "Sequential",
    "Softmax",
    "build_model",
    "callbacks",
    "datasets",
    "digits",
    "evaluate",
    "export",
    "fit",
    "functional",
    "io",
    "load",
    "make_optimizer",
    "models",
    "normalization",
    "predict",
    "resolve_backend",
    "save",
    "schedules",
    "softmax_cross_entropy",
    "testing",
    "to_numpy",
    "training",
]
