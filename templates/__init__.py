"""Jinja templates of the generated module (installed as symdl.templates)."""
