"""Rewrite passes; importing this package registers them all."""

from snncc.passes import attention, calibrate, encode, ffn, fold, ifencode, nonlinear, outlier, portable, qcfs  # noqa: F401
