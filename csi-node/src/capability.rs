//! Which volume capabilities Granary volumes serve, and whether a publish is read-only.
//!
//! Both kinds are filesystems (no raw block). A dataset is read-only everywhere: reader modes
//! and the single-node writer modes kubelet uses for inline volumes are accepted and mounted
//! read-only; multi-node writer modes are refused. A checkpoint volume serves every mode:
//! each node writes through its own write-back area, and writers on different nodes must
//! write different paths (one directory per rank or per step).

use tonic::Status;

use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_capability::AccessType;
use crate::proto::VolumeCapability;
use crate::volume_context::VolumeKind;

/// Checks `capability` for a volume of `kind`; returns whether the mount must be read-only
/// because of the access mode.
pub fn check(capability: Option<&VolumeCapability>, kind: VolumeKind) -> Result<bool, Status> {
    let capability = capability.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    match capability.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => {
            return Err(Status::invalid_argument(
                "Granary volumes are filesystems, not block devices; use volumeMode: Filesystem",
            ))
        }
        None => {
            return Err(Status::invalid_argument(
                "volume_capability has no access_type; it must be mount",
            ))
        }
    }
    let mode = capability
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    let reader_only = matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly);
    match (kind, mode) {
        (_, Mode::Unknown) => Err(Status::invalid_argument(
            "volume_capability.access_mode is missing or unknown",
        )),
        (VolumeKind::Dataset, Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter) => {
            Err(Status::invalid_argument(format!(
                "a dataset is read-only and cannot be published with {}; use accessModes [ReadOnlyMany]",
                mode.as_str_name()
            )))
        }
        (VolumeKind::Dataset, _) => Ok(true),
        (VolumeKind::Checkpoint, _) => Ok(reader_only),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, block: bool) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume::default())
            }),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn datasets_are_read_only_and_checkpoints_follow_the_mode() {
        assert!(check(Some(&cap(Mode::MultiNodeReaderOnly, false)), VolumeKind::Dataset).unwrap());
        assert!(check(Some(&cap(Mode::SingleNodeWriter, false)), VolumeKind::Dataset).unwrap());
        assert!(check(Some(&cap(Mode::MultiNodeMultiWriter, false)), VolumeKind::Dataset).is_err());
        assert!(!check(Some(&cap(Mode::MultiNodeMultiWriter, false)), VolumeKind::Checkpoint).unwrap());
        assert!(check(Some(&cap(Mode::SingleNodeReaderOnly, false)), VolumeKind::Checkpoint).unwrap());
        for bad in [cap(Mode::SingleNodeWriter, true), cap(Mode::Unknown, false)] {
            let err = check(Some(&bad), VolumeKind::Checkpoint).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
        }
        assert_eq!(
            check(None, VolumeKind::Dataset).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
