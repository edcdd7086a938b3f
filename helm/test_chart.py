#!/usr/bin/env python3
"""The chart's tests, run by `make test` (make chart-test): render with Helm's own engine
(helm-python-sdk binds Helm's Go library), lint, and validate every rendered object against
the Kubernetes schemas (kubernetes-validate, strict), for the default values and for
ci/all-on-values.yaml; then check what ties the chart to the code: the CRDs are the
generated ones, the driver name and flags match the binaries', the dashboards are current.
"""
import json
import os
import re
import subprocess
import sys
import unittest
from pathlib import Path

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
except ImportError as missing:
    if os.environ.get("GRANARY_REQUIRE_MOUNTS") == "1":
        raise
    print(f"SKIP: the chart tests need {missing.name}: pip install helm-python-sdk kubernetes-validate pyyaml")
    sys.exit(0)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "granary"
KUBE_VERSION = "1.33.0"
NAMESPACE = "granary-system"
# Kinds of other projects' CRDs: no Kubernetes schema exists for them, so they are checked
# field by field below instead.
THIRD_PARTY = {"monitoring.coreos.com/v1", "cert-manager.io/v1"}


def values(name):
    if name == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text())


def render(vals):
    chart = helm.Chart.load(CHART)
    chart.validate_schema(vals)
    out = chart.render(vals, name="granary", namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs, out


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''} rendered"
    return found[0]


def container(pod_spec, name):
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def flag(args, name):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def rust_const(path, name):
    m = re.search(rf'const {name}: &str = "([^"]+)"', (ROOT / path).read_text())
    assert m, f"{name} not found in {path}"
    return m.group(1)


class Chart(unittest.TestCase):
    def test_crds_are_the_generated_ones(self):
        self.assertEqual(
            (CHART / "crds" / "granary.dev.yaml").read_text(),
            (ROOT / "crds" / "granary.dev.yaml").read_text(),
            "helm/granary/crds differs from crds/: cp crds/granary.dev.yaml helm/granary/crds/",
        )

    def test_dashboards_are_current(self):
        subprocess.run([sys.executable, str(ROOT / "helm" / "dashboards" / "generate.py"), "--check"], check=True)

    def test_lint_is_clean(self):
        for name in ["default", "all-on-values"]:
            report = helm.lint(CHART, values(name), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
            problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
            self.assertEqual(problems, [], f"helm lint ({name})")

    def test_every_object_is_valid_kubernetes(self):
        for name in ["default", "all-on-values"]:
            docs, _ = render(values(name))
            for doc in docs:
                what = f"{name}: {doc['kind']} {doc['metadata']['name']}"
                if doc["apiVersion"] in THIRD_PARTY:
                    self.assertIn("spec", doc, what)
                    continue
                try:
                    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    self.fail(f"{what}: {e.message} at {list(e.path)}")

    def test_the_default_install_has_every_part(self):
        docs, out = render({})
        kinds = sorted({d["kind"] for d in docs})
        self.assertEqual(kinds, sorted([
            "ClusterRole", "ClusterRoleBinding", "CSIDriver", "DaemonSet", "Deployment",
            "MutatingWebhookConfiguration", "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Service",
            "ServiceAccount", "ValidatingWebhookConfiguration",
        ]))
        self.assertIn("kubectl apply", out["granary/templates/NOTES.txt"])

    def test_everything_on_renders_the_monitoring_and_certificates(self):
        docs, _ = render(values("all-on-values"))
        cert = find(docs, "Certificate")
        self.assertEqual(cert["spec"]["issuerRef"], {"name": "internal-ca", "kind": "ClusterIssuer"})
        self.assertIn("granary-webhook.granary-system.svc", cert["spec"]["dnsNames"])
        for kind in ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]:
            webhook = find(docs, kind)
            self.assertEqual(webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"], f"{NAMESPACE}/{cert['spec']['secretName']}")
        mounts, inline = find(docs, "MutatingWebhookConfiguration")["webhooks"]
        self.assertEqual(mounts["objectSelector"], {"matchLabels": {"granary.dev/mounts": "true"}})
        operator = container(find(docs, "Deployment")["spec"]["template"]["spec"], "operator")
        # Inline volumes naming a Dataset: only Pods with a granary.dev csi volume are sent.
        self.assertEqual(inline["name"], "inline-volumes.granary.dev")
        self.assertEqual([r["resources"] for r in inline["rules"]], [["pods"]])
        self.assertIn("v.csi.driver == 'granary.dev'", inline["matchConditions"][0]["expression"])
        self.assertIn("--inline-volumes", operator["args"])
        self.assertEqual(flag(operator["args"], "tls-cert"), "/etc/granary/webhook-tls/tls.crt")
        self.assertEqual({d["kind"] for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"}, {"ServiceMonitor", "PodMonitor"})
        boards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
        self.assertEqual(len(boards), 4)
        for board in boards:
            ((file, text),) = board["data"].items()
            self.assertEqual(json.loads(text), json.loads((CHART / "dashboards" / file).read_text()))
            self.assertEqual(board["metadata"]["namespace"], "monitoring")
        # Certificates from cert-manager: no write access to webhook configurations or Secrets.
        rules = find(docs, "ClusterRole")["rules"]
        self.assertFalse(any("mutatingwebhookconfigurations" in r["resources"] for r in rules))
        role_rules = find(docs, "Role")["rules"]
        self.assertFalse(any("secrets" in r["resources"] for r in role_rules))
        # The platform's own volume key, the NVMe mounts as write-back roots, the node's identity lent.
        self.assertFalse([d for d in docs if d["kind"] == "Secret"])
        csi_pod = find(docs, "DaemonSet", "granary-csi")["spec"]["template"]["spec"]
        self.assertIn("platform-volume-key", [v.get("secret", {}).get("secretName") for v in csi_pod["volumes"]])
        daemon = container(find(docs, "DaemonSet", "granary-node")["spec"]["template"]["spec"], "node-daemon")
        roots = [a.split("=", 1)[1] for a in daemon["args"] if a.startswith("--writeback-root=")]
        self.assertEqual(roots, ["/dev/shm/granary", "/mnt/nvme0", "/mnt/nvme1"])
        self.assertIn("--allow-auto-credentials", daemon["args"])

    def test_the_parts_agree_with_the_binaries(self):
        docs, _ = render({})
        driver = find(docs, "CSIDriver")
        self.assertEqual(driver["metadata"]["name"], rust_const("operator/src/resources/mod.rs", "CSI_DRIVER"))
        # Only the operator's PVs: inline volumes carry the pod author's attributes.
        self.assertEqual(driver["spec"]["volumeLifecycleModes"], ["Persistent"])
        # Rotated Secrets reach running mounts through the kubelet's periodic republish.
        self.assertTrue(driver["spec"]["requiresRepublish"])
        self.assertFalse(driver["spec"]["attachRequired"])
        self.assertTrue(driver["spec"]["podInfoOnMount"])

        csi_pod = find(docs, "DaemonSet", "granary-csi")["spec"]["template"]["spec"]
        node_pod = find(docs, "DaemonSet", "granary-node")["spec"]["template"]["spec"]
        csi, registrar = container(csi_pod, "granary-csi"), container(csi_pod, "node-driver-registrar")
        daemon = container(node_pod, "node-daemon")
        # granary-csi reaches the node daemon's socket (and so its fd keeper next to it).
        self.assertEqual(flag(csi["args"], "node-daemon"), "unix://" + flag(daemon["args"], "socket"))
        # The kubelet is told where the CSI socket is on the host.
        plugin_dir = next(v for v in csi_pod["volumes"] if v["name"] == "plugin-dir")["hostPath"]["path"]
        self.assertEqual(flag(registrar["args"], "kubelet-registration-path"), plugin_dir + "/csi.sock")
        self.assertEqual(flag(csi["args"], "endpoint"), "unix://" + flag(registrar["args"], "csi-address"))
        # Mounts made in the containers reach the host and the pods.
        for c, path in [(csi, "/var/lib/kubelet"), (csi, "/var/lib/granary"), (daemon, "/var/lib/granary")]:
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
            self.assertEqual(mount.get("mountPropagation"), "Bidirectional", f"{c['name']} {path}")
            self.assertTrue(c["securityContext"]["privileged"])
        self.assertIn("/dev/fuse", [m["mountPath"] for m in daemon["volumeMounts"]])
        # The two DaemonSets land on the same nodes, GPU nodes included.
        for key in ["nodeSelector", "tolerations", "affinity", "priorityClassName"]:
            self.assertEqual(csi_pod.get(key), node_pod.get(key), key)
        self.assertIn("nvidia.com/gpu", [t["key"] for t in node_pod["tolerations"]])
        # The operator marks PVs with the key granary-csi checks: both read the one Secret.
        key_secret = find(docs, "Secret", "granary-volume-key")
        self.assertEqual(key_secret["metadata"]["annotations"]["helm.sh/resource-policy"], "keep")
        deploy_pod = find(docs, "Deployment")["spec"]["template"]["spec"]
        for pod, c in [(csi_pod, csi), (deploy_pod, container(deploy_pod, "operator"))]:
            key_file = flag(c["args"], "volume-key-file")
            mount = next(m for m in c["volumeMounts"] if key_file.startswith(m["mountPath"] + "/"))
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            self.assertEqual(volume["secret"]["secretName"], "granary-volume-key", c["name"])
            self.assertEqual(volume["secret"]["items"][0]["path"], key_file[len(mount["mountPath"]) + 1:])
        # The node lends no cloud identity and no host directory beyond the Memory medium's.
        self.assertNotIn("--allow-auto-credentials", daemon["args"])
        self.assertEqual([a for a in daemon["args"] if a.startswith("--writeback-root=")], ["--writeback-root=/dev/shm/granary"])
        self.assertFalse([a for a in daemon["args"] if a.startswith("--fs-store-root")])
        # Checkpoint volumes report to their commit coordinator as this node (its name from
        # the downward API), and the operator may make each coordinator's token Secret.
        node_name = next(e for e in daemon["env"] if e["name"] == "NODE_NAME")
        self.assertEqual(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName")
        cluster_rules = find(docs, "ClusterRole")["rules"]
        secret_rules = [r for r in cluster_rules if "secrets" in r["resources"]]
        self.assertEqual([sorted(r["verbs"]) for r in secret_rules], [["create", "get"]])
        # Upgrades restart node daemons only: the keeper (granary-csi) waits for OnDelete.
        self.assertEqual(find(docs, "DaemonSet", "granary-csi")["spec"]["updateStrategy"]["type"], "OnDelete")

        deploy = find(docs, "Deployment")
        operator = container(deploy["spec"]["template"]["spec"], "operator")
        service = find(docs, "Service", flag(operator["args"], "webhook-service"))
        name = flag(operator["args"], "webhook-configuration")
        mutating = find(docs, "MutatingWebhookConfiguration", name)
        validating = find(docs, "ValidatingWebhookConfiguration", name)
        for hooks, path in [(mutating["webhooks"], "/mutate"), (validating["webhooks"], "/validate")]:
            for hook in hooks:
                ref = hook["clientConfig"]["service"]
                self.assertEqual((ref["name"], ref["namespace"], ref["path"]), (service["metadata"]["name"], NAMESPACE, path))
                excluded = [e for e in hook["namespaceSelector"]["matchExpressions"] if e["operator"] == "NotIn"]
                self.assertTrue(any(NAMESPACE in e["values"] for e in excluded), "the release namespace is excluded")
        rules_of = lambda hooks: {r for hook in hooks for rule in hook["rules"] for r in rule["resources"]}
        self.assertEqual(rules_of(mutating["webhooks"]), {"pods", "pytorchjobs", "trainjobs"})
        self.assertEqual(rules_of(validating["webhooks"]), {"datasets", "checkpointpolicies"})
        self.assertIsNone(flag(operator["args"], "no-leader-election"))
        self.assertNotIn("--inline-volumes", operator["args"])
        # The self-managed certificate's CA is written to exactly these configurations, and
        # kept in exactly this Secret.
        rules = find(docs, "ClusterRole")["rules"]
        ca_rule = next(r for r in rules if "mutatingwebhookconfigurations" in r["resources"])
        self.assertEqual(set(ca_rule["resources"]), {"mutatingwebhookconfigurations", "validatingwebhookconfigurations"})
        self.assertEqual(ca_rule["resourceNames"], [name])
        crd_rule = next(r for r in rules if "customresourcedefinitions" in r["resources"])
        self.assertEqual((crd_rule["resourceNames"], crd_rule["verbs"]), (["trainjobs.trainer.kubeflow.org"], ["get"]))
        # The Lease and the Secret: granted in the release namespace, where the operator looks (POD_NAMESPACE).
        role = find(docs, "Role")
        self.assertEqual(role["metadata"]["namespace"], NAMESPACE)
        lease_rule = next(r for r in role["rules"] if "leases" in r["resources"])
        self.assertIn("patch", lease_rule["verbs"])
        secret_rule = next(r for r in role["rules"] if "secrets" in r["resources"] and "resourceNames" in r)
        self.assertEqual(secret_rule["resourceNames"], [flag(operator["args"], "webhook-secret")])

    def test_the_webhook_can_never_block_the_cluster(self):
        docs, _ = render({})
        mutating = find(docs, "MutatingWebhookConfiguration")
        (mounts,) = mutating["webhooks"]
        # Only annotated objects are sent: an operator that is down blocks no other Pod.
        (condition,) = mounts["matchConditions"]
        self.assertIn("'granary.dev/mounts' in object.metadata.annotations", condition["expression"])
        self.assertIn("has(object.metadata.annotations)", condition["expression"])
        self.assertEqual({op for rule in mounts["rules"] for op in rule["operations"]}, {"CREATE"})
        # Validation is its own configuration and never sees a deletion's finalizer removal
        # nor an update that leaves spec alone (status, finalizers, labels).
        (validate,) = find(docs, "ValidatingWebhookConfiguration")["webhooks"]
        conditions = {c["name"]: c["expression"] for c in validate["matchConditions"]}
        self.assertEqual(conditions["not-being-deleted"], "!has(object.metadata.deletionTimestamp)")
        self.assertEqual(conditions["spec-changed"], "request.operation == 'CREATE' || oldObject.spec != object.spec")
        self.assertFalse(any("granary.dev" in rule["apiGroups"] for rule in mounts["rules"]))
        # Two replicas by default, on different nodes where possible, and a budget keeping one.
        deploy = find(docs, "Deployment")
        self.assertEqual(deploy["spec"]["replicas"], 2)
        spread = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
        self.assertEqual(spread["topologyKey"], "kubernetes.io/hostname")
        pdb = find(docs, "PodDisruptionBudget")
        self.assertEqual(pdb["spec"]["minAvailable"], 1)
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"], deploy["spec"]["selector"]["matchLabels"])
        # One replica: no budget (it would block every drain).
        docs, _ = render({"operator": {"replicas": 1}})
        self.assertFalse([d for d in docs if d["kind"] == "PodDisruptionBudget"])

    def test_bad_values_fail_with_the_reason(self):
        chart = helm.Chart.load(CHART)
        with self.assertRaisesRegex(helm.HelmError, "failurePolicy"):
            chart.validate_schema({"webhook": {"failurePolicy": "Sometimes"}})
        # The schema takes only what granary-cache's size parser takes: no P, no typos.
        with self.assertRaisesRegex(helm.HelmError, "maxMemory"):
            chart.validate_schema({"node": {"maxMemory": "1PiB"}})
        with self.assertRaisesRegex(helm.HelmError, "localCacheSize"):
            chart.validate_schema({"node": {"localCacheSize": "100 gigs"}})
        chart.validate_schema({"node": {"maxMemory": "1.5gib", "localCacheSize": "0", "checkpointWritebackSize": "200G"}})
        with self.assertRaisesRegex(helm.HelmError, "nodes"):
            chart.validate_schema({"nodes": {"maxMemory": "1GiB"}})
        with self.assertRaisesRegex(helm.HelmError, "leaderElection"):
            render({"operator": {"replicas": 2, "leaderElection": False}, "certManager": {"enabled": True}})


if __name__ == "__main__":
    unittest.main(verbosity=2)
