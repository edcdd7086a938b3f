//! crds/granary.dev.yaml is what the types generate, and carries the validation users meet.

use serde_yaml::Value;

#[test]
fn the_checked_in_crds_are_current_and_carry_their_validation() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/granary.dev.yaml");
    let checked_in = std::fs::read_to_string(path).expect("crds/granary.dev.yaml");
    let generated = granary_operator::api::crd::yaml().expect("generate");
    assert!(
        checked_in == generated,
        "crds/granary.dev.yaml is stale: run `granary-operator crd > crds/granary.dev.yaml`"
    );

    let docs: Vec<Value> = checked_in
        .split("\n---\n")
        .filter(|d| d.contains("kind: CustomResourceDefinition"))
        .map(|d| serde_yaml::from_str(d).expect("YAML"))
        .collect();
    assert_eq!(docs.len(), 2);
    let dataset = docs
        .iter()
        .find(|d| d["spec"]["names"]["kind"] == "Dataset")
        .expect("Dataset CRD");
    let version = &dataset["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(dataset["spec"]["scope"], "Namespaced");
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_yaml::to_value(vec!["source"]).expect("yaml"));
    let tier = &spec["properties"]["cache"]["properties"]["tiers"]["items"];
    assert_eq!(
        tier["properties"]["medium"]["enum"],
        serde_yaml::to_value(vec!["Memory", "Disk"]).expect("yaml")
    );
    assert!(tier["properties"]["size"]["pattern"]
        .as_str()
        .is_some_and(|p| p.contains("Gi")));
    let policy = &spec["properties"]["prewarm"]["properties"]["policy"]["enum"];
    assert_eq!(
        policy,
        &serde_yaml::to_value(vec!["BeforeScheduling", "Background", "None"]).expect("yaml")
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_sequence()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns, vec!["Phase", "Workers", "Prewarm", "Source", "Age"]);
    assert!(version["subresources"]["status"].is_mapping());

    let ckpt = docs
        .iter()
        .find(|d| d["spec"]["names"]["kind"] == "CheckpointPolicy")
        .expect("CheckpointPolicy CRD");
    let spec = &ckpt["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_yaml::to_value(vec!["target"]).expect("yaml"));
    assert_eq!(
        spec["properties"]["localCache"]["properties"]["medium"]["enum"],
        serde_yaml::to_value(vec!["Memory", "Disk"]).expect("yaml")
    );
}
