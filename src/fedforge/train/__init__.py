"""Client-side local training for PyTorch models."""
