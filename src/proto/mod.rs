//! The generated contract: messages, tonic servers and clients of `proto/turbocat/v1`, the
//! encoded descriptor set (with custom options) that reflection and the REST edge read, and
//! proto3 JSON conversion (`json`) for the REST edge and for the JSON the store keeps in proto
//! shape (agent configs, template bodies), and the well-known types as Rust and JSON values
//! (`wkt`). Below every other module: anything may use it.
//! May call: `error` (the field errors the JSON codec reports).

pub mod codec;
pub mod json;
pub mod wkt;

use std::sync::LazyLock;

use prost_reflect::DescriptorPool;

#[expect(clippy::all, clippy::pedantic, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("turbocat.v1");
}

/// The encoded `FileDescriptorSet` of the whole contract, imports included.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/turbocat_descriptor.bin"));

static DESCRIPTOR_POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    // build.rs wrote this set from the same protos the code was generated from.
    DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("the embedded descriptor set decodes")
});

/// The descriptors of the whole contract, decoded once.
pub fn descriptor_pool() -> &'static DescriptorPool {
    &DESCRIPTOR_POOL
}
