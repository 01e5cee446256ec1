"""Attacks for robustness experiments: model poisoning (updates) and data poisoning (data)."""
