"""Token-level hybrid decoding: a drafter on the device, the LLM verifying the uncertain tokens."""
