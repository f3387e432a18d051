#!/usr/bin/env bash
# Set up (tests/setup.sh) and run podman-delta's whole test suite, as root.
#
# The suite runs inside a private mount namespace: podman's blob-info-cache
# (/var/lib/containers/cache) is global to the host, so the tests put a tmpfs over it and never
# touch the host's cache. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
[ -z "${PODMAN_DELTA_SKIP_TRIXIE:-}" ] && [ -x tests/support/trixie-chroot.sh ] && \
  bash tests/support/trixie-chroot.sh prepare
.venv/bin/ruff check podman_delta tests bench
.venv/bin/ruff format --check podman_delta tests bench
mkdir -p /var/lib/containers/cache
exec unshare -m --propagation private sh -c \
  'mount -t tmpfs tmpfs /var/lib/containers/cache && exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"' \
  pytest "$@"
