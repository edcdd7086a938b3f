//! The node daemon's API, generated from `proto/granary/node/v1/node.proto` and served on a
//! unix socket.

#![allow(clippy::all)]

tonic::include_proto!("granary.node.v1");
