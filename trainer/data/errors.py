"""The errors of the data package: a data set that cannot be used as given, a shard that cannot be
read on."""


class DataError(ValueError):
    """A problem with the data set as configured (paths, shard counts)."""


class ShardError(ValueError):
    """A shard that cannot be read on (empty, not a tar, truncated, its source failing every
    retry); its earlier records stand."""
