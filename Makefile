# One place for the project's commands. `make up` brings up the local cluster with Weft and sample
# workloads; `make test` runs every test (unit, property, generated-file checks and end-to-end).
SHELL := /bin/bash
CARGO ?= cargo
DEV := target/debug/weft-dev

.PHONY: all build tools images test unit e2e conformance conformance-subset conformance-netpol conformance-cnp lint fmt crds crds-check up down status bench bench-cni bench-net bench-chaos bench-policy bench-proxy bench-dns bench-ingress bench-pods

all: build

build:
	$(CARGO) build --workspace --bins

# Debian packages and the Go-built Kubernetes, etcd, CoreDNS and cnitool (cached by version).
tools:
	bash e2e/tools/install.sh >/dev/null

# The images real nodes pull (Weft's own from the release build, and the workloads' and tests'),
# into the registry store under /var/cache/weft (cached by content; see docs/IMAGES.md).
images: tools
	bash e2e/tools/images.sh

crds:
	$(CARGO) run -q -p weft-operator --bin crdgen

crds-check:
	$(CARGO) run -q -p weft-operator --bin crdgen -- --check

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

unit:
	$(CARGO) test --workspace --exclude weft-e2e

e2e: tools build images
	$(CARGO) test -p weft-e2e -- --test-threads=2

# The [Conformance] subset of the upstream network tests, the NetworkPolicy suite and the
# ClusterNetworkPolicy suite (nftables proxy) run here too; `make conformance` runs the rest.
test: lint unit e2e conformance-subset conformance-netpol conformance-cnp

# The Kubernetes network e2e tests (upstream e2e.test under ginkgo) on a 2-node real-node cluster
# per proxy mode; results in docs/conformance/ (see docs/CONFORMANCE.md). `conformance` runs every
# [sig-network] test that can run here and the NetworkPolicy suite, both proxy modes;
# `conformance-subset` only those tagged [Conformance]; `conformance-netpol` the NetworkPolicy
# suite (Netpol and NetworkPolicy) with the nftables proxy; `conformance-cnp` the
# network-policy-api ClusterNetworkPolicy suite (v0.2.0, standard profile) with it.
conformance: tools build images
	target/debug/weft-conformance --suite network --modes nftables,iptables
	target/debug/weft-conformance --suite netpol --modes nftables,iptables
	target/debug/weft-conformance --suite cnp --modes nftables,iptables

conformance-cnp: tools build images
	target/debug/weft-conformance --suite cnp --modes nftables

conformance-netpol: tools build images
	target/debug/weft-conformance --suite netpol --modes nftables

conformance-subset: tools build images
	target/debug/weft-conformance --suite conformance --modes nftables,iptables

up: tools build images
	$(DEV) up

down:
	$(DEV) down

status:
	$(DEV) status

bench:
	$(CARGO) bench -p weft-operator --bench plan_compile

bench-cni:
	$(CARGO) bench -p weft-agent --bench cni_add

bench-chaos:
	$(CARGO) bench -p weft-agent --bench ipam_chaos

# NetworkPolicy at scale on one node (root: a network namespace): 1,000 policies over 10,000 pods.
# The agent at scale on one node, then the policy programming latency on a 2-node cluster.
bench-policy: tools build images
	$(CARGO) bench -p weft-agent --bench policy_sync
	target/debug/weft-bench-policy --changes 20

# Needs the Go-built tools (make tools): a 2-node local cluster of its own.
bench-net: tools build images
	target/debug/weft-bench-net 3 5

# Needs the Go-built tools (CoreDNS among them): a 3-node local cluster of its own.
bench-dns: tools build images
	target/debug/weft-bench-dns --nodes 3 --changes 20 --services 30

# Needs the Go-built tools (kube-proxy among them): weft-agent (release build; iptables and
# nftables backends) vs kube-proxy iptables/nftables on one local control plane, then the
# programming latency on a 3-node cluster.
bench-proxy: tools build images
	$(CARGO) build --release -p weft-agent --bin weft-agent
	target/debug/weft-bench-proxy side-by-side --scales 1000,5000,10000 --changes 20 --nftables-changes 5 --iptables legacy
	target/debug/weft-bench-proxy latency --changes 40

# Real nodes (kubelet + containerd), a 2-node cluster per CNI: 100 pods on one node, create →
# Ready and each CNI ADD as containerd makes it, weft-cni vs bridge + host-local.
bench-pods: tools build images
	target/debug/weft-bench-pods --pods 100 --rounds 2

# Needs the Go-built tools and nginx/wrk (make tools): a 2-node local cluster of its own; route
# change → serving latency, then wrk straight to a pod vs through the ingress, first with every
# process on every CPU, then with one CPU per node (a cluster each).
bench-ingress: tools build images
	target/debug/weft-bench-ingress --changes 40 --rounds 5 --seconds 10 --path /
	target/debug/weft-bench-ingress --changes 0 --rounds 5 --seconds 10 --path / --pin
