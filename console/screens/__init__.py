"""The dashboard's screens: runs, one run, comparison, checkpoints, search, and the dialogs."""
