"""Rewrite passes; importing this package registers them all."""

from snncc.passes import (  # noqa: F401
    attention, calibrate, encode, ffn, fold, ifencode, nonlinear, outlier, portable, qcfs)
