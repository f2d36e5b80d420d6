"""Where each item is answered: threshold learning, the per-item router, peer-to-peer reuse, speculative verification."""
