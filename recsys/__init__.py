"""Recommender-system embedding platform: data, TorchRec models, evaluation and tracking.

Shape letters used in docstrings throughout the library:
    B: batch size, F: number of sparse features, D: embedding dimension,
    N: number of rows of a table (users or items), K: cut-off / number of negatives.
"""
