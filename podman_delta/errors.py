"""Exceptions raised by podman-delta.

Every error a user can meet is a subclass of :class:`DeltaError` carrying a one-line message that
says what went wrong and what to do. Only the CLI turns them into exit codes.
"""


class DeltaError(Exception):
    """Base class of every podman-delta error."""

    exit_code = 1


class DeltaFormatError(DeltaError):
    """The delta file is malformed: bad magic, truncated, unknown op, a bound exceeded."""

    exit_code = 3


class SourceError(DeltaError):
    """An old file a delta refers to is missing, unsafe (escapes the tree) or too short."""

    exit_code = 4


class DigestMismatchError(DeltaError):
    """Reconstructed or downloaded bytes do not have the expected digest."""

    exit_code = 5


class DeltaTooLargeError(DeltaError):
    """The delta would not be smaller than the compressed new layer: ship the layer instead."""

    exit_code = 6


class RegistryError(DeltaError):
    """A registry answered with an error or could not be reached."""

    exit_code = 7


class StorageError(DeltaError):
    """containers-storage could not be read or written."""

    exit_code = 8
