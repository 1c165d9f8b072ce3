//! Whether an HTTP/2 connection has opened a stream, from the bytes the client sent: the
//! connection preface, then frames of a 9-byte header (24-bit length, type, flags, stream id) and a
//! payload. A `HEADERS` frame (type 1) opens a stream. Sans-IO and fed in any chunking, so a
//! listener can close a connection that opens none in time (a client that completes TLS and then
//! idles holds a file descriptor for nothing; docs/security.md).

/// The client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame type of `HEADERS`.
const HEADERS: u8 = 1;

/// Scans a client's bytes for its first `HEADERS` frame.
#[derive(Clone, Debug, Default)]
pub struct StreamScan {
    /// Preface bytes seen.
    preface: usize,
    /// The current frame header's bytes seen so far.
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    opened: bool,
}

impl StreamScan {
    /// A scan at the start of a connection.
    pub fn new() -> StreamScan {
        StreamScan::default()
    }

    /// True once a `HEADERS` frame was seen (then `feed` does nothing more).
    pub fn opened(&self) -> bool {
        self.opened
    }

    /// Scans the next bytes the client sent; returns [`StreamScan::opened`].
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !self.opened && !bytes.is_empty() {
            if self.preface < PREFACE.len() {
                let n = (PREFACE.len() - self.preface).min(bytes.len());
                self.preface += n;
                bytes = &bytes[n..];
            } else if self.skip > 0 {
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    let h = self.header;
                    self.opened = h[3] == HEADERS;
                    self.skip = u64::from(h[0]) << 16 | u64::from(h[1]) << 8 | u64::from(h[2]);
                    self.header_len = 0;
                }
            }
        }
        self.opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    /// A connection: the preface, settings, a window update, a ping, then maybe a request.
    fn conversation(request: bool) -> Vec<u8> {
        let mut c = PREFACE.to_vec();
        c.extend(frame(4, &[0; 12])); // SETTINGS
        c.extend(frame(8, &[0, 0, 1, 0])); // WINDOW_UPDATE
        c.extend(frame(6, &[1; 8])); // PING
        // A SETTINGS payload that contains the byte 1 where a type would be: not a HEADERS frame.
        c.extend(frame(4, &[1; 6]));
        if request {
            c.extend(frame(HEADERS, &[0x82, 0x86]));
        }
        c
    }

    #[test]
    fn a_headers_frame_opens_a_stream_and_other_frames_do_not() {
        assert!(!StreamScan::new().feed(&conversation(false)));
        assert!(StreamScan::new().feed(&conversation(true)));
        assert!(!StreamScan::new().feed(PREFACE));
        assert!(!StreamScan::new().feed(&[]));
    }

    proptest! {
        /// Any chunking of the same bytes gives the same answer.
        #[test]
        fn chunking_does_not_matter(request: bool, cuts in prop::collection::vec(0usize..200, 0..20)) {
            let bytes = conversation(request);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort();
            let mut s = StreamScan::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                s.feed(&bytes[at..c.max(at)]);
                at = c.max(at);
            }
            prop_assert_eq!(s.opened(), request);
        }
    }
}
