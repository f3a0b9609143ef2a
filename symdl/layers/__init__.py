"""The built-in layer catalogue: one family per module, equations and test metadata only."""

from __future__ import annotations

from ..errors import SpecError, unknown_name
from ..spec import Layer
from . import activations, attention, convolution, dense, losses, normalization, recurrent

FAMILIES = (activations, dense, losses, normalization, convolution, recurrent, attention)


def catalogue() -> dict[str, Layer]:
    """Every built-in layer by name, in catalogue order."""
    out: dict[str, Layer] = {}
    for family in FAMILIES:
        for layer in family.LAYERS:
            if layer.name in out:
                raise SpecError(f"layer names require uniqueness, got {layer.name!r} twice")
            out[layer.name] = layer
    return out


def get(name: str) -> Layer:
    layers = catalogue()
    if name not in layers:
        raise unknown_name("layer", name, layers)
    return layers[name]
