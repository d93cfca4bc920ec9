"""The first screen: every run in the store."""
