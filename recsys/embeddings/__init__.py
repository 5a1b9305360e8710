"""Embedding tables: specs, compression methods, the collection, memory accounting."""
