//! Body compression as kombu does it (oslo.messaging's `kombu_compression`): what
//! this transport sends is compressed as the URL asks, and what it receives is
//! inflated whenever its `compression` header names a stream mqrpc reads.

use std::io::Read;

use lapin::BasicProperties;
use lapin::types::AMQPValue;
use rpc_core::logs::{DEFAULT_WARN_INTERVAL, Escaped, Throttle};
use rpc_core::{Error, Result, TransportErrorKind};

/// How sent bodies are compressed, as kombu compresses them: the body is replaced by
/// the compressed stream and the header `compression` names it, so Python peers
/// (oslo.messaging on kombu) inflate it whatever their own setting is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// A zlib stream, header `application/x-gzip` (kombu's `gzip`).
    Gzip,
    /// A bzip2 stream, header `application/x-bz2` (kombu's `bzip2`).
    Bzip2,
}

impl Compression {
    /// The value of the `compression` header.
    pub fn header(self) -> &'static str {
        match self {
            Compression::Gzip => "application/x-gzip",
            Compression::Bzip2 => "application/x-bz2",
        }
    }

    /// The compression a `compression` header names, if mqrpc reads it.
    pub fn from_header(header: &str) -> Option<Self> {
        [Compression::Gzip, Compression::Bzip2]
            .into_iter()
            .find(|compression| compression.header() == header)
    }

    /// A reader of `body` inflated.
    pub fn decoder(self, body: &[u8]) -> Box<dyn std::io::Read + '_> {
        match self {
            Compression::Gzip => Box::new(flate2::read::ZlibDecoder::new(body)),
            Compression::Bzip2 => Box::new(bzip2::read::BzDecoder::new(body)),
        }
    }

    /// `body`, compressed.
    pub fn compress(self, body: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let out = Vec::with_capacity(body.len() / 2 + 64);
        // Writing to a Vec cannot fail.
        match self {
            Compression::Gzip => {
                let mut encoder =
                    flate2::write::ZlibEncoder::new(out, flate2::Compression::default());
                let _ = encoder.write_all(body);
                encoder.finish().unwrap_or_default()
            }
            Compression::Bzip2 => {
                let mut encoder = bzip2::write::BzEncoder::new(out, bzip2::Compression::default());
                let _ = encoder.write_all(body);
                encoder.finish().unwrap_or_default()
            }
        }
    }
}

/// gzip bodies larger than this are compressed on a blocking thread, not on the
/// caller's worker.
const COMPRESS_INLINE_LIMIT: usize = 64 * 1024;

/// `body` compressed as the URL asked. bzip2 always runs on a blocking thread: it sets
/// up megabytes of working memory even for a small body, and takes tens of
/// milliseconds per MiB.
pub(crate) async fn compressed(
    compression: Compression,
    body: bytes::Bytes,
) -> Result<bytes::Bytes> {
    if compression == Compression::Gzip && body.len() <= COMPRESS_INLINE_LIMIT {
        return Ok(compression.compress(&body).into());
    }
    tokio::task::spawn_blocking(move || compression.compress(&body).into())
        .await
        .map_err(|e| Error::transport(TransportErrorKind::Other, "compressing a message", e))
}

/// Compressed bodies larger than this are inflated with the worker marked as
/// blocking, so the runtime moves its other tasks elsewhere meanwhile.
const INFLATE_INLINE_LIMIT: usize = 16 * 1024;

/// Runs `work`, which inflates a body of `size` compressed bytes. A large one (or any
/// bzip2 one: megabytes of working memory per stream) runs in `block_in_place` on a
/// multi-threaded runtime, which stays synchronous (so nothing about cancellation
/// changes) while the other tasks of this worker move to another.
fn blocking_if_large<T>(size: usize, bzip2: bool, work: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    });
    if multi_thread && (bzip2 || size > INFLATE_INLINE_LIMIT) {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// The body of a delivery, inflated when its sender compressed it: oslo.messaging
/// with `kombu_compression = gzip` sends a zlib stream with the header `compression:
/// application/x-gzip`, with `kombu_compression = bzip2` a bzip2 stream with
/// `application/x-bz2`. A body that does not inflate, inflates beyond
/// `max_message_size`, or uses another compression (kombu's brotli, lzma, zstd) is
/// handed on as it came, with a warning, and then refused as malformed by the server
/// or the client (never lost silently).
pub(crate) fn inflated(
    body: Vec<u8>,
    properties: &BasicProperties,
    max_message_size: usize,
) -> Vec<u8> {
    // Peers choose these bodies: one line per interval, whatever their number.
    static REFUSED: Throttle = Throttle::new(DEFAULT_WARN_INTERVAL);
    let compression = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("compression"))
        .and_then(|value| match value {
            AMQPValue::LongString(text) => Some(text.to_string()),
            AMQPValue::ShortString(text) => Some(text.to_string()),
            _ => None,
        });
    let Some(compression) = compression else {
        return body;
    };
    let Some(kind) = Compression::from_header(&compression) else {
        if let Some(suppressed) = REFUSED.hit() {
            tracing::warn!(compression = %Escaped(&compression), size = body.len(), suppressed,
                "body compression not supported; the message will be refused");
        }
        return body;
    };
    let decoder = kind.decoder(&body);
    let limit = u64::try_from(max_message_size).unwrap_or(u64::MAX);
    let mut text = Vec::with_capacity(body.len().saturating_mul(4).min(max_message_size));
    let read = blocking_if_large(body.len(), kind == Compression::Bzip2, || {
        decoder.take(limit.saturating_add(1)).read_to_end(&mut text)
    });
    match read {
        Ok(size) if u64::try_from(size).unwrap_or(u64::MAX) <= limit => text,
        Ok(_) => {
            if let Some(suppressed) = REFUSED.hit() {
                tracing::warn!(
                    size = body.len(),
                    limit = max_message_size,
                    suppressed,
                    "compressed body inflates beyond max_message_size; the message will be refused"
                );
            }
            body
        }
        Err(err) => {
            if let Some(suppressed) = REFUSED.hit() {
                tracing::warn!(error = %err, size = body.len(), suppressed,
                    "compressed body does not inflate; the message will be refused");
            }
            body
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{FieldTable, LongString, ShortString};

    use super::*;

    /// What this transport sends with `compression=gzip`.
    fn zlib(data: &[u8]) -> Vec<u8> {
        Compression::Gzip.compress(data)
    }

    fn compressed_as(kind: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("compression"),
            AMQPValue::LongString(LongString::from(kind)),
        );
        BasicProperties::default().with_headers(headers)
    }

    /// What this transport sends with `compression=bzip2`.
    fn bz2(data: &[u8]) -> Vec<u8> {
        Compression::Bzip2.compress(data)
    }

    #[test]
    fn inflates_kombu_gzip_and_bz2_bodies_within_the_limit_only() {
        let text = br#"{"oslo.version": "2.0", "oslo.message": "{}"}"#.repeat(20);
        for (kind, compress) in [
            (Compression::Gzip.header(), zlib as fn(&[u8]) -> Vec<u8>),
            (Compression::Bzip2.header(), bz2),
        ] {
            let header = compressed_as(kind);
            let packed = compress(&text);
            assert_ne!(packed, text, "{kind}");
            assert_eq!(inflated(packed.clone(), &header, 1 << 20), text, "{kind}");
            // Exactly at the limit inflates; one byte over is handed on as it came.
            assert_eq!(
                inflated(packed.clone(), &header, text.len()),
                text,
                "{kind}"
            );
            assert_eq!(
                inflated(packed.clone(), &header, text.len() - 1),
                packed,
                "{kind}"
            );
            // A body that does not inflate is handed on as it came.
            assert_eq!(
                inflated(b"not packed".to_vec(), &header, 1 << 20),
                b"not packed"
            );
        }
        // No header: the body is taken as it is, even when it is a zlib stream.
        let plain = BasicProperties::default();
        assert_eq!(inflated(zlib(&text), &plain, 1 << 20), zlib(&text));
        // The header names the compression: a zlib stream called bz2 does not inflate,
        // and a compression kombu has but mqrpc does not read is handed on as it came.
        let called_bz2 = compressed_as("application/x-bz2");
        assert_eq!(inflated(zlib(&text), &called_bz2, 1 << 20), zlib(&text));
        let lzma = compressed_as("application/x-lzma");
        assert_eq!(inflated(bz2(&text), &lzma, 1 << 20), bz2(&text));
    }
}
