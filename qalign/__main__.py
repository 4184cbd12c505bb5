"""`python -m qalign` runs the command line."""

from qalign.cli import main

main()
