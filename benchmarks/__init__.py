"""Benchmark helpers: the tutorial baseline and the PyTorch reference nets."""
