//! Names of the objects made for a resource; the webhook, the controllers and the CSI
//! contract all derive them here.

pub const WORKER_GRPC_PORT: i32 = 7070;
pub const WORKER_METRICS_PORT: i32 = 9464;

pub fn worker_config(dataset: &str) -> String {
    format!("{dataset}-worker-config")
}
pub fn worker_service(dataset: &str) -> String {
    format!("{dataset}-workers")
}
pub fn worker_statefulset(dataset: &str) -> String {
    format!("{dataset}-worker")
}
/// The ConfigMap holding the current member set, mounted into every worker.
pub fn worker_members(dataset: &str) -> String {
    format!("{dataset}-worker-members")
}
/// Where a mount first reaches the workers: the headless Service's name resolves to every
/// worker, and the one that answers tells the mount the member set. It does not change as
/// the Dataset scales, so neither does the PV.
pub fn worker_seed(dataset: &str, namespace: &str) -> String {
    format!("{}.{namespace}.svc:{WORKER_GRPC_PORT}", worker_service(dataset))
}
/// Stable DNS name of worker `index` through the headless Service.
pub fn worker_address(dataset: &str, namespace: &str, index: i32) -> String {
    format!(
        "{}-{index}.{}.{namespace}.svc:{WORKER_GRPC_PORT}",
        worker_statefulset(dataset),
        worker_service(dataset)
    )
}
/// Cluster-scoped PV of a namespaced resource: the namespace keeps two namespaces' Datasets
/// of one name apart.
pub fn dataset_pv(namespace: &str, dataset: &str) -> String {
    format!("granary-{namespace}-{dataset}")
}
pub fn checkpoint_pv(namespace: &str, policy: &str) -> String {
    format!("granary-{namespace}-{policy}-checkpoint")
}
pub fn dataset_claim(dataset: &str) -> String {
    dataset.to_string()
}
pub fn checkpoint_claim(policy: &str) -> String {
    format!("{policy}-checkpoint")
}
pub const COMMIT_GRPC_PORT: i32 = 7071;
pub const COMMIT_METRICS_PORT: i32 = 9465;
/// The commit coordinator of a CheckpointPolicy: its StatefulSet and Service.
pub fn commit_coordinator(policy: &str) -> String {
    format!("{policy}-commit")
}
pub fn commit_token_secret(policy: &str) -> String {
    format!("{policy}-commit-token")
}
/// Where every node of the policy's volume reaches its coordinator.
pub fn commit_coordinator_address(policy: &str, namespace: &str) -> String {
    format!("{}.{namespace}.svc:{COMMIT_GRPC_PORT}", commit_coordinator(policy))
}
