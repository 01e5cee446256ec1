"""Offline datasets and the partitioners that split them across clients."""
