"""One small exception hierarchy: every error says what was wrong and what to do."""


class FedforgeError(Exception):
    """Base class of every error fedforge raises on purpose."""


class ConfigError(FedforgeError):
    """A run configuration is invalid; the message names the key and the allowed values."""


class InvalidUpdateError(FedforgeError):
    """A client result failed validation and was rejected before aggregation."""


class DataError(FedforgeError):
    """A dataset or partition cannot be built as asked."""
