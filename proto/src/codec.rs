//! The gRPC codec of every wayside service: prost, with one difference from
//! `tonic_prost::ProstCodec`: a message's encoded length is reserved in the send buffer
//! before it is encoded. prost writes field by field, so a message carrying block data
//! (a 64 KiB batch reply, a 1 MiB migration frame) otherwise grew tonic's buffer several
//! times, copying what was already encoded each time (~7% of a batched-read run's CPU).

use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::Status;

/// Encodes `T`, decodes `U` (the generated clients and servers name it via `codec_path`).
#[derive(Debug, Clone, Copy)]
pub struct WaysideCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WaysideCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for WaysideCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(BufferSettings::default())
    }
}

/// prost encoding into a buffer sized for the whole message first.
#[derive(Debug, Clone, Copy)]
pub struct ReservingEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf).map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
