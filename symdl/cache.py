"""An on-disk cache of generated module text, so an unchanged layer is not derived again.

A cache entry is keyed by the SHA-256 of a canonical text of everything the module text depends
on:

* the layer itself: its equations and every other attribute (SymPy objects by ``srepr``; names,
  shapes, hyperparameters and their defaults, documentation, metadata), or, for ``symdl derive``,
  the equation text and options exactly as given;
* the ``source`` and ``command`` written into the module's header;
* the lowering switches in effect (``symdl.lower.OPTIMIZATIONS``);
* the engine: the symdl version, a hash of the package's own source files (the layer
  catalogue excepted: a layer is keyed by its contents), a hash of the templates, and the
  versions of Python, SymPy, Jinja2 and ruff.

An entry holds its key and a hash of its text; an entry that cannot be read, is not valid JSON,
or whose key or text hash does not match is ignored and rebuilt. Entries are written through a
temporary file and a rename, so a reader never sees half an entry; a cache directory that cannot
be written is skipped silently (the text is generated as without a cache).

Location: ``$SYMDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/symdl``, else ``~/.cache/symdl``.
``SYMDL_NO_CACHE=1`` (or ``--no-cache`` on the command line) turns the cache off.

This module imports nothing heavy (no SymPy, Jinja2 or NumPy), so a cached ``symdl derive``
starts quickly.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .templating import TEMPLATES

ENV_DIR = "SYMDL_CACHE_DIR"
ENV_OFF = "SYMDL_NO_CACHE"
#: The layout of an entry; bumped when it changes, which retires every older entry.
FORMAT = 1

PACKAGE = Path(__file__).resolve().parent


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---- where ---------------------------------------------------------------------------------


def enabled() -> bool:
    """False when ``$SYMDL_NO_CACHE`` is set to anything but ``''`` or ``0``."""
    return os.environ.get(ENV_OFF, "").strip() in ("", "0")


def cache_dir() -> Path:
    """``$SYMDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/symdl``, else ``~/.cache/symdl``."""
    explicit = os.environ.get(ENV_DIR, "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative path is to be ignored
        return Path(xdg) / "symdl"
    return Path.home() / ".cache" / "symdl"


# ---- what the text depends on --------------------------------------------------------------


def _templates() -> Path:
    return TEMPLATES


def _files_digest(root: Path, pattern: str, skip: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for path in sorted(root.glob(pattern)):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in rel or rel.startswith(skip) or not path.is_file():
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _version_of(dist: str) -> str:
    """A distribution's version, read from its ``.dist-info`` directory name when it sits next
    to the package (cheap), else through ``importlib.metadata``; ``"absent"`` when missing."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(dist)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return "absent"
    site = Path(spec.origin).resolve().parent.parent
    prefix = dist.lower().replace("-", "_") + "-"
    try:
        for entry in os.scandir(site):
            name = entry.name.lower()
            if name.startswith(prefix) and name.endswith(".dist-info"):
                return name[len(prefix) : -len(".dist-info")]
    except OSError:
        pass
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - any failure: the version is unknown, not an error
        return "unknown"


@functools.lru_cache(maxsize=1)
def engine_fingerprint() -> str:
    """A hash of everything in the engine that can change generated text."""
    parts = {
        "symdl": __version__,
        "engine": _files_digest(PACKAGE, "**/*.py", skip=("layers/",)),
        "templates": _files_digest(_templates(), "**/*"),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        **{dist: _version_of(dist) for dist in ("sympy", "jinja2", "ruff")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _default_switches() -> dict:
    """The default lowering switches (symdl.passes imports nothing heavy)."""
    from .passes import LOWERING, defaults

    return defaults(LOWERING)


def switches():
    """The lowering switches in effect: ``"default"`` while ``symdl.lower.OPTIMIZATIONS`` holds
    the defaults of symdl/passes.py (covered by the engine hash), else the switches themselves."""
    lower = sys.modules.get("symdl.lower")
    if lower is None:  # not imported: nobody changed them in this process
        return "default"
    current = dict(lower.OPTIMIZATIONS)
    return "default" if current == _default_switches() else current


class Uncacheable(Exception):
    """A layer holds a value without a canonical text: it is generated without the cache."""


def canonical(value) -> str:
    """A deterministic text of ``value``: SymPy objects by ``srepr``, containers in order
    (sets sorted), symdl objects by class and public attributes. Raises :class:`Uncacheable`
    for anything else."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, type):
        return f"type:{value.__module__}.{value.__qualname__}"
    sympy = sys.modules.get("sympy")
    if sympy is not None and isinstance(value, sympy.Basic):
        return f"sympy:{sympy.srepr(value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):  # in order: the order of hyperparameters is the signature's
        return "dict{" + ",".join(f"{canonical(k)}:{canonical(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (set, frozenset)):
        return "set{" + ",".join(sorted(canonical(v) for v in value)) + "}"
    cls = type(value)
    if cls.__module__.split(".")[0] == "symdl" and hasattr(value, "__dict__"):
        fields = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        return f"{cls.__module__}.{cls.__qualname__}(" + canonical(fields) + ")"
    raise Uncacheable(f"no canonical text for a {cls.__qualname__}")


def key(kind: str, parts: dict) -> str:
    """The SHA-256 key of a cache entry of ``kind`` ("layer", "derive") described by ``parts``
    (already canonical text or JSON values)."""
    payload = {
        "format": FORMAT,
        "kind": kind,
        "engine": engine_fingerprint(),
        "switches": switches(),
        "parts": parts,
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ---- reading and writing -------------------------------------------------------------------


def _path(root: Path, digest: str) -> Path:
    return root / f"v{FORMAT}" / digest[:2] / f"{digest}.json"


def load(digest: str, root: Path | None = None) -> dict | None:
    """The entry stored under ``digest``, or None when missing, unreadable or not verified."""
    root = cache_dir() if root is None else root
    try:
        raw = _path(root, digest).read_bytes()
        entry = json.loads(raw)
        text = entry["text"]
        ok = (
            entry.get("key") == digest
            and isinstance(text, str)
            and entry.get("sha256") == hashlib.sha256(text.encode()).hexdigest()
            and isinstance(entry.get("meta", {}), dict)
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return entry if ok else None


def store(digest: str, text: str, meta: dict | None = None, root: Path | None = None) -> bool:
    """Write an entry; False (and nothing raised) when the cache directory is not writable."""
    root = cache_dir() if root is None else root
    entry = {
        "key": digest,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "symdl": __version__,
        "meta": meta or {},
        "text": text,
    }
    try:
        write_atomic(_path(root, digest), json.dumps(entry, ensure_ascii=False))
    except OSError:
        return False
    return True


def cached(
    kind: str,
    parts: Callable[[], dict],
    build: Callable[[], tuple[str, dict]],
    use: bool = True,
) -> tuple[str, dict]:
    """``build()``'s ``(text, meta)``, from the cache when an entry for ``parts()`` is there.

    ``use=False`` or ``$SYMDL_NO_CACHE`` builds without reading or writing anything. A layer
    that has no canonical text (:class:`Uncacheable`) is built without the cache too.
    """
    if not (use and enabled()):
        return build()
    try:
        digest = key(kind, parts())
    except Uncacheable:
        return build()
    entry = load(digest)
    if entry is not None:
        return entry["text"], entry.get("meta", {})
    text, meta = build()
    store(digest, text, meta)
    return text, meta
