#!/usr/bin/env bash
# podman-delta demo: one command on a fresh Debian 12 machine, as root.
#
#   sudo demo/run.sh
#
# 1. installs what it needs (tests/setup.sh: podman, buildah, docker-registry, a .venv);
# 2. starts a docker-registry on 127.0.0.1 (free port, temporary directory);
# 3. builds two versions of a small image from files already on this machine (no internet):
#    v1 = a ~35 MB Debian-like base layer + an app layer; v2 = the same after a "security
#    update" (OpenSSL rebuilt, a config changed, a file added, one removed) and an app update;
# 4. pushes both with podman and publishes the v1 -> v2 deltas with `podman-delta publish`;
# 5. measures a plain `podman pull` of v2 over v1, then `podman-delta pull` of v2 over v1 in
#    another store, both from the registry's access log, and prints the two side by side.
#
# Nothing on the host is changed besides the installed packages: every store is private
# (--root/--runroot under a temporary directory) and podman's global blob-info-cache is
# replaced by a tmpfs in a private mount namespace. Everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_DIR=$PWD

if [ -z "${PD_DEMO_INNER:-}" ]; then
	[ "$(id -u)" = 0 ] || { echo "demo: run as root (sudo demo/run.sh)" >&2; exit 1; }
	echo "== installing what the demo needs (tests/setup.sh) =="
	bash tests/setup.sh
	mkdir -p /var/lib/containers/cache
	# A private mount namespace: the tmpfs over podman's blob-info-cache is ours alone.
	exec unshare -m --propagation private env PD_DEMO_INNER=1 bash "$0" "$@"
fi

mount -t tmpfs -o mode=0700 tmpfs /var/lib/containers/cache
START=$(date +%s)
export PATH="$REPO_DIR/.venv/bin:$PATH"
export PODMAN_DELTA_DISABLE=1
W=$(mktemp -d /tmp/podman-delta-demo.XXXXXX)
REG_PID=''
cleanup() {
	set +e
	[ -n "$REG_PID" ] && kill "$REG_PID" 2>/dev/null && wait "$REG_PID" 2>/dev/null
	for s in build plain delta; do
		[ -d "$W/$s" ] && podman --root "$W/$s/root" --runroot "$W/$s/run" --storage-driver vfs \
			rmi -a -f >/dev/null 2>&1
	done
	rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# podman that works here: runc with explicit ulimits, no network namespace (see
# /work/shared/reference/environment.md §3.1); crun works on most other machines too.
cat >"$W/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$W/containers.conf
STORAGE_OPTS=(--storage-driver vfs)
pm() { local s=$1; shift; podman --root "$W/$s/root" --runroot "$W/$s/run" "${STORAGE_OPTS[@]}" "$@"; }
bah() { local s=$1; shift; buildah --root "$W/$s/root" --runroot "$W/$s/run" "${STORAGE_OPTS[@]}" "$@"; }

# -- 1. registry on 127.0.0.1
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
mkdir -p "$W/reg/data"
cat >"$W/reg/config.yml" <<EOF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $W/reg/data}, delete: {enabled: true}}
http: {addr: '$REG', secret: demo-only-secret}
EOF
docker-registry serve "$W/reg/config.yml" >>"$W/reg/log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "http://$REG/v2/" >/dev/null || { echo "demo: the registry did not start" >&2; exit 1; }
echo "== registry on $REG =="

# bytes of blob GETs in the registry's access log since the last reset
blob_bytes() {
	grep -o '"GET /v2/[^ ]*/blobs/sha256:[0-9a-f]* HTTP/[0-9.]*" 20[06] [0-9]*' "$W/reg/log" |
		awk '{ s += $NF } END { print s + 0 }'
}
layer_gets() { # how many of the given layer digests were fetched
	local n=0 d
	for d in "$@"; do grep -q "GET /v2/[^ ]*/blobs/$d " "$W/reg/log" && n=$((n + 1)); done
	echo $n
}
reset_log() { : >"$W/reg/log"; }
mb() { awk -v b="$1" 'BEGIN { if (b >= 1e6) printf "%.1f MB", b / 1e6; else printf "%.1f kB", b / 1e3 }'; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f s", b - a }'; }

# -- 2. two versions of an image, from files on this machine
echo "== building v1 and v2 from this machine's files (no internet) =="
python3 demo/make_images.py "$W/tars"
IMG=$REG/demo/app
build() { # build VERSION BASE_TAR APP_TAR
	local v=$1 ctr
	pm build import -q --change 'CMD ["/opt/app/bin/app"]' "$2" "localhost/demo-base:$v" >/dev/null
	ctr=$(bah build from -q "localhost/demo-base:$v")
	bah build add -q "$ctr" "$3" / >/dev/null
	bah build config --cmd /opt/app/bin/app --label "org.opencontainers.image.version=$v" "$ctr"
	bah build commit -q "$ctr" "$IMG:$v" >/dev/null
	bah build rm "$ctr" >/dev/null
}
build v1 "$W/tars/base1.tar" "$W/tars/app1.tar"
build v2 "$W/tars/base2.tar" "$W/tars/app2.tar"
echo "== pushing v1 and v2 with podman =="
pm build push -q --tls-verify=false "$IMG:v1"
pm build push -q --tls-verify=false "$IMG:v2"
read -ra V2_LAYERS <<<"$(skopeo inspect --tls-verify=false --raw "docker://$IMG:v2" |
	python3 -c 'import json,sys; print(" ".join(l["digest"] for l in json.load(sys.stdin)["layers"]))')"

echo "== publishing the v1 -> v2 deltas (podman-delta publish) =="
t0=$(now)
podman-delta publish --tls-verify=false "$IMG:v1" "$IMG:v2"
echo "   (took $(secs "$t0" "$(now)"))"

# Forget what the build and push taught podman's blob-info-cache: the clients start clean.
umount /var/lib/containers/cache
mount -t tmpfs -o mode=0700 tmpfs /var/lib/containers/cache

# -- 3. a plain podman pull of v2 over v1
echo "== plain podman pull: v1, then v2 =="
pm plain pull -q --tls-verify=false "$IMG:v1" >/dev/null
reset_log
t0=$(now)
pm plain pull -q --tls-verify=false "$IMG:v2" >/dev/null
PLAIN_TIME=$(secs "$t0" "$(now)")
PLAIN_BYTES=$(blob_bytes)
PLAIN_LAYERS=$(layer_gets "${V2_LAYERS[@]}")
umount /var/lib/containers/cache
mount -t tmpfs -o mode=0700 tmpfs /var/lib/containers/cache

# -- 4. podman pull v1, then podman-delta pull v2, in another store
echo "== podman pull v1, then podman-delta pull v2 =="
pm delta pull -q --tls-verify=false "$IMG:v1" >/dev/null
reset_log
t0=$(now)
podman-delta pull --tls-verify=false --root "$W/delta/root" --runroot "$W/delta/run" \
	--storage-driver vfs "$IMG:v2"
DELTA_TIME=$(secs "$t0" "$(now)")
DELTA_BYTES=$(blob_bytes)
DELTA_LAYERS=$(layer_gets "${V2_LAYERS[@]}")

# -- 5. the same image, and a following podman pull downloads no layer
ID_PLAIN=$(pm plain image inspect --format '{{.Id}}' "$IMG:v2")
ID_DELTA=$(pm delta image inspect --format '{{.Id}}' "$IMG:v2")
DIG_PLAIN=$(pm plain image inspect --format '{{.RepoDigests}}' "$IMG:v2")
DIG_DELTA=$(pm delta image inspect --format '{{.RepoDigests}}' "$IMG:v2")
reset_log
pm delta pull -q --tls-verify=false "$IMG:v2" >/dev/null
AFTER_LAYERS=$(layer_gets "${V2_LAYERS[@]}")
RUN_OUT=$(pm delta run --rm "$IMG:v2" 2>&1) || RUN_OUT="(podman run failed here: $RUN_OUT)"

echo
echo "================================ result ================================"
printf '%-34s %18s %18s\n' "v2 over v1 (2 layers, both changed)" "plain podman pull" "podman-delta pull"
printf '%-34s %18s %18s\n' "bytes from the registry (blobs)" "$(mb "$PLAIN_BYTES")" "$(mb "$DELTA_BYTES")"
printf '%-34s %18s %18s\n' "layer blobs downloaded" "$PLAIN_LAYERS" "$DELTA_LAYERS"
printf '%-34s %18s %18s\n' "time (loopback, no bandwidth limit)" "$PLAIN_TIME" "$DELTA_TIME"
est() { awk -v t="${1% s}" -v b="$2" -v r="$3" 'BEGIN { printf "%.1f s", t + b * 8 / r }'; }
printf '%-34s %18s %18s\n' "estimated at 20 Mbit/s (+ transfer)" "$(est "$PLAIN_TIME" "$PLAIN_BYTES" 20e6)" \
	"$(est "$DELTA_TIME" "$DELTA_BYTES" 20e6)"
awk -v p="$PLAIN_BYTES" -v d="$DELTA_BYTES" \
	'BEGIN { if (p > 0) printf "podman-delta fetched %.1f%% of the plain pull'"'"'s bytes (%.1f%% saved)\n", 100*d/p, 100*(p-d)/p }'
if [ "$ID_PLAIN" = "$ID_DELTA" ] && [ "$DIG_PLAIN" = "$DIG_DELTA" ]; then
	echo "same image as the plain pull: ID ${ID_DELTA:0:12}, RepoDigests $DIG_DELTA"
else
	echo "DIFFERENT images: plain $ID_PLAIN $DIG_PLAIN, delta $ID_DELTA $DIG_DELTA" >&2
	exit 1
fi
echo "a following podman pull of v2 downloaded $AFTER_LAYERS layer blob(s)"
echo "podman run --rm $IMG:v2 -> $RUN_OUT"
echo "demo done in $(($(date +%s) - START)) s (after setup)"
