"""The error every part of the data package raises for a data set that cannot be used as given."""


class DataError(ValueError):
    """A problem with the data set as configured (paths, shard counts)."""
