"""atheris fuzz target: DeltaReader + apply over a trapped DirSource sandbox.

Run the long campaign (see fuzz/README.md)::

    python3 fuzz/fuzz_patcher.py fuzz/corpus -max_total_time=900 -timeout=20 -rss_limit_mb=2048

A crash is any exception other than a DeltaError subclass, an open outside the sandbox, secret
bytes in the output, a descriptor leak, or a hang past ``-timeout`` (a FIFO that blocks).
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports():
    import podman_delta.tardiff.format
    import podman_delta.tardiff.patcher
    import podman_delta.tardiff.sources  # noqa: F401

from fuzz.harness import Sandbox, run_one

SANDBOX: Sandbox | None = None


def test_one_input(data: bytes) -> None:
    assert SANDBOX is not None
    run_one(SANDBOX, data)


def main() -> None:
    global SANDBOX
    SANDBOX = Sandbox()
    try:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
    finally:
        SANDBOX.close()


if __name__ == "__main__":
    main()
