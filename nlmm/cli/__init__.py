"""The `nlmm` command: Typer commands (app), following a run in the terminal (follow),
error and help rendering, and the Rich reports and plots the console shares."""
