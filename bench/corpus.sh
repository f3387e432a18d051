#!/usr/bin/env bash
# Build the benchmark corpus at DIR, or reuse it when every pair is already there.
#
#   usage: bench/corpus.sh [DIR]     (default /var/cache/podman-delta/corpus; run as root)
#
# Wraps the shared ../shared/corpus/make-corpus.sh (set MAKE_CORPUS to use another copy).
# Trees and download caches go to CORPUS_WORK (default DIR-work, outside DIR so that a
# finished corpus directory holds only the pairs). Set CORPUS_REBUILD=1 to rebuild anyway;
# the other make-corpus.sh knobs (CORPUS_PAIRS, CORPUS_FRESH, DEBIAN_MIRROR) pass through.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=$(realpath -m "${1:-/var/cache/podman-delta/corpus}")
MAKE_CORPUS=${MAKE_CORPUS:-$HERE/../../shared/corpus/make-corpus.sh}
export CORPUS_WORK=${CORPUS_WORK:-$DIR-work}

complete() {
  local p
  for p in A-os-security-update B-os-major-update C-python-app-update E-tiny-config-change; do
    for f in old.tar new.tar new.tar.gz SHA256SUMS; do
      [ -s "$DIR/$p/$f" ] || return 1
    done
  done
}

if [ "${CORPUS_REBUILD:-0}" != 1 ] && complete; then
  echo "corpus: reusing $DIR" >&2
  exit 0
fi
[ -f "$MAKE_CORPUS" ] || { echo "corpus: $MAKE_CORPUS not found; set MAKE_CORPUS" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "corpus: building needs root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$DIR"
echo "corpus: building $DIR with $MAKE_CORPUS (about 10 minutes; log in $DIR.log)" >&2
bash "$MAKE_CORPUS" "$DIR" > "$DIR.log" 2>&1 || { tail -n 30 "$DIR.log" >&2; exit 1; }
complete || { echo "corpus: make-corpus.sh finished but pairs are missing; see $DIR.log" >&2; exit 1; }
echo "corpus: ready in $DIR" >&2
