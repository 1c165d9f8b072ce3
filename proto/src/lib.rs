//! Talon's wire protocol, generated from `proto/*.proto` (see `docs/protocol.md`).
//!
//! - [`comms`]: client <-> frontend.
//! - [`cluster`]: minion <-> master (replication stream, broadcasts, remote datastore).
//! - [`api`]: the analyst's API behind the CLI and GUI.
//!
//! Enable the `grpc` feature for the tonic client and server stubs.
#![allow(missing_docs)] // generated code

/// Client <-> frontend messages and the `Comms` service.
pub mod comms {
    include!(concat!(env!("OUT_DIR"), "/talon.comms.rs"));
}

/// Minion <-> master messages and the `Replication` and `RemoteDatastore` services.
pub mod cluster {
    include!(concat!(env!("OUT_DIR"), "/talon.cluster.rs"));
}

/// Analyst API messages and the `Api` service.
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/talon.api.rs"));
}

/// The protobuf codec of every service: prost's, with small starting buffers. Tonic's default gives
/// each stream an 8 KiB decode and an 8 KiB encode buffer up front; a frontend holds one stream per
/// connected client, so that was ~16 KiB per idle client. Buffers grow as large messages need.
#[cfg(feature = "grpc")]
pub mod codec {
    use std::marker::PhantomData;
    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Starting size of each stream's encode and decode buffer.
    pub const BUFFER_BYTES: usize = 1024;
    /// Bytes encoded or decoded before a stream yields to others (tonic's default).
    const YIELD_THRESHOLD: usize = 32 * 1024;

    fn settings() -> BufferSettings {
        BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
    }

    /// The codec the generated services use (`codec_path` in build.rs).
    #[derive(Debug, Clone, Copy)]
    pub struct SmallCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallCodec<T, U> {
        fn default() -> Self {
            SmallCodec(PhantomData)
        }
    }

    impl<T, U> Codec for SmallCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(settings())
        }
    }
}
