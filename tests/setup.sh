#!/usr/bin/env bash
# Install everything podman-delta's tests and demo need on a Debian 12 machine (as root):
# podman, skopeo, buildah, the docker-registry, the whole-tar peers, and a virtualenv at .venv
# with podman-delta installed in editable mode plus its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "tests/setup.sh: run as root (apt-get, podman stores)" >&2; exit 1; }

APT_PACKAGES=(
  podman skopeo buildah runc fuse-overlayfs uidmap      # real podman 4.3.1 and friends
  docker-registry apache2-utils curl openssl             # the registry the tests talk to
  debootstrap zstd xdelta3 bsdiff                        # chroots, whole-tar peers
  libzstd1                                               # op-5 frames with raw literals
  systemd shellcheck                                     # systemd-analyze verify, hook lint
  python3-venv python3-dev gcc libattr1-dev              # the virtualenv and pyxattr
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
log=$(mktemp)
if ! { .venv/bin/python -m pip install -q --upgrade pip &&
       .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; echo "setup: pip install failed" >&2; exit 1
fi
rm -f "$log"
