#!/usr/bin/env bash
# The Debian trixie chroot with podman 5.4.2 that tests/test_import_podman5.py runs (SQLite
# blob-info-cache). Built once with debootstrap from deb.debian.org (about 2 minutes) and cached
# as /var/cache/podman-delta/trixie-podman.tar.zst (about 120 MB); later runs only check it.
#   prepare  build the cache unless it exists (default)
#   rebuild  build it again
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
case "${1:-prepare}" in
  prepare) exec "$PY" -m tests.support.trixie ensure ;;
  rebuild) exec "$PY" -m tests.support.trixie build ;;
  *) echo "usage: $0 [prepare|rebuild]" >&2; exit 2 ;;
esac
