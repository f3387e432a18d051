#!/usr/bin/env bash
# Check that deltas written by `podman-delta diff` apply with Go tar-patch, byte for byte.
#
#   usage: sudo bench/go_compat.sh [options] TAR_DIFF_SRC
#          bench/go_compat.sh [--gopath DIR] --build-only OUT_DIR TAR_DIFF_SRC
#
# TAR_DIFF_SRC is a directory holding a containers/tar-diff source tree (a checkout of tag
# v0.1.2, or any later one whose tar-patch side still builds with the local Go). Only
# cmd/tar-patch and the packages it imports are built, offline, in GOPATH mode, into a
# scratch directory; nothing from TAR_DIFF_SRC is copied into this repository.
#
# Steps: (1) apply the Go-made fixture deltas (../shared/fixtures/go-tardiff) to prove the
# build; (2) for corpus pairs and generated adversarial trees, run
# `python -m podman_delta diff --format F` for each F in --formats, apply the delta with the
# built tar-patch to the extracted old tree and compare sha256 with new.tar. Prints a table;
# exit status 0 when nothing failed. A tardf2 delta that a v1 tar-patch refuses (no op 5) is
# reported as "skip", not as a failure.
#
# --build-only OUT_DIR builds tar-patch and, when TAR_DIFF_SRC has cmd/tar-diff, tar-diff too,
# leaves OUT_DIR/tar-patch and OUT_DIR/tar-diff and stops (no root needed): the binaries that
# bench/run.py --go-tar-patch / --go-tar-diff measure. tar-diff v0.1.x imports
# github.com/containers/image/v5/pkg/compression only for AutoDecompress; Debian's
# golang-github-containers-image-dev has no /v5 path usable in GOPATH mode, so unless a --gopath
# entry provides that package a small stand-in (gzip via klauspost/pgzip as containers/image
# does, zstd, bzip2, else pass-through) is written into the scratch GOPATH. tar-diff also needs
# golang-github-klauspost-pgzip-dev.
#
# Needs: root (old trees are extracted with numeric owners, xattrs and device nodes), Go
# (golang-go) and github.com/klauspost/compress under /usr/share/gocode
# (apt-get install golang-go golang-github-klauspost-compress-dev). Trees whose tar-patch
# applies op 5 (tardf2) need klauspost/compress >= 1.16 (WithDecoderDictRaw): pass
# --gopath DIR with DIR/src/github.com/klauspost/compress, e.g. bookworm-backports' 1.17.9
# unpacked with dpkg-deb -x (its usr/share/gocode).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CORPUS=/var/cache/podman-delta/corpus
PAIRS=A,C,E
FIXTURES=$REPO/../shared/fixtures/go-tardiff
FORMATS="tardf1 auto"
ADVERSARIAL=1
BIG=0
WORK=
KEEP=0
PY=$REPO/.venv/bin/python
GOCODE=/usr/share/gocode
EXTRA_GOPATH=
BUILD_ONLY=

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  cat <<'USAGE'
Options:
  --corpus DIR       corpus made by bench/corpus.sh (default /var/cache/podman-delta/corpus)
  --pairs A,C,E      corpus pairs to run, by letter; "none" for none (default A,C,E)
  --fixtures DIR     Go-made fixture deltas (default ../shared/fixtures/go-tardiff)
  --formats "F ..."  podman-delta diff formats to check (default "tardf1 auto")
  --no-adversarial   skip the generated adversarial trees
  --big              also the >64 MiB single-file tree (ADD splitting; minutes of CPU)
  --work DIR         scratch directory, kept afterwards (default: a temp dir, removed)
  --python PATH      interpreter with podman_delta (default .venv/bin/python)
  --gopath DIR       GOPATH entry searched before /usr/share/gocode (newer klauspost/compress);
                     repeatable, earlier entries first
  --build-only DIR   only build tar-patch (and tar-diff if the tree has it) into DIR, then exit
USAGE
}

die() { echo "go_compat: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case $1 in
    --corpus) CORPUS=$2; shift 2 ;;
    --pairs) PAIRS=$2; shift 2 ;;
    --fixtures) FIXTURES=$2; shift 2 ;;
    --formats) FORMATS=$2; shift 2 ;;
    --no-adversarial) ADVERSARIAL=0; shift ;;
    --big) BIG=1; shift ;;
    --work) WORK=$2; KEEP=1; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --gopath) EXTRA_GOPATH=${EXTRA_GOPATH:+$EXTRA_GOPATH:}$(realpath "$2"); shift 2 ;;
    --build-only) BUILD_ONLY=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { usage >&2; exit 2; }
SRC=$(realpath "$1")
[ -d "$SRC/cmd/tar-patch" ] || die "$SRC has no cmd/tar-patch: give a containers/tar-diff tree"
command -v go >/dev/null || die "go not found: apt-get install golang-go"
[ -d "$GOCODE/src/github.com/klauspost/compress/zstd" ] ||
  die "klauspost/compress missing: apt-get install golang-github-klauspost-compress-dev"
if [ -z "$BUILD_ONLY" ]; then
  [ "$(id -u)" = 0 ] || die "run as root (old trees are extracted with owners and devices)"
  [ -x "$PY" ] || die "$PY not found: make the repo venv or pass --python"
fi

if [ -z "$WORK" ]; then
  WORK=$(mktemp -d /var/tmp/go_compat.XXXXXX)
else
  mkdir -p "$WORK"
  WORK=$(realpath "$WORK")
fi
cleanup() { [ "$KEEP" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT
ROWS=$WORK/rows.tsv
: >"$ROWS"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$ROWS"; }

# Build cmd/tar-patch in GOPATH mode: no module download, no proxy, no network. The tree is
# linked (not copied) under a scratch GOPATH; everything else resolves from /usr/share/gocode.
build_tar_patch() {
  go_build tar-patch "$WORK/gopath${EXTRA_GOPATH:+:$EXTRA_GOPATH}:$GOCODE" ||
    die "building tar-patch from $SRC failed (only the v0.1.x and pkg/protocol layouts are known to build)"
  TP=$WORK/tar-patch
}

# go_build CMD GOPATH: build ./cmd/CMD of the linked tree into $WORK/CMD, offline.
go_build() {
  local gp=$WORK/gopath
  mkdir -p "$gp/src/github.com/containers"
  ln -sfn "$SRC" "$gp/src/github.com/containers/tar-diff"
  (cd "$gp/src/github.com/containers/tar-diff" &&
    env GO111MODULE=off GOPATH="$2" GOPROXY=off GOFLAGS= GOCACHE="$WORK/gocache" \
      CGO_ENABLED=0 go build -o "$WORK/$1" "./cmd/$1")
}

# Build cmd/tar-diff the same way into $WORK/tar-diff. Its only import outside the tree and
# klauspost is containers/image's pkg/compression (AutoDecompress); see the header comment.
build_tar_diff() {
  local gp=$WORK/gopath standin=$WORK/standin gopath d found=
  for d in ${EXTRA_GOPATH//:/ } "$GOCODE"; do
    [ -d "$d/src/github.com/containers/image/v5/pkg/compression" ] && found=$d
  done
  if [ -z "$found" ]; then
    mkdir -p "$standin/src/github.com/containers/image/v5/pkg/compression"
    write_compression_standin >"$standin/src/github.com/containers/image/v5/pkg/compression/compression.go"
    echo "go_compat: containers/image/v5/pkg/compression: using the stand-in (AutoDecompress only)" >&2
  fi
  [ -d "$GOCODE/src/github.com/klauspost/pgzip" ] ||
    die "klauspost/pgzip missing: apt-get install golang-github-klauspost-pgzip-dev"
  gopath=$gp${EXTRA_GOPATH:+:$EXTRA_GOPATH}
  [ -n "$found" ] || gopath=$gopath:$standin
  go_build tar-diff "$gopath:$GOCODE" ||
    die "building tar-diff from $SRC failed (the v0.1.x layout is known to build)"
}

# Stand-in for github.com/containers/image/v5/pkg/compression, written for this script: tar-diff
# v0.1.x calls only AutoDecompress. Sniffs the first bytes like containers/image does.
write_compression_standin() {
  cat <<'GO'
// Package compression stands in for containers/image's (AutoDecompress only), for bench/go_compat.sh.
package compression

import (
	"bytes"
	"compress/bzip2"
	"errors"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/klauspost/pgzip"
)

type zstdReadCloser struct{ d *zstd.Decoder }

func (z zstdReadCloser) Read(p []byte) (int, error) { return z.d.Read(p) }
func (z zstdReadCloser) Close() error               { z.d.Close(); return nil }

// AutoDecompress returns the decompressed stream and whether the input was compressed.
func AutoDecompress(stream io.Reader) (io.ReadCloser, bool, error) {
	head := make([]byte, 8)
	n, err := io.ReadAtLeast(stream, head, len(head))
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return nil, false, err
	}
	head = head[:n]
	input := io.MultiReader(bytes.NewReader(head), stream)
	switch {
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b, 0x08}):
		r, err := pgzip.NewReader(input)
		if err != nil {
			return nil, false, err
		}
		return r, true, nil
	case bytes.HasPrefix(head, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		d, err := zstd.NewReader(input)
		if err != nil {
			return nil, false, err
		}
		return zstdReadCloser{d}, true, nil
	case bytes.HasPrefix(head, []byte{0x42, 0x5a, 0x68}):
		return io.NopCloser(bzip2.NewReader(input)), true, nil
	case bytes.HasPrefix(head, []byte{0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00}):
		return nil, false, errors.New("xz is not supported by this stand-in")
	}
	return io.NopCloser(input), false, nil
}
GO
}

# --build-only: leave the binaries in $BUILD_ONLY and stop.
build_only() {
  mkdir -p "$BUILD_ONLY"
  build_tar_patch
  cp "$TP" "$BUILD_ONLY/tar-patch"
  echo "$BUILD_ONLY/tar-patch: $("$TP" -version 2>&1 | head -n 1)"
  if [ -d "$SRC/cmd/tar-diff" ]; then
    build_tar_diff
    cp "$WORK/tar-diff" "$BUILD_ONLY/tar-diff"
    echo "$BUILD_ONLY/tar-diff: $("$WORK/tar-diff" -version 2>&1 | head -n 1)"
  else
    echo "go_compat: $SRC has no cmd/tar-diff: built tar-patch only" >&2
  fi
  echo "$(go version); klauspost/compress $(klauspost_version)"
}

# extract DIR TAR... : the old tree, every old tar in order, as root with owners and xattrs.
extract() {
  local dir=$1 t
  shift
  rm -rf "$dir"
  mkdir -p "$dir"
  for t in "$@"; do
    tar -xp --numeric-owner --xattrs -f "$t" -C "$dir" 2>>"$WORK/extract.log" ||
      die "extracting $t failed (see $WORK/extract.log)"
  done
}

# apply NAME FORMAT DELTA OLD_DIR WANT_SHA DIFF_SECONDS : one table row.
apply_row() {
  local name=$1 fmt=$2 delta=$3 old=$4 want=$5 dsec=$6 out=$WORK/out.tar t0 rc hdr size asec res note
  hdr=$(head -c 6 "$delta" | tr -dc 'a-z0-9')
  size=$(stat -c %s "$delta")
  t0=$(now)
  rc=0
  "$TP" "$delta" "$old" "$out" 2>"$WORK/apply.err" || rc=$?
  asec=$(since "$t0")
  note=$(tail -n 1 "$WORK/apply.err" | sed 's/^[0-9\/]* [0-9:]* //' | cut -c1-60)
  if [ "$rc" = 0 ] && [ "$(sha "$out")" = "$want" ]; then
    res=PASS
    note=
  elif [ "$rc" != 0 ] && [ "$hdr" = tardf2 ]; then
    res=skip
    note="tardf2 refused: ${note:-exit $rc}"
  else
    res=FAIL
    [ "$rc" = 0 ] && note="sha256 differs from new.tar"
  fi
  rm -f "$out"
  row "$name" "$fmt" "$size" "$hdr" "$dsec" "$asec" "$res" "$note"
}

# ours NAME NEW_TAR OLD_DIR OLD_TAR... : diff with podman-delta in every format, then apply.
ours() {
  local name=$1 new=$2 old=$3 want fmt delta t0 rc dsec
  shift 3
  want=$(sha "$new")
  for fmt in $FORMATS; do
    delta=$WORK/deltas/$name.$fmt.tardiff
    mkdir -p "$WORK/deltas"
    t0=$(now)
    rc=0
    (cd "$REPO" && "$PY" -m podman_delta diff --no-size-check --format "$fmt" "$@" "$new" "$delta") \
      >"$WORK/diff.log" 2>&1 || rc=$?
    dsec=$(since "$t0")
    if [ "$rc" != 0 ]; then
      row "$name" "$fmt" - - "$dsec" - FAIL "diff exit $rc: $(tail -n 1 "$WORK/diff.log" | cut -c1-50)"
      continue
    fi
    apply_row "$name" "$fmt" "$delta" "$old" "$want" "$dsec"
  done
}

step_fixtures() {
  local d name f
  if [ ! -d "$FIXTURES" ]; then
    row fixtures - - - - - FAIL "no fixtures at $FIXTURES"
    return
  fi
  for d in "$FIXTURES"/*/; do
    if [ ! -f "$d/old.tar" ] || [ ! -f "$d/new.tar" ]; then
      continue
    fi
    name=go:$(basename "$d")
    extract "$WORK/tree" "$d/old.tar"
    for f in "$d"/*.tardiff; do
      apply_row "$name" "$(basename "$f" .tardiff)" "$f" "$WORK/tree" "$(sha "$d/new.tar")" -
    done
  done
}

step_pairs() {
  local letter p
  [ "$PAIRS" = none ] && return
  for letter in ${PAIRS//,/ }; do
    p=$(find "$CORPUS" -mindepth 1 -maxdepth 1 -type d -name "$letter-*" | head -n 1)
    if [ -z "$p" ] || [ ! -f "$p/old.tar" ]; then
      row "pair $letter" - - - - - FAIL "no $CORPUS/$letter-*/old.tar (bench/corpus.sh)"
      continue
    fi
    extract "$WORK/tree" "$p/old.tar"
    ours "pair $letter" "$p/new.tar" "$WORK/tree" "$p/old.tar"
  done
}

step_adversarial() {
  local cases=(basic dotslash dup multi pytar paxx) d olds
  [ "$BIG" = 1 ] && cases+=(big)
  [ "$ADVERSARIAL" = 1 ] || return 0
  mkdir -p "$WORK/adv"
  write_generator >"$WORK/mkadv.py"
  python3 "$WORK/mkadv.py" "$WORK/adv" "${cases[@]}" || die "generating adversarial trees failed"
  for d in "$WORK"/adv/adv-*/; do
    d=${d%/}
    olds=("$d/old.tar")
    [ -f "$d/old2.tar" ] && olds+=("$d/old2.tar")
    extract "$WORK/tree" "${olds[@]}"
    ours "$(basename "$d")" "$d/new.tar" "$WORK/tree" "${olds[@]}"
  done
}

# The klauspost/compress the build resolved: the first GOPATH entry that holds it.
klauspost_version() {
  local d
  for d in ${EXTRA_GOPATH//:/ } "$GOCODE"; do
    if [ -d "$d/src/github.com/klauspost/compress" ]; then
      if [ "$d" = "$GOCODE" ]; then
        dpkg-query -W -f '${Version}' golang-github-klauspost-compress-dev 2>/dev/null || echo "from $d"
      else
        echo "from $d"
      fi
      return
    fi
  done
}

report() {
  local fails
  echo
  echo "tar-patch: built from $SRC$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null | sed 's/^/ @ /')"
  echo "  $("$TP" -version 2>&1 | head -n 1); $(go version); klauspost/compress $(klauspost_version)"
  echo
  { printf 'check\tformat\tdelta bytes\theader\tdiff s\tapply s\tresult\tnote\n'; cat "$ROWS"; } |
    column -t -s $'\t'
  fails=$(awk -F'\t' '$7 == "FAIL"' "$ROWS" | wc -l)
  echo
  echo "$(awk -F'\t' '$7 == "PASS"' "$ROWS" | wc -l) pass, $fails fail, $(awk -F'\t' '$7 == "skip"' "$ROWS" | wc -l) skip"
  [ "$fails" = 0 ]
}

write_generator() {
  cat <<'PY'
"""Adversarial old/new layer tar pairs (written by bench/go_compat.sh; stdlib only)."""

import io
import os
import random
import subprocess
import sys
import tarfile

OUT = sys.argv[1]
rnd = random.Random(1234)


def rbytes(n):
    return rnd.randbytes(n)


def text(n, seed):
    r = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"lorem", b"ipsum", b"config", b"value"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(r.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:n])


def edit(data, n=5, seed=0):
    r = random.Random(seed)
    b = bytearray(data)
    for _ in range(n):
        i = r.randrange(len(b))
        b[i] = (b[i] + 1) % 256
    return bytes(b)


def w(root, rel, data, mode=0o644):
    p = os.path.join(root, rel) if isinstance(rel, str) else os.path.join(root.encode(), rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, mode)
    return p


def gnutar(src, dst, dot=False, extra=()):
    members = ["."] if dot else sorted(os.listdir(src))
    subprocess.run(
        ["tar", "--format=pax", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--sparse",
         "--sort=name", "--mtime=@1600000000", "-C", src, "-cf", dst, *extra, "--", *members],
        check=True,
    )


def sparse(path, size, chunks):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks:
            f.seek(off)
            f.write(data)


BIN_A = rbytes(200_000)
LIB = rbytes(300_000)
TXT = text(50_000, 1)
SECRET = text(10_000, 2)
LONGDIR = "d" * 150
LONGNAME = LONGDIR + "/" + ("f" * 120) + ".txt"


def tree_old(root):
    w(root, "e1", b"")
    w(root, "e2", b"")
    w(root, "data/a.bin", BIN_A)
    os.link(os.path.join(root, "data/a.bin"), os.path.join(root, "data/hl"))
    w(root, "data/moveme.txt", TXT)
    w(root, "lib/libfoo.so.1.0", LIB)
    os.symlink("data/a.bin", os.path.join(root, "lnk"))
    os.symlink("lib", os.path.join(root, "libdir"))
    w(root, "secret", SECRET, 0o600)
    p = w(root, "x/attr.txt", text(20_000, 3))
    os.setxattr(p, "user.test", b"old")
    os.setxattr(p, "security.capability", bytes.fromhex("0100000200100000000000000000000000000000"))
    w(root, LONGNAME, text(30_000, 4))
    w(root, "\u00fc/\u65e5\u672c.txt", text(20_000, 5))
    w(root, b"latin1-caf\xe9.txt", text(20_000, 6))
    w(root, "sp ace/new\nline.txt", text(20_000, 7))
    sparse(os.path.join(root, "sparse.img"), 10 << 20, [(0, rbytes(8192)), (5 << 20, text(8192, 8))])
    os.mkfifo(os.path.join(root, "fifo"))
    os.mknod(os.path.join(root, "null"), 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(os.path.join(root, "blk"), 0o660 | 0o060000, os.makedev(7, 0))
    os.makedirs(os.path.join(root, "d2becomesfile/sub"))
    w(root, "filebecomesdir", text(9000, 9))
    w(root, "bz/pkg.tar.xz", rbytes(70_000))
    w(root, "ro/readonly-0444", text(15_000, 10), 0o444)
    w(root, "pyc/a.pyc", text(40_000, 11))


def tree_new(root):
    w(root, "e1", b"")
    w(root, "e2", b"now not empty\n")
    w(root, "e3", b"")
    a2 = edit(BIN_A, 7, 1) + rbytes(1000)
    w(root, "data/a.bin", a2)
    os.link(os.path.join(root, "data/a.bin"), os.path.join(root, "data/hl"))
    w(root, "data/copy-of-old-a.bin", BIN_A)
    w(root, "other/moved.txt", TXT[:20000] + b"inserted line\n" + TXT[20000:])
    w(root, "lib/libfoo.so.1.1", edit(LIB, 20, 2))
    os.symlink("lib/libfoo.so.1.1", os.path.join(root, "lnk"))
    os.symlink("lib", os.path.join(root, "libdir"))
    w(root, "secret", edit(SECRET, 2, 3), 0o600)
    p = w(root, "x/attr.txt", text(20_000, 3) + b"more\n")
    os.setxattr(p, "user.test", b"new-value")
    os.setxattr(p, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000"))
    w(root, LONGNAME, edit(text(30_000, 4), 3, 4))
    w(root, LONGDIR + "/" + "g" * 200, text(30_000, 4))
    w(root, "\u00fc/\u65e5\u672c.txt", edit(text(20_000, 5), 3, 5))
    w(root, b"latin1-caf\xe9.txt", edit(text(20_000, 6), 3, 6))
    w(root, "sp ace/new\nline.txt", edit(text(20_000, 7), 3, 7))
    sparse(os.path.join(root, "sparse.img"), 12 << 20, [(0, rbytes(8192)), (5 << 20, edit(text(8192, 8)))])
    w(root, "sparse-copy-dense.bin", text(8192, 8))
    os.mkfifo(os.path.join(root, "fifo"))
    os.mknod(os.path.join(root, "null"), 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(os.path.join(root, "blk2"), 0o660 | 0o060000, os.makedev(7, 1))
    w(root, "d2becomesfile", text(9000, 9))
    w(root, "filebecomesdir/inner", edit(text(9000, 9), 2, 8))
    w(root, "bz/pkg.tar.xz", edit(rbytes(70_000), 3, 9))
    w(root, "ro/readonly-0444", edit(text(15_000, 10), 2, 10), 0o444)
    # one source, several targets (issue #2)
    pyc = text(40_000, 11)
    w(root, "pyc/a.pyc", pyc)
    w(root, "pyc/b.pyc", edit(pyc, 4, 11))
    w(root, "pyc/c.pyc", edit(pyc, 9, 12))
    w(root, "zero-len-then-big", rbytes(3000))


def case(name):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    return d


def mk_basic(dot):
    d = case("adv-dotslash" if dot else "adv-basic")
    for which, fn in (("old", tree_old), ("new", tree_new)):
        root = os.path.join(d, which + ".tree")
        os.makedirs(root)
        fn(root)
        gnutar(root, os.path.join(d, which + ".tar"), dot=dot and which == "old")
        subprocess.run(["rm", "-rf", root], check=True)


def mk_dup():
    """Old tar holds the same path twice (tar -r); the first copy is gone on disk."""
    d = case("adv-dup-entries")
    t = os.path.join(d, "t")
    os.makedirs(t)
    first, second = text(60_000, 20), text(60_000, 21)
    w(t, "etc/f.conf", first)
    gnutar(t, os.path.join(d, "old.tar"))
    w(t, "etc/f.conf", second)
    subprocess.run(["tar", "--format=pax", "--numeric-owner", "-C", t, "-rf",
                    os.path.join(d, "old.tar"), "etc/f.conf"], check=True)
    # same tar: a regular file, then a symlink under the same path (tar -x replaces it)
    os.makedirs(os.path.join(t, "etc3"))
    w(t, "etc3/g", text(60_000, 22))
    subprocess.run(["tar", "--format=pax", "--numeric-owner", "-C", t, "-rf",
                    os.path.join(d, "old.tar"), "etc3/g"], check=True)
    os.unlink(os.path.join(t, "etc3/g"))
    os.symlink("../etc/f.conf", os.path.join(t, "etc3/g"))
    subprocess.run(["tar", "--format=pax", "--numeric-owner", "-C", t, "-rf",
                    os.path.join(d, "old.tar"), "etc3/g"], check=True)
    subprocess.run(["rm", "-rf", t], check=True)
    os.makedirs(t)
    w(t, "etc/f.conf", edit(second, 3, 1))
    w(t, "etc2/f.conf", edit(first, 3, 2))  # fuzzy match on basename must not pick copy 1
    w(t, "etc4/g", edit(text(60_000, 22), 3, 3))  # must not use etc3/g (now a symlink)
    gnutar(t, os.path.join(d, "new.tar"))
    subprocess.run(["rm", "-rf", t], check=True)


def mk_multi():
    """Two old layers: the second overwrites, whites out and retypes files of the first."""
    d = case("adv-multi-old")
    t = os.path.join(d, "t")
    os.makedirs(t)
    w(t, "usr/a", text(50_000, 30))
    w(t, "usr/b", text(50_000, 31))
    w(t, "usr/gone", text(50_000, 32))
    w(t, "usr/tolink", text(50_000, 34))
    w(t, "usr/todir", text(50_000, 35))
    w(t, "usr/hl-orig", text(50_000, 36))
    os.link(os.path.join(t, "usr/hl-orig"), os.path.join(t, "usr/hl-alias"))
    gnutar(t, os.path.join(d, "old.tar"))
    subprocess.run(["rm", "-rf", t], check=True)
    os.makedirs(t)
    w(t, "usr/a", text(50_000, 33))
    w(t, "usr/.wh.gone", b"")
    os.symlink("a", os.path.join(t, "usr/tolink"))
    w(t, "usr/todir/inner", b"x")
    w(t, "usr/hl-alias", text(50_000, 37))  # only the hardlink entry name keeps the old1 bytes
    gnutar(t, os.path.join(d, "old2.tar"))
    subprocess.run(["rm", "-rf", t], check=True)
    os.makedirs(t)
    w(t, "usr/a", edit(text(50_000, 33), 3, 1))
    w(t, "usr/b", edit(text(50_000, 31), 3, 2))
    w(t, "usr/gone2", edit(text(50_000, 32), 3, 3))
    w(t, "usr/tolink2", edit(text(50_000, 34), 3, 4))
    w(t, "usr/todir2", edit(text(50_000, 35), 3, 5))
    w(t, "usr/hl-orig", edit(text(50_000, 36), 3, 6))
    w(t, "usr/hl-alias", edit(text(50_000, 36), 4, 7))
    gnutar(t, os.path.join(d, "new.tar"))
    subprocess.run(["rm", "-rf", t], check=True)


def pyadd(tf, name, data, **kw):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 1600000000
    for k, v in kw.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data))


def mk_pytar():
    """GNU-format tars from Python: ././@LongLink names, odd separators, a V7 '\\0' type."""
    d = case("adv-gnu-oddnames")
    base = text(40_000, 40)
    long = "usr/share/" + "x" * 180 + "/file.txt"
    with tarfile.open(os.path.join(d, "old.tar"), "w", format=tarfile.GNU_FORMAT) as tf:
        pyadd(tf, "usr//lib/./libx.so", base)
        pyadd(tf, long, text(40_000, 41))
        pyadd(tf, "/abs/path.txt", text(40_000, 42))
        pyadd(tf, "v7file", text(40_000, 43), type=tarfile.AREGTYPE)
    with tarfile.open(os.path.join(d, "new.tar"), "w", format=tarfile.GNU_FORMAT) as tf:
        pyadd(tf, "./usr/lib/libx.so", edit(base, 3, 1))
        pyadd(tf, long, edit(text(40_000, 41), 3, 2))
        pyadd(tf, "abs/path.txt", edit(text(40_000, 42), 3, 3))
        pyadd(tf, "v7file", edit(text(40_000, 43), 3, 4), type=tarfile.AREGTYPE)


def mk_paxx():
    """PAX tars from Python with binary security.capability xattrs and 300-byte PAX paths."""
    d = case("adv-pax-xattr")
    cap1 = bytes.fromhex("0100000200100000000000000000000000000000").decode("utf-8", "surrogateescape")
    cap2 = bytes.fromhex("01000002002000000000000000000000ff000000").decode("utf-8", "surrogateescape")
    longp = "/".join(["seg%03d" % i + "y" * 20 for i in range(12)]) + "/leaf.bin"
    body = text(64_000, 60)
    with tarfile.open(os.path.join(d, "old.tar"), "w", format=tarfile.PAX_FORMAT) as tf:
        pyadd(tf, "usr/bin/ping", body, pax_headers={"SCHILY.xattr.security.capability": cap1})
        pyadd(tf, longp, text(64_000, 61), pax_headers={"SCHILY.xattr.user.k": "v" * 300})
        pyadd(tf, "usr/bin/ping-link", b"", type=tarfile.LNKTYPE, linkname="usr/bin/ping")
    with tarfile.open(os.path.join(d, "new.tar"), "w", format=tarfile.PAX_FORMAT) as tf:
        pyadd(tf, "usr/bin/ping", edit(body, 3, 1), pax_headers={"SCHILY.xattr.security.capability": cap2})
        pyadd(tf, longp, edit(text(64_000, 61), 3, 2), pax_headers={"SCHILY.xattr.user.k": "w" * 300})
        pyadd(tf, "usr/bin/" + "L" * 250, b"", type=tarfile.SYMTYPE, linkname="/" + "t" * 300)
        pyadd(tf, "usr/sbin/ping-moved", edit(body, 5, 3))


def mk_big():
    """A file over 64 MiB with scattered edits: ADD ops must be split below Go's 100 MiB cap."""
    d = case("adv-big-file")
    t = os.path.join(d, "t")
    os.makedirs(t)
    blob = bytearray(text(1 << 20, 50) * 80)
    w(t, "big.bin", bytes(blob))
    gnutar(t, os.path.join(d, "old.tar"))
    for i in range(0, len(blob), 7 << 20):
        blob[i : i + 16] = b"CHANGEDCHANGED!!"
    w(t, "big.bin", bytes(blob))
    gnutar(t, os.path.join(d, "new.tar"))
    subprocess.run(["rm", "-rf", t], check=True)


which = sys.argv[2:] or ["basic", "dotslash", "dup", "multi", "pytar", "paxx"]
for c in which:
    {"basic": lambda: mk_basic(False), "dotslash": lambda: mk_basic(True), "dup": mk_dup,
     "multi": mk_multi, "pytar": mk_pytar, "paxx": mk_paxx, "big": mk_big}[c]()
PY
}

if [ -n "$BUILD_ONLY" ]; then
  build_only
  exit 0
fi
build_tar_patch
step_fixtures
step_pairs
step_adversarial
report
