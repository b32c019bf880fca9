"""Rewrite passes; importing this package registers them all."""

from snncc.passes import encode, fold  # noqa: F401
