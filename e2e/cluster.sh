#!/usr/bin/env bash
# Against a real cluster (KUBECONFIG set, granary installed: CRDs, operator, CSI driver):
# applies the examples in a scratch namespace, waits for the Dataset to be Prewarmed and the
# CheckpointPolicy Ready, and runs a pod that reads the data through the mount.
# Skips, saying why, when there is no cluster to talk to.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${KUBECONFIG:-}" ]]; then
    echo "e2e/cluster.sh: SKIPPED: KUBECONFIG is not set (point it at a cluster with granary installed)"
    exit 0
fi
command -v kubectl >/dev/null || { echo "e2e/cluster.sh: kubectl is needed"; exit 1; }
ns="granary-e2e-$$"
kubectl create namespace "$ns"
trap 'kubectl delete namespace "$ns" --wait=false' EXIT
kubectl apply -f crds/granary.dev.yaml
: "${GRANARY_E2E_SECRET:?set GRANARY_E2E_SECRET to a file of store credentials (access_key_id=..., secret_access_key=...)}"
kubectl -n "$ns" create secret generic s3-credentials --from-env-file="$GRANARY_E2E_SECRET"
kubectl -n "$ns" apply -f examples/dataset.yaml -f examples/checkpoint-policy.yaml
kubectl -n "$ns" wait dataset/imagenet --for=condition=Prewarmed --timeout=30m
kubectl -n "$ns" wait checkpointpolicy/llama --for=condition=Ready --timeout=5m
kubectl -n "$ns" apply -f - <<'POD'
apiVersion: v1
kind: Pod
metadata:
  name: reader
  annotations:
    granary.dev/mounts: "dataset/imagenet=/data"
spec:
  restartPolicy: Never
  containers:
    - name: reader
      image: busybox:1.36
      command: ["sh", "-c", "find /data -type f | head -100 | xargs cat | wc -c"]
POD
kubectl -n "$ns" wait pod/reader --for=jsonpath='{.status.phase}'=Succeeded --timeout=10m
bytes=$(kubectl -n "$ns" logs reader)
echo "e2e/cluster.sh: the pod read ${bytes} bytes through the Dataset mount"
[[ "$bytes" -gt 0 ]]
# Deleting a Dataset completes: its finalizer removes the PV, and the validating webhook never
# holds the finalizer's removal up (matchConditions skip objects being deleted).
kubectl -n "$ns" delete dataset/imagenet --timeout=2m
echo "e2e/cluster.sh: the Dataset was deleted"
