"""symdl: deep-learning layers as equations; gradients derived; NumPy modules generated."""

import sys as _sys
import types as _types
from importlib import import_module as _import_module

__version__ = "0.1.0"

__all__ = ["Layer", "derive", "generate", "parse", "catalogue", "gradcheck", "SymdlError"]

# The public names load their module on first use, so ``import symdl`` (and a cached
# ``symdl derive``) does not pay for importing SymPy.
_LAZY = {
    "Layer": (".spec", "Layer"),
    "derive": (".derive", "derive"),
    "SymdlError": (".errors", "SymdlError"),
    "generate": (".codegen", "generate_source"),
    "parse": (".parse", "parse_layer"),
    "catalogue": (".registry", "layers"),
    "gradcheck": (".testing", "gradcheck"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(_import_module(module, __name__), attr)
    raise AttributeError(f"module 'symdl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """``symdl.derive`` stays the function: importing the submodule symdl/derive.py does not
    replace it with the module."""

    def __setattr__(self, name, value):
        if name == "derive" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
