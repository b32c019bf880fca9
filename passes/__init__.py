"""Rewrite passes; importing this package registers them all."""

from snncc.passes import attention, encode, ffn, fold, nonlinear, outlier  # noqa: F401
