"""The CLIP model: towers against open_clip, attention pooling, text length buckets under
FSDP2, Hugging Face weights, zero-shot classification."""
