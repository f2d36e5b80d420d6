"""The small language model on each client: encoder features, n-gram bags, the head, uncertainty, label prior."""
