"""The error types of symdl: one base class, one subclass per pipeline stage.

Every error carries its data as attributes, and its message follows the pattern
"<what> requires <rule>, got <value>", naming the offending term.
"""

from __future__ import annotations


class SymdlError(Exception):
    """Base class of every error symdl raises on purpose."""

    def __init__(self, message: str, **data):
        super().__init__(message)
        self.message = message
        self.data = data

    def with_context(self, context: str) -> "SymdlError":
        """Return a copy of this error whose message is prefixed by ``context``."""
        err = type(self)(f"{context}: {self.message}", **self.data)
        return err


def unknown_name(kind: str, name: str, known, error=None) -> "SymdlError":
    """The error for a catalogue lookup of ``name`` (a ``kind``: layer, sequence, optimizer)
    that is not among ``known``, listing the known names."""
    known = list(known)
    return (error or SpecError)(
        f"{kind} {name!r} requires a catalogue name, got an unknown one; known: "
        f"{', '.join(known)}",
        name=name,
        known=known,
    )


class ParseError(SymdlError):
    """Equation text that is not a valid equation (with its position in the text)."""


class SpecError(SymdlError):
    """A layer whose equations, declarations or shapes are inconsistent."""


class DeriveError(SymdlError):
    """A program the differentiation stage cannot handle."""


class LowerError(SymdlError):
    """An assignment the NumPy lowering cannot express."""


class CodegenError(SymdlError):
    """Rendering or writing a module failed."""


class UsageError(SymdlError):
    """Bad command-line usage."""
