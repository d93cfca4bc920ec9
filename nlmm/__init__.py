"""nlmm: train and use tri-modal (image, text, speech) Nested-Learning retrieval models."""

__version__ = "0.1.0"
