"""The one exception type of the data package."""


class DataError(ValueError):
    """Bad data input (file, field or value); the message is one sentence naming it."""
