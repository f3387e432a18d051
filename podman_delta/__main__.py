"""Allow ``python -m podman_delta``."""

from podman_delta.cli import main

raise SystemExit(main())
