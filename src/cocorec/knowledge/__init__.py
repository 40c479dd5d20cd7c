"""Knowledge methods and the LM runtime they share (lm, encoder, on-disk caches)."""
