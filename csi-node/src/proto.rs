//! The CSI spec's gRPC API (`proto/csi/v1/csi.proto`, package `csi.v1`).

#![allow(clippy::all)]

tonic::include_proto!("csi.v1");
