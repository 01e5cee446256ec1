"""Federated algorithms: what each client does and what the server does with the results."""
