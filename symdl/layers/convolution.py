"""Convolution and pooling (NCHW) from affine index equations."""

from ..functions import Max, Sum
from ..spec import Layer, indices, scalar, tensors

x, weight, bias, y = tensors("x weight bias y")
n, c, f, i, j, p, q = indices("n c f i j p q")
stride, padding, dilation, kernel_size = (
    scalar("stride"),
    scalar("padding"),
    scalar("dilation"),
    scalar("kernel_size"),
)
CONV_HYPER = {"stride": 1, "padding": 0, "dilation": 1}
POOL_HYPER = {"kernel_size": int, "stride": "kernel_size", "padding": 0}
POOL_CHECKS = {"hyper": {"kernel_size": 2, "stride": 1, "padding": 1}, "sizes": {"H": 5, "W": 6}}

LAYERS = [
    Layer(
        "conv1d",
        [
            (
                y[n, f, i],
                Sum(x[n, c, stride * i + dilation * p] * weight[f, c, p], (c, p)) + bias[f],
            )
        ],
        inputs="x",
        params="weight bias",
        hyper=CONV_HYPER,
        pad={"x": {"axes": {2: "padding"}}},
        shapes={"x": ("N", "C", "L"), "weight": ("F", "C", "K"), "bias": ("F",), "y": ("N", "F", "OL")},
        doc="1-D cross-correlation with stride, zero padding and dilation (PyTorch's conv1d)",
        checks={"hyper": {"stride": 2, "padding": 1, "dilation": 2}, "sizes": {"L": 11, "K": 3}},
    ),
    Layer(
        "conv2d",
        [
            (
                y[n, f, i, j],
                Sum(
                    x[n, c, stride * i + dilation * p, stride * j + dilation * q]
                    * weight[f, c, p, q],
                    (c, p, q),
                )
                + bias[f],
            )
        ],
        inputs="x",
        params="weight bias",
        hyper=CONV_HYPER,
        pad={"x": {"axes": {2: "padding", 3: "padding"}}},
        shapes={
            "x": ("N", "C", "H", "W"),
            "weight": ("F", "C", "KH", "KW"),
            "bias": ("F",),
            "y": ("N", "F", "OH", "OW"),
        },
        doc="2-D cross-correlation with stride, zero padding and dilation (PyTorch's conv2d)",
        checks={
            "hyper": {"stride": 2, "padding": 1, "dilation": 1},
            "sizes": {"H": 7, "W": 6, "KH": 3, "KW": 2},
        },
    ),
    Layer(
        "max_pool2d",
        [(y[n, c, i, j], Max(x[n, c, stride * i + p, stride * j + q], (p, q)))],
        inputs="x",
        hyper=POOL_HYPER,
        ranges={"p": "kernel_size", "q": "kernel_size"},
        pad={"x": {"axes": {2: "padding", 3: "padding"}, "value": float("-inf")}},
        shapes={"x": ("N", "C", "H", "W"), "y": ("N", "C", "OH", "OW")},
        doc="max pooling over kernel_size x kernel_size windows; the gradient goes to the "
        "first maximum of each window",
        checks=POOL_CHECKS,
    ),
    Layer(
        "avg_pool2d",
        [
            (
                y[n, c, i, j],
                Sum(x[n, c, stride * i + p, stride * j + q], (p, q)) / kernel_size**2,
            )
        ],
        inputs="x",
        hyper=POOL_HYPER,
        ranges={"p": "kernel_size", "q": "kernel_size"},
        pad={"x": {"axes": {2: "padding", 3: "padding"}}},
        shapes={"x": ("N", "C", "H", "W"), "y": ("N", "C", "OH", "OW")},
        doc="average pooling over kernel_size x kernel_size windows (zero padding counted)",
        checks=POOL_CHECKS,
    ),
]
