"""Flickr8k + FACC data: corpus reader, features, tokenizer, prepared cache and batch loaders."""
