"""Backends that run or export a spiking program."""
