"""Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the sum."""
