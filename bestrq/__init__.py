"""The library: audio to adapters, one concept per module (README "Layout").

It knows nothing of DVC."""
