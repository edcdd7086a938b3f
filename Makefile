# Granary: `make demo` runs the main job on an embedded default; `make test` runs every test.

CARGO ?= cargo

.PHONY: demo test lint unit chart-test e2e bench fuse-bench ckpt-bench scale-bench ckpt-multinode build release crds dashboards image e2e-cluster

## Build release binaries and run the demo (local source, two workers, prewarm, verified read).
demo: release
	e2e/demo.sh

## Formatting, lints, and every test: unit and integration tests, the Helm chart, the e2e
## suite (FUSE/mount tests run where the machine allows them, and say why they skip).
test: lint unit chart-test e2e

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings
	@# One rustls crypto provider (ring): with aws-lc-rs back in the tree, rustls cannot pick one.
	@if $(CARGO) tree --workspace -i aws-lc-rs >/dev/null 2>&1; then \
		echo "aws-lc-rs is in the dependency tree again (cargo tree -i aws-lc-rs): keep one rustls provider, ring"; exit 1; fi

unit:
	$(CARGO) test --workspace --exclude granary-e2e

## The chart rendered by Helm's engine, linted, and validated against the Kubernetes schemas
## (pip install helm-python-sdk kubernetes-validate pyyaml).
chart-test:
	python3 helm/test_chart.py

## The whole data plane as processes, scraped by a real Prometheus (root, /dev/fuse, prometheus).
e2e:
	$(CARGO) build --bins --example s3-test-server
	$(CARGO) test -p granary-e2e -- --nocapture

## Regenerate the Grafana dashboards (a chart test fails when they are stale).
dashboards:
	python3 helm/dashboards/generate.py

## The one container image (granary-operator, granary-csi, granary-cache).
image:
	docker build -t ghcr.io/granary-dev/granary:$$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1) .

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release --bin granary-cache --bin granary-csi --bin granary-operator --example s3-test-server

## Cache worker benchmark against an S3-protocol server on loopback.
bench: release
	e2e/bench.sh

## FUSE benchmark: fio and a training-like epoch through a mount vs local disk, cold /
## prewarmed / warm, with the store behind a rate-limited link (root; fio, ip, tc).
fuse-bench: release
	e2e/fuse-bench.sh

## Checkpoint benchmark: close(), commit and restore of a 2 GiB checkpoint vs local disk
## and a direct PUT, with the store behind a rate-limited link (root; ip, tc, curl).
ckpt-bench: release
	e2e/ckpt-bench.sh

## Cluster-scale figures: memory per metadata entry (worker, mount), a many-file prewarm's
## files/s, a hot file over 1, 2 and 4 workers, store listings for 8 mounts (root).
scale-bench: release
	e2e/scale-bench.sh

## Three nodes, one checkpoint volume, a commit coordinator, a node killed mid-upload (root,
## /dev/fuse); ends with the "multi-node checkpoint: …" line.
ckpt-multinode:
	GRANARY_REQUIRE_MOUNTS=1 $(CARGO) test -p granary-daemon --test checkpoint_multinode -- --nocapture 2>&1 | tee /dev/stderr | grep -q '^multi-node checkpoint: '

## Regenerate crds/granary.dev.yaml from the Rust types (a test fails when it is stale).
crds:
	$(CARGO) run -q -p granary-operator -- crd > crds/granary.dev.yaml
	cp crds/granary.dev.yaml helm/granary/crds/granary.dev.yaml

## Against a real cluster with granary installed (skips, saying why, without KUBECONFIG).
e2e-cluster:
	e2e/cluster.sh
