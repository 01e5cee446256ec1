"""Aggregation math and server optimizers: pure functions on arrays."""
