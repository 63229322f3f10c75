//! The codec of every generated service and client: prost's, except that a message that does
//! not decode (malformed, or nested deeper than the decoder's limit of 100 levels) is the
//! caller's fault, INVALID_ARGUMENT, never INTERNAL (tonic-prost's answer).
//! May call: tonic and tonic-prost.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// `ProstCodec` with decode failures as INVALID_ARGUMENT (see the module comment).
pub struct InvalidArgumentCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for InvalidArgumentCodec<T, U> {
    fn default() -> Self {
        Self { inner: ProstCodec::default() }
    }
}

impl<T, U> Codec for InvalidArgumentCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = InvalidArgumentDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder { inner: self.inner.decoder() }
    }
}

/// Wraps a decoder, turning its INTERNAL errors (a message that does not decode) into
/// INVALID_ARGUMENT.
pub struct InvalidArgumentDecoder<D> {
    inner: D,
}

impl<D> Decoder for InvalidArgumentDecoder<D>
where
    D: Decoder<Error = Status>,
{
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.inner.decode(buffer).map_err(|status| {
            if status.code() == Code::Internal {
                Status::invalid_argument(format!(
                    "the message cannot be decoded (malformed, or nested too deeply): {}",
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
