"""The built-in layer catalogue: one family per module, equations and test metadata only."""

from __future__ import annotations

from ..errors import SpecError
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
        raise SpecError(
            f"layer {name!r} requires a catalogue name, got an unknown one; known: "
            f"{', '.join(layers)}"
        )
    return layers[name]
