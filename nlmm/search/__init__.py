"""Retrieval with a trained model: the query engine and its gallery indexes (engine), the
result types, and the search server with its client and wire protocol."""
