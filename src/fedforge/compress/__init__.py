"""Update codecs: pure, vectorized encode/decode of a batch of flattened updates."""
