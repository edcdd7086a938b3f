//! Types both resources share: a store reference, sizes written as Kubernetes quantities, and
//! status conditions.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Where bytes live: a source store for a dataset, the target store for checkpoints.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreRef {
    /// The store URI: `s3://bucket/prefix/`, `fs:///path` (gcs://, azblob://, oss://,
    /// webhdfs:// with the images built with them).
    #[schemars(regex(pattern = r"^[A-Za-z0-9]+://"))]
    pub uri: String,
    /// Store options other than credentials, e.g. `endpoint: http://minio:9000`,
    /// `region: us-east-1`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// A Secret in the same namespace whose keys are store options holding credentials
    /// (`access_key_id`, `secret_access_key`, `session_token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}

/// A byte size written as a Kubernetes quantity: `200Gi`, `512Mi`, `4M`, `1073741824`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct ByteQuantity(pub String);

pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

impl JsonSchema for ByteQuantity {
    fn schema_name() -> Cow<'static, str> {
        "ByteQuantity".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": QUANTITY_PATTERN,
            "description": "A byte size as a Kubernetes quantity, e.g. 200Gi, 512Mi, 4M."
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a byte size; write a Kubernetes quantity such as 200Gi, 512Mi or 4M")]
pub struct QuantityError {
    pub value: String,
}

impl ByteQuantity {
    pub fn new(s: &str) -> Self {
        ByteQuantity(s.to_string())
    }

    /// The size in bytes (fractions are rounded down).
    pub fn bytes(&self) -> Result<u64, QuantityError> {
        let err = || QuantityError { value: self.0.clone() };
        let s = self.0.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        let multiplier: u64 = match suffix {
            "" => 1,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "P" => 1_000_000_000_000_000,
            "E" => 1_000_000_000_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "Pi" => 1 << 50,
            "Ei" => 1 << 60,
            _ => return Err(err()),
        };
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return Err(err());
        }
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u64 = whole.parse().map_err(|_| err())?;
        let mut bytes = whole.checked_mul(multiplier).ok_or_else(err)?;
        if !fraction.is_empty() {
            let digits = fraction.len().min(18) as u32;
            let frac: u64 = fraction[..digits as usize].parse().map_err(|_| err())?;
            let scaled = (frac as u128 * multiplier as u128) / 10u128.pow(digits);
            bytes = bytes.checked_add(scaled as u64).ok_or_else(err)?;
        }
        Ok(bytes)
    }
}

/// Status condition types and reasons live beside the resource; this sets one condition,
/// keeping its transition time when the status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if ok { "True" } else { "False" };
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status != status {
            existing.last_transition_time = now();
        }
        existing.status = status.to_string();
        existing.reason = reason.to_string();
        existing.message = message.to_string();
        existing.observed_generation = generation;
        return;
    }
    conditions.push(Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: now(),
    });
}

pub fn condition_is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

pub fn now() -> Time {
    Time(Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_in_every_suffix_and_the_mistakes_users_make() {
        let b = |s: &str| ByteQuantity::new(s).bytes();
        assert_eq!(b("200Gi"), Ok(200 << 30));
        assert_eq!(b("4M"), Ok(4_000_000));
        assert_eq!(b("1.5Gi"), Ok(3 << 29));
        assert_eq!(b("1073741824"), Ok(1 << 30));
        assert_eq!(b("512Mi"), Ok(512 << 20));
        for bad in ["", "Gi", "10GB", "10 Gi", "1.Gi", "-1Gi", "99999999999Ei"] {
            let e = b(bad).unwrap_err();
            assert!(e.to_string().contains("200Gi"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, "Prewarmed", false, "Loading", "10%", Some(1));
        let first = conditions[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        set_condition(&mut conditions, "Prewarmed", false, "Loading", "50%", Some(1));
        assert_eq!(conditions[0].last_transition_time, first);
        assert_eq!(conditions[0].message, "50%");
        set_condition(&mut conditions, "Prewarmed", true, "Loaded", "done", Some(2));
        assert_ne!(conditions[0].last_transition_time, first);
        assert!(condition_is_true(&conditions, "Prewarmed"));
        assert_eq!(conditions.len(), 1);
    }
}
