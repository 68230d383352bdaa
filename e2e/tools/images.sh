#!/usr/bin/env bash
# Builds the container images the clusters run — Weft's own and the upstream ones its samples and
# the Kubernetes e2e tests name — without a Docker daemon, into one persistent OCI registry store
# ($WEFT_CACHE/registry). Each cluster later serves that store read-only through containerd
# mirrors (`override_path`), so repositories are named `<upstream registry host>/<repo>`.
#
# How: Debian root filesystems from mmdebstrap, files staged by hand, each layer a GNU tar made
# reproducibly; `crane append` pushes the layers onto an empty OCI base and `crane mutate` sets
# the config, against a temporary docker-registry on 127.0.0.1. Same inputs give the same digests.
# A second run with unchanged inputs takes seconds: images are stamped by a hash of their inputs,
# root filesystems and Go/C builds are cached by their recipe under $WEFT_CACHE/images.
# Prints `<image> <digest> <compressed size>` per image at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SELF="$ROOT/e2e/tools/images.sh"
WEFT_CACHE=${WEFT_CACHE:-/var/cache/weft}
K8S_VERSION=${K8S_VERSION:-v1.35.4}
BIN="$WEFT_CACHE/bin"
STORE="$WEFT_CACHE/registry"
WORK="$WEFT_CACHE/images"
CRANE="$BIN/crane"
# Read, never written: the host's own apt sources, so the mirror is whatever this machine uses.
APT_SOURCES=${APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
[[ -f $APT_SOURCES ]] || APT_SOURCES=/etc/apt/sources.list
SUITE=bookworm
WEFT_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -1)
ARCH=$(dpkg --print-architecture)
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0 SOURCE_DATE_EPOCH=0 LC_ALL=C.UTF-8 TZ=UTC
PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# Short hash of its arguments (NUL-separated so ("a b") and ("a" "b") differ).
key() { printf '%s\0' "$@" | sha256sum | cut -c1-16; }

[[ -x $CRANE ]] || die "$CRANE missing: run e2e/tools/install.sh (make tools)"
mkdir -p "$STORE" "$WORK"/{layers,bin,stamps,debs,tmp}
TMP=$(mktemp -d "$WORK/tmp/run.XXXXXX")
REG_PID=""
ROOTFS_PID=""
cleanup() {
  local rc=$?
  if [[ -n $ROOTFS_PID ]]; then kill -TERM -- "-$ROOTFS_PID" 2>/dev/null || true; wait "$ROOTFS_PID" 2>/dev/null || true; fi
  if [[ -n $REG_PID ]]; then kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- layers -------------------------------------------------------------------------------------

# tar_layer DIR OUT [--keep-owners]: DIR's content as a reproducible tar (sorted, mtime 0, no
# atime/ctime, fixed pax header names). Staged files are all root's; a Debian rootfs keeps dpkg's
# owners (--keep-owners: www-data's nginx logs, the shadow group, …), which are deterministic too.
tar_layer() {
  local dir=$1 out=$2 owners=(--owner=0 --group=0)
  [[ ${3:-} == --keep-owners ]] && owners=()
  tar -C "$dir" --sort=name --mtime=@0 "${owners[@]}" --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf "$out" .
}

# gz_layer TAR OUT: compresses once, reproducibly (-n: no name, no time). crane takes a gzipped
# layer as it is, so a layer shared by several images is compressed once, not once per push.
gz_layer() {
  gzip -n -6 -c "$1" >"$2.tmp"
  mv "$2.tmp" "$2"
}

# file_layer NAME DIR [--keep-owners]: a staged DIR as layers/NAME-<content hash>.tar.gz; prints
# its path. Staged layers are re-tarred every run (cheap) and named by what they hold, so only
# new content is compressed.
file_layer() {
  local name=$1 dir=$2 tmp="$TMP/$1.tar" sum
  tar_layer "$dir" "$tmp" "${@:3}"
  sum=$(sha256sum "$tmp" | cut -c1-16)
  local out="$WORK/layers/$name-$sum.tar.gz"
  [[ -f $out ]] || gz_layer "$tmp" "$out"
  rm -f "$tmp"
  echo "$out"
}

# rootfs NAME VARIANT FINISH PKG…: a Debian root filesystem as one layer, cached by its recipe
# (these functions, the package list, the apt sources, mmdebstrap's version). VARIANT is
# mmdebstrap's: `essential` (the Essential:yes packages, no apt) or `extract` (only PKG… and
# their dependencies, unpacked without maintainer scripts: a distroless base). FINISH is a
# function run on the tree before it is packed. The mirror may move on between two builds
# (security updates); a cached rootfs does not, and nothing else here looks at the network.
rootfs() {
  local name=$1 variant=$2 finish=$3
  shift 3
  local pkgs
  pkgs=$(printf '%s\n' "$@" | sort -u | paste -sd, -)
  local k
  k=$(key "$(declare -f rootfs rootfs_trim tar_layer gz_layer "$finish")" "$variant" "$pkgs" \
    "$(cat "$APT_SOURCES")" "$(mmdebstrap --version)" "$SUITE" "$ARCH" "${FINISH_INPUT:-}")
  local out="$WORK/layers/rootfs-$name-$k.tar.gz"
  if [[ ! -f $out ]]; then
    log "rootfs $name ($variant): $pkgs"
    local dir="$TMP/rootfs-$name"
    mkdir "$dir"
    # A private mount namespace: mmdebstrap's /proc, /sys and /dev mounts die with it, even when
    # killed. The .deb cache is synced in and out, so rebuilds download only what changed.
    # path-exclude keeps docs (but copyrights), man pages, info and translations out.
    unshare --mount --propagation private -- mmdebstrap --quiet --mode=root --variant="$variant" \
      --format=directory --architectures="$ARCH" --include="$pkgs" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
      --skip=essential/unlink \
      --setup-hook='mkdir -p "$1"/var/cache/apt/archives' \
      --setup-hook="sync-in $WORK/debs /var/cache/apt/archives/" \
      --customize-hook="sync-out /var/cache/apt/archives $WORK/debs" \
      "$SUITE" "$dir" - <"$APT_SOURCES" >&2
    rootfs_trim "$dir"
    "$finish" "$dir"
    tar_layer "$dir" "$TMP/rootfs-$name.tar" --keep-owners
    rm -rf "$dir"
    gz_layer "$TMP/rootfs-$name.tar" "$out"
    rm -f "$TMP/rootfs-$name.tar"
  fi
  echo "$out"
}

finish_none() { :; }

# The distroless base (as gcr.io/distroless/cc: libc, libgcc, CA certificates, /etc/passwd with
# nonroot 65532): no shell, no dpkg. The CA bundle is the one ca-certificates' postinst made in
# the net rootfs (FINISH_INPUT), since extract runs no maintainer scripts.
finish_distroless() {
  local r=$1
  tar -C "$r" -xzf "$FINISH_INPUT" ./etc/ssl/certs/ca-certificates.crt
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\nnonroot:x:65532:\n' >"$r/etc/group"
  install -d -o 65532 -g 65532 -m 0700 "$r/home/nonroot"
  chmod 1777 "$r/tmp"
  rm -rf "$r/usr/share/lintian" "$r/usr/share/dict" "$r/etc/update-motd.d"
}

# What an image does not need, or what would differ between machines: the build host's
# hostname/resolv.conf (left empty: the runtime bind-mounts over them, even on a read-only rootfs),
# the apt sources and state (no apt inside), logs (dirs kept: nginx opens its default log path
# before reading its config), caches, device nodes (the runtime makes /dev), dpkg backups.
rootfs_trim() {
  local r=$1
  : >"$r/etc/hostname"
  # (the runtime mounts its own /etc/hosts too; this one is for chroots and hostless runs)
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' >"$r/etc/hosts"
  : >"$r/etc/resolv.conf"
  chmod 0644 "$r/etc/hostname" "$r/etc/resolv.conf" "$r/etc/hosts"
  rm -rf "$r"/etc/apt/sources.list.d/* "$r"/etc/apt/sources.list "$r"/var/lib/apt "$r"/var/cache/apt \
    "$r"/var/cache/ldconfig/aux-cache "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old \
    "$r"/usr/share/man "$r"/usr/share/info "$r"/dev/* "$r"/tmp/* "$r"/var/tmp/* "$r"/run/*
  find "$r/var/log" -type f -delete
  find "$r/usr/share/doc" -type f ! -name copyright -delete 2>/dev/null || true
}

# --- binaries ------------------------------------------------------------------------------------

# Weft's release binaries. Debug info stripped (the symbols stay, so backtraces keep function
# names): 117 MB → 17 MB for the agent.
weft_binaries() {
  log "cargo build --release (weft-agent, weft-cni, weft-operator)"
  (cd "$ROOT" && cargo build --release --quiet -p weft-agent -p weft-operator --bins)
  mkdir -p "$TMP/weft"
  for b in weft-agent weft-cni weft-operator; do
    objcopy --strip-debug "$ROOT/target/release/$b" "$TMP/weft/$b"
  done
}

go_static() { # OUT DIR PKG [LDFLAGS]: a static, reproducible Go build
  (cd "$2" && go build -trimpath -buildvcs=false -ldflags "-s -w -buildid= ${4:-}" -o "$1.tmp" "$3") && mv "$1.tmp" "$1"
}

# agnhost and regression-issue-74839 are packages of the k8s.io/kubernetes module itself: build
# them from a scratch module that requires it and replaces each staging module (k8s.io/api, …)
# with its published v0.Y.Z, as install.sh does for the Kubernetes binaries.
k8s_test_binaries() {
  local k
  k=$(key "$(declare -f k8s_test_binaries go_static)" "$K8S_VERSION" "$(go version)")
  AGNHOST="$WORK/bin/agnhost-$k"
  REGRESSION="$WORK/bin/regression-issue-74839-$k"
  K8S_SRC=$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION
  [[ -f $AGNHOST && -f $REGRESSION && -d $K8S_SRC ]] && return
  log "go build agnhost, regression-issue-74839 (k8s.io/kubernetes $K8S_VERSION)"
  local src="$WEFT_CACHE/src/k8s-test-images-$K8S_VERSION" staging="v0.${K8S_VERSION#v1.}"
  mkdir -p "$src"
  local upstream_mod
  upstream_mod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  {
    echo "module weft.local/k8stestimages"
    echo "go 1.25.0"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^\s+k8s\.io/[a-z0-9-]+ => \./staging' "$upstream_mod" |
      awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >"$src/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "k8s.io/kubernetes/test/images/agnhost"\n\t_ "k8s.io/kubernetes/test/images/regression-issue-74839"\n)\n' >"$src/tools.go"
  (cd "$src" && go mod tidy >&2)
  K8S_SRC=$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION
  # `agnhost --version` says the version, as upstream's Makefile sets it.
  go_static "$AGNHOST" "$src" k8s.io/kubernetes/test/images/agnhost \
    "-X main.Version=$(cat "$K8S_SRC/test/images/agnhost/VERSION")"
  go_static "$REGRESSION" "$src" k8s.io/kubernetes/test/images/regression-issue-74839
}

# The Go module proxy refuses github.com/traefik/whoami ("not available"), so this is a stand-in
# with the standard library only: same output as traefik/whoami (Hostname, IP per address,
# RemoteAddr, then the request as Go's Request.Write prints it), same flags and env, and its
# /api, /health, /bench, /data, ?wait= and ?env=true. Not /echo (websockets).
whoami_binary() {
  local src="$WEFT_CACHE/src/whoami-standin" k
  k=$(key "$(declare -f whoami_binary go_static)" "$(go version)")
  WHOAMI="$WORK/bin/whoami-$k"
  [[ -f $WHOAMI ]] && return
  log "go build whoami (stand-in)"
  mkdir -p "$src"
  printf 'module weft.local/whoami\n\ngo 1.25.0\n' >"$src/go.mod"
  cat >"$src/main.go" <<'GO'
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

var (
	port    = flag.String("port", envOr("WHOAMI_PORT_NUMBER", "80"), "give me a port number")
	name    = flag.String("name", os.Getenv("WHOAMI_NAME"), "give me a name")
	verbose = flag.Bool("verbose", false, "enable verbose logging")
	health  atomic.Int32
)

func envOr(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func ips() []string {
	var out []string
	ifaces, _ := net.Interfaces()
	for _, i := range ifaces {
		addrs, _ := i.Addrs()
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				out = append(out, n.IP.String())
			}
		}
	}
	return out
}

func wait(r *http.Request) {
	if d, err := time.ParseDuration(r.URL.Query().Get("wait")); err == nil {
		time.Sleep(d)
	}
}

func whoami(w http.ResponseWriter, r *http.Request) {
	wait(r)
	host, _ := os.Hostname()
	if *name != "" {
		fmt.Fprintln(w, "Name:", *name)
	}
	fmt.Fprintln(w, "Hostname:", host)
	for _, ip := range ips() {
		fmt.Fprintln(w, "IP:", ip)
	}
	fmt.Fprintln(w, "RemoteAddr:", r.RemoteAddr)
	_ = r.Write(w)
	if ok, _ := strconv.ParseBool(r.URL.Query().Get("env")); ok {
		for _, e := range os.Environ() {
			fmt.Fprintln(w, e)
		}
	}
}

func api(w http.ResponseWriter, r *http.Request) {
	wait(r)
	host, _ := os.Hostname()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"hostname": host, "ip": ips(), "headers": r.Header, "url": r.URL.RequestURI(),
		"host": r.Host, "method": r.Method, "name": *name, "remoteAddr": r.RemoteAddr,
	})
}

func healthz(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		b, _ := io.ReadAll(r.Body)
		code, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || code < 100 || code > 599 {
			http.Error(w, "bad status code", http.StatusBadRequest)
			return
		}
		health.Store(int32(code))
		return
	}
	w.WriteHeader(int(health.Load()))
}

func data(w http.ResponseWriter, r *http.Request) {
	wait(r)
	size, err := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
	if err != nil || size < 0 {
		size = 1
	}
	switch strings.ToLower(r.URL.Query().Get("unit")) {
	case "kb":
		size <<= 10
	case "mb":
		size <<= 20
	case "gb":
		size <<= 30
	}
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	chunk := []byte(strings.Repeat("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 1260))
	for size > 0 {
		n := int64(len(chunk))
		if size < n {
			n = size
		}
		if _, err := w.Write(chunk[:n]); err != nil {
			return
		}
		size -= n
	}
}

func logged(h http.HandlerFunc) http.HandlerFunc {
	if !*verbose {
		return h
	}
	return func(w http.ResponseWriter, r *http.Request) {
		log.Println(r.RemoteAddr, r.Method, r.URL)
		h(w, r)
	}
}

func main() {
	flag.Parse()
	health.Store(http.StatusOK)
	http.HandleFunc("/", logged(whoami))
	http.HandleFunc("/api", logged(api))
	http.HandleFunc("/health", logged(healthz))
	http.HandleFunc("/data", logged(data))
	http.HandleFunc("/bench", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprint(w, "1")
	})
	log.Printf("Starting up on port %s", *port)
	log.Fatal(http.ListenAndServe(":"+*port, nil))
}
GO
  go_static "$WHOAMI" "$src" .
}

# Kubernetes' own pause, from the kubernetes module, built as its Makefile does (static, -Os).
pause_binary() {
  local c="$K8S_SRC/build/pause/linux/pause.c" k
  k=$(key "$(declare -f pause_binary)" "$(sha256sum <"$c")" "$(gcc --version | head -1)")
  PAUSE="$WORK/bin/pause-$k"
  [[ -f $PAUSE ]] && return
  log "gcc pause"
  gcc -Os -Wall -Werror -static -DVERSION=v3.10.1-weft -o "$PAUSE.tmp" "$c"
  strip "$PAUSE.tmp"
  mv "$PAUSE.tmp" "$PAUSE"
}

# --- registry ------------------------------------------------------------------------------------

start_registry() {
  cat >"$TMP/registry.yml" <<EOF
version: 0.1
log: {level: info, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $STORE}
  delete: {enabled: true}
http: {addr: "127.0.0.1:0"}
EOF
  # Port 0: the kernel picks a free port; the registry logs which.
  docker-registry serve "$TMP/registry.yml" >"$TMP/registry.log" 2>&1 &
  REG_PID=$!
  local i addr=""
  for i in $(seq 100); do
    addr=$(sed -n 's/.*msg="listening on \(127\.0\.0\.1:[0-9]*\)".*/\1/p' "$TMP/registry.log")
    [[ -n $addr ]] && break
    kill -0 "$REG_PID" 2>/dev/null || { cat "$TMP/registry.log" >&2; die "docker-registry exited"; }
    sleep 0.1
  done
  [[ -n $addr ]] || die "docker-registry did not start"
  REG=$addr
}

stop_registry() {
  kill "$REG_PID"
  wait "$REG_PID" 2>/dev/null || true
  REG_PID=""
}

crane() { "$CRANE" --insecure "$@"; }
# quiet CMD…: crane logs every blob; show that only when it fails.
quiet() { "$@" 2>"$TMP/quiet.log" || { cat "$TMP/quiet.log" >&2; return 1; }; }

PUSHED=0
ALL_REFS=()
# image 'REF [REF…]' LAYER… -- MUTATE-ARG…: pushes the layers onto an empty OCI base as the first
# REF, sets the config, tags the other REFs. Skipped when the stamp of its inputs (this script,
# the layers' content-named files, the config) exists and every REF is in the store.
image() {
  local refs=($1) layers=() args=() seen=false r
  shift
  while (($#)); do
    if [[ $1 == -- ]]; then seen=true; elif $seen; then args+=("$1"); else layers+=("$1"); fi
    shift
  done
  ALL_REFS+=("${refs[@]}")
  local stamp
  stamp="$WORK/stamps/$(echo "${refs[0]}" | tr '/:' '__')-$(key "$(sha256sum <"$SELF")" "${refs[@]}" "${layers[@]##*/}" "${args[@]}")"
  if [[ -f $stamp ]]; then
    local present=true
    for r in "${refs[@]}"; do crane manifest "$REG/$r" >/dev/null 2>&1 || present=false; done
    $present && return
  fi
  log "push ${refs[*]}"
  local first="$REG/${refs[0]}" staging="$REG/${refs[0]%:*}:weft-build" fl=()
  for r in "${layers[@]}"; do fl+=(-f "$r"); done
  # crane append writes zero timestamps and no history times; mutate keeps them.
  quiet crane append --oci-empty-base "${fl[@]}" -t "$staging" >/dev/null
  quiet crane mutate "$staging" --set-platform "linux/$ARCH" "${args[@]}" -t "$first" >/dev/null
  # The intermediate manifest (no config yet) is dropped; garbage-collect removes its blobs.
  quiet crane delete "$staging@$(crane digest "$staging")"
  for r in "${refs[@]:1}"; do quiet crane copy "$first" "$REG/$r"; done
  rm -f "$WORK/stamps/$(echo "${refs[0]}" | tr '/:' '__')"-*
  touch "$stamp"
  PUSHED=1
}

# stage DIR: a fresh staging directory under $TMP
stage() { rm -rf "$TMP/stage/$1" && mkdir -p "$TMP/stage/$1" && echo "$TMP/stage/$1"; }

# --- the images ----------------------------------------------------------------------------------

# Three Debian root filesystems, each the first layer of several images:
# net — the node agent (iptables legacy and nft, nftables, conntrack, iproute2, nginx for
# ingress, setpriv), also the e2e nginx and distroless-iptables images;
# (usr-is-merged: else apt satisfies init-system-helpers' "usrmerge | usr-is-merged" with
# usrmerge, which brings all of perl: 50 MB.)
NET_PKGS=(usr-is-merged iptables nftables conntrack iproute2 nginx-light util-linux procps ca-certificates)
# tools — netshoot's kind of tool box, also agnhost's base (upstream: alpine + bind-tools curl
# netcat-openbsd iproute2 iperf bash, and busybox's wget, which the Services e2e tests exec) and
# jessie-dnsutils' (Debian + dnsutils);
TOOLS_PKGS=(usr-is-merged curl wget dnsutils iperf3 iperf tcpdump netcat-openbsd iputils-ping iproute2 zsh procps
  ca-certificates bash conntrack)
# base — distroless: libc, libgcc, netbase, CA certificates; the operator, regression-issue-74839.
BASE_PKGS=(libc6 libgcc-s1 base-files netbase)

build_rootfs() {
  L_NET=$(rootfs net essential finish_none "${NET_PKGS[@]}")
  L_TOOLS=$(rootfs tools essential finish_none "${TOOLS_PKGS[@]}")
  L_BASE=$(FINISH_INPUT=$L_NET rootfs base extract finish_distroless "${BASE_PKGS[@]}")
}
if [[ ${1:-} == --rootfs-only ]]; then build_rootfs; exit 0; fi

# The root filesystems (downloads, dpkg) are built by a second instance of this script, in its
# own process group (killed as a whole if this one fails), while cargo and go compile: a minute
# off a cold run. Afterwards build_rootfs here finds them all cached.
setsid bash "$SELF" --rootfs-only >"$TMP/rootfs.log" 2>&1 &
ROOTFS_PID=$!
weft_binaries
k8s_test_binaries
whoami_binary
pause_binary
rootfs_rc=0
wait "$ROOTFS_PID" || rootfs_rc=$?
ROOTFS_PID=""
cat "$TMP/rootfs.log" >&2
((rootfs_rc == 0)) || die "building the root filesystems failed"
build_rootfs

# Staged layers. Binaries in their own (last) layers, so a code change re-pushes only those.
d=$(stage agent) && install -D -m 0755 -t "$d/usr/local/bin" "$TMP/weft/weft-agent" "$TMP/weft/weft-cni"
L_AGENT=$(file_layer weft-agent "$d")
d=$(stage coredns-local) && install -D -m 0755 "$BIN/coredns" "$d/usr/local/bin/coredns"
L_COREDNS_LOCAL=$(file_layer coredns-usr-local "$d")
d=$(stage coredns-root) && install -D -m 0755 "$BIN/coredns" "$d/coredns"
L_COREDNS_ROOT=$(file_layer coredns-root "$d")
d=$(stage operator) && install -D -m 0755 "$TMP/weft/weft-operator" "$d/usr/local/bin/weft-operator"
L_OPERATOR=$(file_layer weft-operator "$d")
d=$(stage whoami) && install -D -m 0755 "$WHOAMI" "$d/whoami"
L_WHOAMI=$(file_layer whoami "$d")
d=$(stage pause) && install -D -m 0755 "$PAUSE" "$d/pause"
L_PAUSE=$(file_layer pause "$d")
d=$(stage regression) && install -D -m 0755 "$REGRESSION" "$d/regression-issue-74839"
L_REGRESSION=$(file_layer regression-issue-74839 "$d")

# busybox: Debian's static busybox at /bin/busybox, every applet a relative symlink to it in /bin
# (as `busybox --install -s` would, without its absolute host path), the dirs and users the
# upstream image has.
d=$(stage busybox)
mkdir -p "$d"/{bin,etc,root,home,var/www,usr} "$d/tmp"
chmod 1777 "$d/tmp" && chmod 0700 "$d/root"
install -m 0755 /bin/busybox "$d/bin/busybox"
for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -s busybox "$d/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\nnobody:x:65534:65534:nobody:/home:/bin/false\n' >"$d/etc/passwd"
printf 'root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n' >"$d/etc/group"
L_BUSYBOX=$(file_layer busybox "$d")

# netshoot: an empty .zshrc, or an interactive zsh starts zsh-newuser-install.
d=$(stage netshoot) && mkdir -p -m 0700 "$d/root" && : >"$d/root/.zshrc"
L_NETSHOOT=$(file_layer netshoot "$d")

# agnhost, as upstream's Dockerfile lays it out: /agnhost and /agnhost-2, porter's TLS pair,
# /uploads for netexec, iperf (2) in /usr/local/bin, and the user-defined-in-image (1000) in
# group-defined-in-image (50000) that a SupplementalGroups test expects. Its passwd/group/shadow
# files are the tools rootfs's, with those lines added.
d=$(stage agnhost)
install -m 0755 "$AGNHOST" "$d/agnhost" && ln -s agnhost "$d/agnhost-2"
install -m 0644 "$K8S_SRC/test/images/agnhost/porter/localhost.crt" "$K8S_SRC/test/images/agnhost/porter/localhost.key" "$d/"
mkdir -p "$d/uploads" "$d/usr/local/bin" && ln -s /usr/bin/iperf "$d/usr/local/bin/iperf"
tar -C "$d" -xzf "$L_TOOLS" ./etc/passwd ./etc/group ./etc/shadow ./etc/gshadow
echo 'user-defined-in-image:x:1000:1000:Linux User,,,:/home/user-defined-in-image:/bin/sh' >>"$d/etc/passwd"
echo 'user-defined-in-image:!:0:0:99999:7:::' >>"$d/etc/shadow"
printf 'user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n' >>"$d/etc/group"
printf 'user-defined-in-image:!::\ngroup-defined-in-image:!::user-defined-in-image\n' >>"$d/etc/gshadow"
install -d -o 1000 -g 1000 -m 0755 "$d/home/user-defined-in-image"
L_AGNHOST=$(file_layer agnhost "$d" --keep-owners)

# The e2e nginx images (upstream: nginx on alpine): the welcome page on port 80, logs to the
# container's stdout/stderr, `nginx -g 'daemon off;'`. The nginx.conf replaces Debian's (which
# would include sites-enabled/default, listening on [::]:80 too).
d=$(stage nginx) && mkdir -p "$d/etc/nginx"
cat >"$d/etc/nginx/nginx.conf" <<'NGINX'
user www-data;
worker_processes auto;
pid /run/nginx.pid;
error_log /dev/stderr notice;
include /etc/nginx/modules-enabled/*.conf;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    sendfile on;
    keepalive_timeout 65;
    server {
        listen 80 default_server;
        server_name localhost;
        root /usr/share/nginx/html;
        index index.html index.htm;
    }
}
NGINX
L_NGINX=$(file_layer nginx "$d")

start_registry

image "weft.io/weft-agent:$WEFT_VERSION" "$L_NET" "$L_COREDNS_LOCAL" "$L_AGENT" -- \
  -e "$PATH_ENV" --entrypoint /usr/local/bin/weft-agent
# The Deployment runs it as 65532 on a read-only rootfs; the image says so too.
image "weft.io/weft-operator:$WEFT_VERSION" "$L_BASE" "$L_OPERATOR" -- \
  -e "$PATH_ENV" --entrypoint /usr/local/bin/weft-operator --user 65532:65532
image "docker.io/traefik/whoami:v1.11.0 docker.io/traefik/whoami:latest" "$L_WHOAMI" -- \
  --entrypoint /whoami --exposed-ports 80/tcp
image "docker.io/nicolaka/netshoot:latest" "$L_TOOLS" "$L_NETSHOOT" -- -e "$PATH_ENV" --cmd zsh
image "docker.io/library/busybox:latest registry.k8s.io/e2e-test-images/busybox:1.37.0-1" "$L_BUSYBOX" -- \
  -e PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd sh
# 3.10.1: kubelet/kubeadm v1.35 and the e2e framework; 3.10.2: containerd 2.4's default sandbox.
image "registry.k8s.io/pause:3.10.1 registry.k8s.io/pause:3.10.2" "$L_PAUSE" -- \
  --entrypoint /pause --user 65535:65535
# The e2e images of test/utils/image/manifest.go that test/e2e/network uses (AgnhostPrev too);
# 2.45 is the tag the network-policy-api conformance suite's manifests name (its base pods run
# serve-hostname, porter, netexec and connect with flags this newer build of the tool has too).
image "registry.k8s.io/e2e-test-images/agnhost:2.59 registry.k8s.io/e2e-test-images/agnhost:2.55 registry.k8s.io/e2e-test-images/agnhost:2.45" \
  "$L_TOOLS" "$L_COREDNS_ROOT" "$L_AGNHOST" -- -e "$PATH_ENV" --entrypoint /agnhost --cmd pause \
  --exposed-ports 80/tcp,8080/tcp,8081/tcp,9376/tcp,5000/tcp
image "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7" "$L_TOOLS" "$L_COREDNS_ROOT" -- \
  -e "$PATH_ENV" --cmd bash
image "registry.k8s.io/e2e-test-images/nginx:1.14-4 registry.k8s.io/e2e-test-images/nginx:1.15-4" \
  "$L_NET" "$L_NGINX" -- -e "$PATH_ENV" --cmd nginx,-g,'daemon off;' --exposed-ports 80/tcp
image "registry.k8s.io/e2e-test-images/regression-issue-74839:1.4" "$L_BASE" "$L_REGRESSION" -- \
  -e "$PATH_ENV" --entrypoint /regression-issue-74839
image "registry.k8s.io/build-image/distroless-iptables:v0.8.9" "$L_NET" -- -e "$PATH_ENV"

printf '%-66s %-71s %s\n' IMAGE DIGEST SIZE
for r in "${ALL_REFS[@]}"; do
  m=$(crane manifest "$REG/$r")
  # The size: config + layers as stored (compressed), from the manifest's "size" fields.
  size=$(grep -o '"size":[0-9]*' <<<"$m" | awk -F: '{s += $2} END {printf "%.1f MB", s / 1e6}')
  printf '%-66s %-71s %s\n' "$r" "$(crane digest "$REG/$r")" "$size"
done

stop_registry
# Drop the blobs of replaced and intermediate manifests, and layer tarballs no image uses now.
if ((PUSHED)); then
  docker-registry garbage-collect --delete-untagged "$TMP/registry.yml" >"$TMP/gc.log" 2>&1 ||
    { cat "$TMP/gc.log" >&2; die "registry garbage-collect failed"; }
fi
used=" $L_NET $L_TOOLS $L_BASE $L_AGENT $L_COREDNS_LOCAL $L_COREDNS_ROOT $L_OPERATOR $L_WHOAMI $L_PAUSE $L_REGRESSION $L_BUSYBOX $L_NETSHOOT $L_AGNHOST $L_NGINX "
for f in "$WORK"/layers/*; do [[ $used == *" $f "* ]] || rm -f "$f"; done
for f in "$WORK"/bin/*; do [[ $f == "$AGNHOST" || $f == "$REGRESSION" || $f == "$WHOAMI" || $f == "$PAUSE" ]] || rm -f "$f"; done
