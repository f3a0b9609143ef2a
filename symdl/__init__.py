"""symdl: deep-learning layers as equations; gradients derived; NumPy modules generated."""

__version__ = "0.1.0"

from .derive import derive  # noqa: E402
from .errors import SymdlError  # noqa: E402
from .spec import Layer  # noqa: E402

__all__ = ["Layer", "derive", "generate", "parse", "catalogue", "gradcheck", "SymdlError"]


def __getattr__(name):
    if name == "generate":
        from .codegen import generate_source

        return generate_source
    if name == "parse":
        from .parse import parse_layer

        return parse_layer
    if name == "catalogue":
        from .layers import catalogue

        return catalogue
    if name == "gradcheck":
        from .testing import gradcheck

        return gradcheck
    raise AttributeError(f"module 'symdl' has no attribute {name!r}")
