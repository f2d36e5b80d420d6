"""The Flower adapters: ClientApp and ServerApp, the message protocol, node state, phases, checkpoints."""
