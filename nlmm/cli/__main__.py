"""`python -m nlmm.cli`: the same as the `nlmm` command."""

from nlmm.cli.app import main

main()
