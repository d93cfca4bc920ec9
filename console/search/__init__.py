"""Query a trained checkpoint, keeping its model loaded between queries."""
