"""Several runs' curves overlaid."""
