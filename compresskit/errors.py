"""Errors meant for people: one sentence saying what was wrong and what to do."""


class CompressKitError(ValueError):
    """Bad input detected at a public boundary (weights, parameters, models, files)."""
