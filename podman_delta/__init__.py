"""podman-delta: delta pulls for Podman and containers-storage.

The package follows the data flow of a delta pull:

- ``tardiff``  — the tar-diff delta format, the differ and the patcher with its sandboxed sources;
- ``registry`` — the OCI distribution client and the delta artifact format;
- ``storage``  — containers-storage access, the blob-info-cache and the importer;
- ``cli``      — the ``podman-delta`` commands, thin layers over the above.
"""

__version__ = "0.1.0"
