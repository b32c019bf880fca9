"""Rewrite passes; importing this package registers them all."""

from snncc.passes import encode  # noqa: F401
