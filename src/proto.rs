//! The generated contract: messages, tonic servers and clients of `proto/turbocat/v1`, and the
//! encoded descriptor set (with custom options) that reflection and the REST edge read.

#[expect(clippy::all, clippy::pedantic, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("turbocat.v1");
}

/// The encoded `FileDescriptorSet` of the whole contract, imports included.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/turbocat_descriptor.bin"));
