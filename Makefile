# Granary: `make demo` runs the main job on an embedded default; `make test` runs every test.

CARGO ?= cargo

.PHONY: demo test lint unit bench fuse-bench ckpt-bench build release crds e2e-cluster

## Build release binaries and run the demo (local source, two workers, prewarm, verified read).
demo: release
	e2e/demo.sh

## Formatting, lints, and every test (FUSE/mount tests run where the machine allows them).
test: lint unit

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

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

## Regenerate crds/granary.dev.yaml from the Rust types (a test fails when it is stale).
crds:
	$(CARGO) run -q -p granary-operator -- crd > crds/granary.dev.yaml

## Against a real cluster with granary installed (skips, saying why, without KUBECONFIG).
e2e-cluster:
	e2e/cluster.sh
