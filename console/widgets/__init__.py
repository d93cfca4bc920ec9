"""Widgets the feature screens share: a keyed table, a metric chart, tick boxes, the footer."""
