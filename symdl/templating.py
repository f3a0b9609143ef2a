"""The Jinja templates of generated modules: where they are, and the environment that renders
them (one for every kind of module: layers, sequences, optimizers and the runtime helpers).

Importing this module imports nothing heavy; Jinja2 is imported when the environment is first
built, so the cache (which hashes the templates) and a cached ``symdl derive`` stay quick.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: The templates' directory: inside an installed package, else beside it in a source checkout.
TEMPLATES = Path(__file__).resolve().parent / "templates"
if not TEMPLATES.is_dir():
    TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _pyrepr(value) -> str:
    return repr(value)


def _rawstr(text: str) -> str:
    if '"' not in text and not text.endswith("\\"):
        return f'r"{text}"'
    return repr(text)


def new_environment(**options):
    """A Jinja environment over templates/: blocks trimmed, undefined names an error, no
    escaping unless ``options`` say otherwise (a report's HTML escapes, its LaTeX changes the
    delimiters)."""
    import jinja2

    settings = {
        "trim_blocks": True,
        "lstrip_blocks": True,
        "keep_trailing_newline": True,
        "undefined": jinja2.StrictUndefined,
        "autoescape": False,
        **options,
    }
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), **settings)


@functools.cache
def environment():
    """The Jinja environment of the module templates, built once (templates are compiled on
    first use and kept; a template file changed on disk is reloaded)."""
    env = new_environment()
    env.filters["pyrepr"] = _pyrepr
    env.filters["rawstr"] = _rawstr
    return env
