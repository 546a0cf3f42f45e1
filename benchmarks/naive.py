"""The classic from-scratch tutorial CNN, written faithfully as a speed baseline.

This module reimplements, with the same algorithm and the same loops, the pure-NumPy
network of Victor Zhou's tutorial "CNNs, Part 1: An Introduction to Convolutional
Neural Networks" / "CNNs, Part 2: Training a Convolutional Neural Network":
``Conv3x3(8) -> MaxPool2 -> Softmax(13 * 13 * 8, 10)`` trained by plain SGD, one
28x28 image at a time, with Python loops over every 3x3 (convolution) and 2x2
(pooling) region.

It is the baseline for the claim "seed net training >= 300x the tutorial's loop
implementation": xcnn's ``seed`` net (``Conv2D(1, 8, 3) -> MaxPool2D(2) -> Flatten
-> Dense(1352, 10)``) is the same model, so images/s of :meth:`NaiveNet.train_step`
against images/s of an xcnn training step is a like-for-like comparison.

It is intentionally slow: do not vectorise it, "fix" its numerics (e.g. the softmax
has no max-subtraction, the max-pool backward routes the gradient to *every* pixel
equal to the maximum, the first layer has no bias) or otherwise improve it, or the
baseline stops being the tutorial's.

:meth:`NaiveNet.set_weights` accepts weights in xcnn's layout, so both
implementations can be started from the same parameters.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["Conv3x3", "MaxPool2", "NaiveNet", "Softmax"]


class Conv3x3:
    """A convolution layer of ``num_filters`` 3x3 filters, no bias, "valid" padding.

    Parameters
    ----------
    num_filters : int
        Number of filters (output channels). The input has a single channel.
    rng : numpy.random.Generator, optional
        Source of the initial weights (a fresh unseeded generator if omitted).

    Attributes
    ----------
    filters : numpy.ndarray
        ``(num_filters, 3, 3)`` float64, initialised as ``randn(num_filters, 3, 3) / 9``.
    last_d_L_d_filters : numpy.ndarray or None
        The filter gradient computed by the latest :meth:`backprop` (kept for tests).
    """

    def __init__(self, num_filters: int, rng: np.random.Generator | None = None) -> None:
        rng = np.random.default_rng() if rng is None else rng
        self.num_filters = num_filters
        # Divide by 9 to reduce the variance of the initial values.
        self.filters = rng.standard_normal((num_filters, 3, 3)) / 9  # (F, 3, 3)
        self.last_input: np.ndarray | None = None
        self.last_d_L_d_filters: np.ndarray | None = None

    def iterate_regions(self, image: np.ndarray) -> Iterator[tuple[np.ndarray, int, int]]:
        """Yield every 3x3 region of a 2-D image, "valid" padding.

        Parameters
        ----------
        image : numpy.ndarray
            ``(h, w)`` image.

        Yields
        ------
        im_region : numpy.ndarray
            ``(3, 3)`` view ``image[i:i + 3, j:j + 3]``.
        i, j : int
            Top-left corner of the region.
        """
        h, w = image.shape
        for i in range(h - 2):
            for j in range(w - 2):
                im_region = image[i : (i + 3), j : (j + 3)]  # (3, 3)
                yield im_region, i, j

    def forward(self, input: np.ndarray) -> np.ndarray:
        """Convolve (cross-correlate) the image with every filter.

        Parameters
        ----------
        input : numpy.ndarray
            ``(h, w)`` image.

        Returns
        -------
        numpy.ndarray
            ``(h - 2, w - 2, num_filters)`` feature maps.
        """
        self.last_input = input
        h, w = input.shape
        output = np.zeros((h - 2, w - 2, self.num_filters))  # (h-2, w-2, F)
        for im_region, i, j in self.iterate_regions(input):
            # (3, 3) * (F, 3, 3) -> (F, 3, 3) -> sum -> (F,)
            output[i, j] = np.sum(im_region * self.filters, axis=(1, 2))
        return output

    def backprop(self, d_L_d_out: np.ndarray, learn_rate: float) -> None:
        """Compute the filter gradient and take one SGD step.

        Parameters
        ----------
        d_L_d_out : numpy.ndarray
            ``(h - 2, w - 2, num_filters)`` loss gradient of this layer's output.
        learn_rate : float
            SGD learning rate.

        Returns
        -------
        None
            This is the first layer: no input gradient is needed.
        """
        assert self.last_input is not None, "forward() must be called before backprop()"
        d_L_d_filters = np.zeros(self.filters.shape)  # (F, 3, 3)
        for im_region, i, j in self.iterate_regions(self.last_input):
            for f in range(self.num_filters):
                d_L_d_filters[f] += d_L_d_out[i, j, f] * im_region
        self.last_d_L_d_filters = d_L_d_filters
        self.filters -= learn_rate * d_L_d_filters
        return None


class MaxPool2:
    """A 2x2 max-pooling layer with stride 2 (odd trailing rows/columns dropped).

    Attributes
    ----------
    last_input : numpy.ndarray or None
        ``(h, w, num_filters)`` input cached by :meth:`forward`.
    """

    def __init__(self) -> None:
        self.last_input: np.ndarray | None = None

    def iterate_regions(self, image: np.ndarray) -> Iterator[tuple[np.ndarray, int, int]]:
        """Yield every non-overlapping 2x2 region.

        Parameters
        ----------
        image : numpy.ndarray
            ``(h, w, num_filters)`` feature maps.

        Yields
        ------
        im_region : numpy.ndarray
            ``(2, 2, num_filters)`` view.
        i, j : int
            Position of the region in the pooled output.
        """
        h, w, _ = image.shape
        new_h = h // 2
        new_w = w // 2
        for i in range(new_h):
            for j in range(new_w):
                im_region = image[(i * 2) : (i * 2 + 2), (j * 2) : (j * 2 + 2)]  # (2, 2, F)
                yield im_region, i, j

    def forward(self, input: np.ndarray) -> np.ndarray:
        """Max-pool each 2x2 region.

        Parameters
        ----------
        input : numpy.ndarray
            ``(h, w, num_filters)`` feature maps.

        Returns
        -------
        numpy.ndarray
            ``(h // 2, w // 2, num_filters)``.
        """
        self.last_input = input
        h, w, num_filters = input.shape
        output = np.zeros((h // 2, w // 2, num_filters))  # (h/2, w/2, F)
        for im_region, i, j in self.iterate_regions(input):
            output[i, j] = np.amax(im_region, axis=(0, 1))  # (F,)
        return output

    def backprop(self, d_L_d_out: np.ndarray) -> np.ndarray:
        """Route the gradient to the maximum pixel(s) of each region.

        As in the tutorial, every pixel equal to its region's maximum receives the
        full gradient (ties are not split).

        Parameters
        ----------
        d_L_d_out : numpy.ndarray
            ``(h // 2, w // 2, num_filters)`` loss gradient of the output.

        Returns
        -------
        numpy.ndarray
            ``(h, w, num_filters)`` loss gradient of the input.
        """
        assert self.last_input is not None, "forward() must be called before backprop()"
        d_L_d_input = np.zeros(self.last_input.shape)  # (h, w, F)
        for im_region, i, j in self.iterate_regions(self.last_input):
            h, w, f = im_region.shape
            amax = np.amax(im_region, axis=(0, 1))  # (F,)
            for i2 in range(h):
                for j2 in range(w):
                    for f2 in range(f):
                        # If this pixel was the max value, copy the gradient to it.
                        if im_region[i2, j2, f2] == amax[f2]:
                            d_L_d_input[i * 2 + i2, j * 2 + j2, f2] = d_L_d_out[i, j, f2]
        return d_L_d_input


class Softmax:
    """A fully connected layer followed by softmax.

    Parameters
    ----------
    input_len : int
        Number of inputs (after flattening).
    nodes : int
        Number of outputs (classes).
    rng : numpy.random.Generator, optional
        Source of the initial weights (a fresh unseeded generator if omitted).

    Attributes
    ----------
    weights : numpy.ndarray
        ``(input_len, nodes)``, initialised as ``randn(input_len, nodes) / input_len``.
        Rows follow the tutorial's ``(h, w, c)`` flattening order.
    biases : numpy.ndarray
        ``(nodes,)``, initialised to zero.
    """

    def __init__(self, input_len: int, nodes: int, rng: np.random.Generator | None = None) -> None:
        rng = np.random.default_rng() if rng is None else rng
        # Divide by input_len to reduce the variance of the initial values.
        self.weights = rng.standard_normal((input_len, nodes)) / input_len  # (D, K)
        self.biases = np.zeros(nodes)  # (K,)
        self.last_input_shape: tuple[int, ...] | None = None
        self.last_input: np.ndarray | None = None
        self.last_totals: np.ndarray | None = None

    def forward(self, input: np.ndarray) -> np.ndarray:
        """Flatten, apply the affine map and the softmax.

        Parameters
        ----------
        input : numpy.ndarray
            Any shape with ``input_len`` elements, e.g. ``(13, 13, 8)``.

        Returns
        -------
        numpy.ndarray
            ``(nodes,)`` class probabilities.
        """
        self.last_input_shape = input.shape
        input = input.flatten()  # (D,) in (h, w, c) order
        self.last_input = input
        totals = np.dot(input, self.weights) + self.biases  # (K,)
        self.last_totals = totals
        exp = np.exp(totals)
        return exp / np.sum(exp, axis=0)

    def backprop(self, d_L_d_out: np.ndarray, learn_rate: float) -> np.ndarray | None:
        """Backpropagate the gradient of the probabilities and take one SGD step.

        Parameters
        ----------
        d_L_d_out : numpy.ndarray
            ``(nodes,)`` loss gradient of the probabilities; for cross-entropy only
            the correct class's entry is nonzero.
        learn_rate : float
            SGD learning rate.

        Returns
        -------
        numpy.ndarray or None
            Loss gradient of the input, reshaped to the cached input shape
            (``None`` only if ``d_L_d_out`` is all zero).
        """
        assert self.last_totals is not None and self.last_input is not None
        assert self.last_input_shape is not None
        # We know only 1 element of d_L_d_out will be nonzero.
        for i, gradient in enumerate(d_L_d_out):
            if gradient == 0:
                continue

            # e^totals
            t_exp = np.exp(self.last_totals)  # (K,)
            # Sum of all e^totals
            S = np.sum(t_exp)

            # Gradients of out[i] against totals
            d_out_d_t = -t_exp[i] * t_exp / (S**2)  # (K,)
            d_out_d_t[i] = t_exp[i] * (S - t_exp[i]) / (S**2)

            # Gradients of totals against weights/biases/input
            d_t_d_w = self.last_input  # (D,)
            d_t_d_b = 1
            d_t_d_inputs = self.weights  # (D, K)

            # Gradients of loss against totals
            d_L_d_t = gradient * d_out_d_t  # (K,)

            # Gradients of loss against weights/biases/input
            d_L_d_w = d_t_d_w[np.newaxis].T @ d_L_d_t[np.newaxis]  # (D, 1) @ (1, K)
            d_L_d_b = d_L_d_t * d_t_d_b  # (K,)
            d_L_d_inputs = d_t_d_inputs @ d_L_d_t  # (D,)

            # Update weights / biases
            self.weights -= learn_rate * d_L_d_w
            self.biases -= learn_rate * d_L_d_b

            return d_L_d_inputs.reshape(self.last_input_shape)
        return None


class NaiveNet:
    """The tutorial's network: ``Conv3x3(8) -> MaxPool2 -> Softmax(13 * 13 * 8, 10)``.

    Parameters
    ----------
    seed : int, default 0
        Seed of the generator drawing the initial weights.

    Attributes
    ----------
    conv : Conv3x3
    pool : MaxPool2
    softmax : Softmax

    Examples
    --------
    >>> net = NaiveNet(seed=0)
    >>> image = np.zeros((28, 28))
    >>> loss, acc = net.train_step(image, 3)
    """

    num_filters = 8
    num_classes = 10
    pooled_hw = 13  # 28 -> conv -> 26 -> pool -> 13

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.conv = Conv3x3(self.num_filters, rng)  # 28x28x1 -> 26x26x8
        self.pool = MaxPool2()  # 26x26x8 -> 13x13x8
        self.softmax = Softmax(
            self.pooled_hw * self.pooled_hw * self.num_filters, self.num_classes, rng
        )  # 13x13x8 -> 10

    def forward(self, image: np.ndarray, label: int) -> tuple[np.ndarray, float, int]:
        """Run the forward pass on one image and compute loss and accuracy.

        Parameters
        ----------
        image : numpy.ndarray
            ``(28, 28)`` raw pixels in ``[0, 255]``; normalised here to
            ``image / 255 - 0.5`` as in the tutorial.
        label : int
            Correct class.

        Returns
        -------
        out : numpy.ndarray
            ``(10,)`` class probabilities.
        loss : float
            Cross-entropy ``-log(out[label])``.
        acc : int
            1 if the prediction is correct, else 0.
        """
        # Transform the image from [0, 255] to [-0.5, 0.5] to make it easier to work with.
        out = self.conv.forward((image / 255) - 0.5)  # (26, 26, 8)
        out = self.pool.forward(out)  # (13, 13, 8)
        out = self.softmax.forward(out)  # (10,)

        # Calculate cross-entropy loss and accuracy.
        loss = float(-np.log(out[label]))
        acc = 1 if np.argmax(out) == label else 0
        return out, loss, acc

    def train_step(self, image: np.ndarray, label: int, lr: float = 0.005) -> tuple[float, int]:
        """Complete one SGD training step on one image.

        Parameters
        ----------
        image : numpy.ndarray
            ``(28, 28)`` raw pixels in ``[0, 255]``.
        label : int
            Correct class.
        lr : float, default 0.005
            Learning rate (the tutorial's value).

        Returns
        -------
        loss : float
            Loss *before* the update.
        acc : int
            Accuracy (0 or 1) before the update.
        """
        out, loss, acc = self.forward(image, label)

        # Calculate initial gradient
        gradient = np.zeros(self.num_classes)  # (10,)
        gradient[label] = -1 / out[label]

        # Backprop
        gradient = self.softmax.backprop(gradient, lr)  # (13, 13, 8)
        gradient = self.pool.backprop(gradient)  # (26, 26, 8)
        self.conv.backprop(gradient, lr)
        return loss, acc

    def set_weights(
        self,
        conv_w: np.ndarray,
        dense_w: np.ndarray,
        dense_b: np.ndarray,
        conv_b: np.ndarray | None = None,
    ) -> None:
        """Load weights given in xcnn's layout (copied, converted to float64).

        Parameters
        ----------
        conv_w : numpy.ndarray
            ``(8, 1, 3, 3)`` xcnn ``Conv2D`` weight ``(out_ch, in_ch, kh, kw)``.
        dense_w : numpy.ndarray
            ``(1352, 10)`` xcnn ``Dense`` weight ``(in_features, out_features)``
            whose rows follow xcnn's ``Flatten`` order ``(C, H, W)`` = ``(8, 13, 13)``.
            The tutorial flattens ``(13, 13, 8)`` in ``(H, W, C)`` order, so the rows
            are permuted accordingly.
        dense_b : numpy.ndarray
            ``(10,)`` xcnn ``Dense`` bias.
        conv_b : numpy.ndarray, optional
            ``(8,)`` xcnn ``Conv2D`` bias. The tutorial's convolution has no bias, so
            only ``None`` or an all-zero bias is accepted.

        Raises
        ------
        ValueError
            On a wrong shape or a nonzero ``conv_b``.
        """
        nf, hw, k = self.num_filters, self.pooled_hw, self.num_classes
        conv_w = np.asarray(conv_w)
        dense_w = np.asarray(dense_w)
        dense_b = np.asarray(dense_b)
        if conv_w.shape != (nf, 1, 3, 3):
            raise ValueError(f"conv_w must have shape {(nf, 1, 3, 3)}, got {conv_w.shape}")
        if dense_w.shape != (nf * hw * hw, k):
            raise ValueError(f"dense_w must have shape {(nf * hw * hw, k)}, got {dense_w.shape}")
        if dense_b.shape != (k,):
            raise ValueError(f"dense_b must have shape {(k,)}, got {dense_b.shape}")
        if conv_b is not None and np.any(np.asarray(conv_b) != 0):
            raise ValueError("the tutorial's Conv3x3 has no bias: conv_b must be None or zero")

        self.conv.filters = np.array(conv_w[:, 0], dtype=np.float64)  # (8, 3, 3)
        # (C*H*W, K) -> (C, H, W, K) -> (H, W, C, K) -> (H*W*C, K)
        w_hwc = dense_w.reshape(nf, hw, hw, k).transpose(1, 2, 0, 3).reshape(hw * hw * nf, k)
        self.softmax.weights = np.array(w_hwc, dtype=np.float64)  # (1352, 10)
        self.softmax.biases = np.array(dense_b, dtype=np.float64)  # (10,)
