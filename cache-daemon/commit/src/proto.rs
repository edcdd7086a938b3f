//! The coordinator's gRPC API, generated from `proto/granary/commit/v1/commit.proto`.

#![allow(clippy::all)]

tonic::include_proto!("granary.commit.v1");
