"""The built-in catalogue's definitions: equations and test metadata only, one family per module.

``FAMILIES`` are the modules of layers (each a ``LAYERS`` list), in ``symdl list`` order;
sequences.py declares the sequence layers (scans of recurrent cells) and optimizers.py the
update rules. symdl/registry.py turns all of them into the one catalogue every command uses.
"""

from . import activations, attention, convolution, dense, losses, normalization, recurrent

FAMILIES = (activations, dense, losses, normalization, convolution, recurrent, attention)
