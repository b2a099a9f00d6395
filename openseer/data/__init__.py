"""Image sources, robust decoding, multi-crop, and per-step batches."""
