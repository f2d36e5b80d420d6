"""Federated aggregation: update checks, aggregation rules, the hierarchical (edge, then cloud) aggregator."""
