"""xcnn: a from-scratch CNN library written once against the Python array API.

The same layers, forward and backprop run on NumPy (CPU) or CuPy (CUDA GPU),
chosen by ``backend=`` when a model is built.
"""

from . import datasets, digits, export, functional, io, models, testing, training
from .backend import Backend, BackendError, resolve_backend, to_numpy
from .io import load, save
from .layers import AvgPool2D, Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, Softmax
from .losses import softmax_cross_entropy
from .model import Sequential
from .models import build_model
from .optim import SGD, Adam, Optimizer, make_optimizer
from .training import evaluate, fit, predict

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AvgPool2D",
    "Backend",
    "BackendError",
    "Conv2D",
    "Dense",
    "Flatten",
    "Layer",
    "MaxPool2D",
    "Optimizer",
    "ReLU",
    "SGD",
    "Sequential",
    "Softmax",
    "build_model",
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
    "predict",
    "resolve_backend",
    "save",
    "softmax_cross_entropy",
    "testing",
    "to_numpy",
    "training",
]
