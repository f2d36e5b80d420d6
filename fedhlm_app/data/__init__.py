"""Datasets (AG News or any CSV folder) and their federated partitioning."""
