"""Runtimes: the round loop and the backends that execute client work."""
