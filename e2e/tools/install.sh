#!/usr/bin/env bash
# Installs everything the local cluster and the e2e tests need, on a fresh machine, as root:
# Debian packages, and the Go-built Kubernetes (with its e2e suite), etcd, CoreDNS, cnitool and OpenTelemetry Collector binaries at pinned
# versions, and the upstream ClusterNetworkPolicy CRD with its conformance suite. Binaries are cached by version under $WEFT_CACHE (outside the repo), so a second run
# costs seconds. Prints the bin directory on its last line.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.35.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.5}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.6}
CNI_VERSION=${CNI_VERSION:-v1.3.0}
# The newest collector release whose contrib prometheusexporter the Go module proxy serves.
OTELCOL_VERSION=${OTELCOL_VERSION:-v0.161.0}
# Real nodes: containerd 2.x (Debian's 1.6 lacks CNI STATUS and the kubelet's RuntimeConfig) and
# crane, which assembles and pushes the project's images (e2e/tools/images.sh).
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
CRANE_VERSION=${CRANE_VERSION:-v0.22.1}
# The upstream ClusterNetworkPolicy API (policy.networking.k8s.io/v1alpha2): its CRD and its
# conformance suite.
NETWORK_POLICY_API_VERSION=${NETWORK_POLICY_API_VERSION:-v0.2.0}
WEFT_CACHE=${WEFT_CACHE:-/var/cache/weft}
BIN="$WEFT_CACHE/bin"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
mkdir -p "$BIN"

log() { printf '[install] %s\n' "$*" >&2; }

debian_packages() {
  # iputils-ping, netcat-openbsd and tcpdump: what "tool image" pods (netshoot, busybox) are
  # usually asked to run; they run with the host's tools.
  local pkgs=(iproute2 iptables nftables nginx-light containernetworking-plugins dnsutils curl
    iperf3 conntrack openssl procps psmisc util-linux iputils-ping netcat-openbsd tcpdump wrk
    prometheus
    # Real nodes (kubelet + containerd): runc, the local OCI registry, and what the images are
    # made of (mmdebstrap builds Debian root filesystems; busybox-static is the busybox image).
    runc docker-registry mmdebstrap busybox-static)
  local missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    local had_pid=false had_prom_pid=false
    [[ -e /run/nginx.pid ]] && had_pid=true
    [[ -e /run/prometheus/prometheus.pid ]] && had_prom_pid=true
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    # nginx's Debian package starts a server on :80; the project runs its own. Stop only the one
    # the package just started (by its pid file), never other nginx processes.
    if [[ -d /run/systemd/system ]]; then
      systemctl disable --now nginx >/dev/null 2>&1 || true
    elif ! $had_pid && [[ -s /run/nginx.pid ]]; then
      kill "$(cat /run/nginx.pid)" >/dev/null 2>&1 || true
    fi
    # Likewise Prometheus (:9090) and the registry (:5000): each local cluster runs its own with its own config.
    if [[ -d /run/systemd/system ]]; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    elif ! $had_prom_pid && [[ -s /run/prometheus/prometheus.pid ]]; then
      kill "$(cat /run/prometheus/prometheus.pid)" >/dev/null 2>&1 || true
    fi
    # (the registry's package starts it only under systemd)
    if [[ -d /run/systemd/system ]]; then
      systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
  fi
}

# Kubernetes from its Go modules: a scratch module requires k8s.io/kubernetes at the tag and
# replaces each staging module (k8s.io/api, …) with its published v0.Y.Z.
kubernetes() {
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl kubelet)
  # The stamp names the commands too: adding one rebuilds.
  local stamp="$BIN/.k8s-$K8S_VERSION-$(echo "${cmds[*]}" | sha256sum | cut -c1-12)"
  [[ -f $stamp ]] && return
  local src="$WEFT_CACHE/src/k8s-$K8S_VERSION" staging="v0.${K8S_VERSION#v1.}"
  mkdir -p "$src"
  log "building Kubernetes $K8S_VERSION (first run only; takes a while on 2 cores)"
  # The go client knows where modules live: it downloads the module and names its go.mod.
  local upstream_mod
  upstream_mod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  cp "$upstream_mod" "$src/upstream.mod"
  {
    echo "module weft.local/k8stools"
    echo "go 1.25.0"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^\s+k8s\.io/[a-z0-9-]+ => \./staging' "$src/upstream.mod" \
      | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >"$src/go.mod"
  cat >"$src/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  (cd "$src" && go mod tidy >&2 &&
    for c in "${cmds[@]}"; do
      log "go build $c"
      CGO_ENABLED=0 go build -trimpath -ldflags "-s -w \
        -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
        -X k8s.io/component-base/version.gitMajor=1 \
        -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) \
        -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION" \
        -o "$BIN/$c" "k8s.io/kubernetes/cmd/$c" >&2
    done)
  touch "$stamp"
}

# The Kubernetes e2e suite (e2e.test) and the ginkgo runner at the version its go.mod pins, for
# `make conformance`. A module of its own: e2e.test imports most of the tree (the test sources
# e2e_test.go lists), which the tools above need not resolve.
kubernetes_e2e() {
  local stamp="$BIN/.k8s-e2e-$K8S_VERSION"
  [[ -f $stamp ]] && return
  local src="$WEFT_CACHE/src/k8s-e2e-$K8S_VERSION" staging="v0.${K8S_VERSION#v1.}"
  mkdir -p "$src"
  log "building the Kubernetes $K8S_VERSION e2e suite (first run only; several minutes on 2 cores)"
  local upstream_mod upstream_dir
  upstream_mod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  upstream_dir=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
  {
    echo "module weft.local/k8se2e"
    echo "go 1.25.0"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -oE '^\s+k8s\.io/[a-z0-9-]+ => \./staging' "$upstream_mod" \
      | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >"$src/go.mod"
  # Every package the suite's test file imports, and ginkgo's command: tidy then resolves them all
  # at the versions k8s.io/kubernetes pins.
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    sed -n '/^import (/,/^)/p' "$upstream_dir/test/e2e/e2e_test.go" | grep -oE '"(k8s\.io|github\.com/onsi)/[^"]+"' \
      | sort -u | sed 's/^/\t_ /'
    printf '\t_ "k8s.io/kubernetes/test/e2e"\n\t_ "github.com/onsi/ginkgo/v2/ginkgo"\n)\n'
  } >"$src/tools.go"
  (cd "$src" && go mod tidy >&2 &&
    log "go build ginkgo" &&
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/ginkgo" github.com/onsi/ginkgo/v2/ginkgo >&2 &&
    log "go test -c k8s.io/kubernetes/test/e2e" &&
    CGO_ENABLED=0 go test -c -trimpath -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
      -X k8s.io/component-base/version.gitMajor=1 \
      -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)" \
      -o "$BIN/e2e.test" k8s.io/kubernetes/test/e2e >&2)
  touch "$stamp"
}

# sigs.k8s.io/network-policy-api: the standard-channel ClusterNetworkPolicy CRD, which every
# local cluster applies beside Weft's own (e2e/src/cluster.rs apply_crds; the operator watches
# ClusterNetworkPolicies), copied to $BIN/crds/; and the API's conformance suite, a `go test`
# package, built with `go test -c` into $BIN/network-policy-api-conformance.test for
# `weft-conformance --suite cnp`. Built in a writable copy of the module, so the dependency
# versions are the ones its own go.mod and go.sum pin.
network_policy_api() {
  local v=$NETWORK_POLICY_API_VERSION
  # -no-sctp: the base pods are built without their SCTP servers (below).
  local stamp="$BIN/.network-policy-api-$v-no-sctp"
  [[ -f $stamp ]] && return
  local src="$WEFT_CACHE/src/network-policy-api-$v" dir
  log "building the network-policy-api $v conformance suite (first run only)"
  dir=$(go mod download -json "sigs.k8s.io/network-policy-api@$v" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
  [[ -d $dir ]] || { log "go mod download sigs.k8s.io/network-policy-api@$v named no directory"; return 1; }
  rm -rf "$src"
  mkdir -p "$(dirname "$src")" "$BIN/crds"
  cp -r "$dir" "$src"
  chmod -R u+w "$src"
  install -m 0644 "$src/config/crd/standard/policy.networking.k8s.io_clusternetworkpolicies.yaml" "$BIN/crds/"
  # The base pods' SCTP servers (`agnhost porter` with SERVE_SCTP_PORT_*) exit at once
  # on a kernel without SCTP (this machine's has no sctp module), so the base StatefulSets never
  # become ready and no test runs. They are left out of the embedded manifests; the tests that
  # probe SCTP are skipped (weft-conformance.rs CNP_SKIPPED, docs/CONFORMANCE.md).
  # A container is its `        - name:` line and the deeper-indented lines after it; one that
  # runs `agnhost porter` is dropped.
  awk '
    function flush() { if (block != "" && block !~ /agnhost porter/) printf "%s", block; block = "" }
    /^        - name: / { flush(); block = $0 "\n"; next }
    block != "" && /^         / { block = block $0 "\n"; next }
    { flush(); print }
    END { flush() }
  ' "$src/conformance/base/manifests.yaml" >"$src/conformance/base/manifests.yaml.new"
  mv "$src/conformance/base/manifests.yaml.new" "$src/conformance/base/manifests.yaml"
  ! grep -q SERVE_SCTP "$src/conformance/base/manifests.yaml" ||
    { log "the SCTP servers are still in the conformance base manifests"; return 1; }
  (cd "$src" &&
    log "go test -c sigs.k8s.io/network-policy-api/conformance" &&
    CGO_ENABLED=0 go test -c -trimpath -ldflags "-s -w" -o "$BIN/network-policy-api-conformance.test" ./conformance >&2)
  touch "$stamp"
}

etcd() {
  local stamp="$BIN/.etcd-$ETCD_VERSION"
  [[ -f $stamp ]] && return
  local src="$WEFT_CACHE/src/etcd-$ETCD_VERSION"
  mkdir -p "$src"
  log "building etcd $ETCD_VERSION"
  printf 'module weft.local/etcdtools\ngo 1.25.0\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$src/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$src/tools.go"
  (cd "$src" && go mod tidy >&2 && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2)
  touch "$stamp"
}

go_install() { # name stamp-version package@version…
  local stamp="$BIN/.$1-$2"
  [[ -f $stamp ]] && return
  shift 2
  log "go install $*"
  GOBIN="$BIN" CGO_ENABLED=0 go install -trimpath -tags 'no_btrfs no_devmapper no_zfs' -ldflags "-s -w" "$@" >&2
  touch "$stamp"
}

# The OpenTelemetry Collector distribution of the local cluster (otlp receiver, batch, debug,
# file and prometheus exporters; see otelcol-builder.yaml), built with the collector builder.
otelcol() {
  local manifest
  manifest="$(dirname "$0")/otelcol-builder.yaml"
  # The stamp names the manifest's content too: adding a component rebuilds.
  local stamp="$BIN/.otelcol-weft-$OTELCOL_VERSION-$(sha256sum "$manifest" | cut -c1-12)"
  [[ -f $stamp ]] && return
  local src="$WEFT_CACHE/src/otelcol-$OTELCOL_VERSION"
  mkdir -p "$src"
  log "building the OpenTelemetry Collector $OTELCOL_VERSION (first run only; a few minutes)"
  sed "s/@OTELCOL_VERSION@/$OTELCOL_VERSION/" "$manifest" >"$src/manifest.yaml"
  (cd "$src" &&
    GOBIN="$src/bin" CGO_ENABLED=0 go install -trimpath "go.opentelemetry.io/collector/cmd/builder@$OTELCOL_VERSION" >&2 &&
    CGO_ENABLED=0 ./bin/builder --config manifest.yaml >&2)
  install -m 0755 "$src/build/otelcol-weft" "$BIN/otelcol-weft"
  touch "$stamp"
}

debian_packages
kubernetes
etcd
go_install coredns "$COREDNS_VERSION" "github.com/coredns/coredns@$COREDNS_VERSION"
go_install cnitool "$CNI_VERSION" "github.com/containernetworking/cni/cnitool@$CNI_VERSION"
otelcol
# containerd, its runc shim and ctr: CGO off, without the snapshotters that need C libraries.
go_install containerd "$CONTAINERD_VERSION" \
  "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
  "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
kubernetes_e2e
network_policy_api
go_install crane "$CRANE_VERSION" "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
echo "$BIN"
