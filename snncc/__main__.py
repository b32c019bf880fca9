"""`python -m snncc` is the `snncc` command."""

from snncc.cli import main

main()
