//! The streaming replication frames inside CopyData: XLogData (`w`), primary keepalive
//! (`k`) and standby status update (`r`).
//!
//! Pure codecs: they never touch the socket. The payload of an XLogData frame is
//! returned as a slice of the frame, not a copy.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use super::pgoutput::Lsn;

/// Seconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// A frame the server sends inside CopyData during logical replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// `w`: WAL data, here one pgoutput message.
    XLogData {
        /// WAL position where this message starts.
        start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock, microseconds since 2000-01-01.
        server_time: i64,
        /// The pgoutput message.
        data: Bytes,
    },
    /// `k`: a keepalive.
    Keepalive {
        /// The server's current end of WAL (everything before it was sent).
        wal_end: Lsn,
        /// Server clock, microseconds since 2000-01-01.
        server_time: i64,
        /// The server asks for a status update right away.
        reply_requested: bool,
    },
}

/// Why a replication frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is shorter than its fixed header.
    #[error("replication frame {tag:?} truncated: {len} bytes, need {need}")]
    Truncated {
        /// Frame tag.
        tag: char,
        /// Bytes present.
        len: usize,
        /// Bytes required.
        need: usize,
    },
    /// An unknown frame tag (or an empty frame).
    #[error("unknown replication frame tag {0:?}")]
    UnknownTag(char),
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes the payload of one CopyData message from a walsender.
pub fn decode_frame(frame: Bytes) -> Result<ServerFrame, FrameError> {
    let tag = frame.first().copied().unwrap_or(0);
    let need = match tag {
        b'w' => 25,
        b'k' => 18,
        other => return Err(FrameError::UnknownTag(other as char)),
    };
    if frame.len() < need {
        return Err(FrameError::Truncated {
            tag: tag as char,
            len: frame.len(),
            need,
        });
    }
    Ok(if tag == b'w' {
        ServerFrame::XLogData {
            start: be_u64(&frame[1..]),
            wal_end: be_u64(&frame[9..]),
            server_time: be_u64(&frame[17..]) as i64,
            data: frame.slice(25..),
        }
    } else {
        ServerFrame::Keepalive {
            wal_end: be_u64(&frame[1..]),
            server_time: be_u64(&frame[9..]) as i64,
            reply_requested: frame[17] != 0,
        }
    })
}

/// Encodes a standby status update (`r`): the positions written, flushed and applied.
///
/// pginval reports the same position for all three: the end of the last commit whose
/// invalidations Redis acknowledged.
pub fn standby_status(lsn: Lsn, now_micros: i64, reply_requested: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(lsn);
    b.put_u64(lsn);
    b.put_u64(lsn);
    b.put_i64(now_micros);
    b.put_u8(reply_requested as u8);
    b.freeze()
}

/// Current time in microseconds since the Postgres epoch.
pub fn pg_now_micros() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    since_unix.as_micros() as i64 - (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000
}

/// Converts a Postgres timestamp (microseconds since 2000-01-01) to `SystemTime`.
pub fn pg_time(micros: i64) -> SystemTime {
    let unix_micros = micros + (PG_EPOCH_OFFSET_SECS as i64) * 1_000_000;
    if unix_micros >= 0 {
        UNIX_EPOCH + Duration::from_micros(unix_micros as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Formats an LSN the way Postgres prints it (`16/B374D848`).
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses an LSN in Postgres' `X/X` form.
pub fn parse_lsn(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlogdata_payload_is_a_slice_after_the_header() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x16_0000_0010);
        b.put_u64(0x16_0000_0020);
        b.put_i64(7);
        b.put_slice(b"Bxyz");
        let frame = decode_frame(b.freeze()).unwrap();
        assert_eq!(
            frame,
            ServerFrame::XLogData {
                start: 0x16_0000_0010,
                wal_end: 0x16_0000_0020,
                server_time: 7,
                data: Bytes::from_static(b"Bxyz"),
            }
        );
    }

    #[test]
    fn keepalive_reply_flag_is_read() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(99);
        b.put_i64(1);
        b.put_u8(1);
        assert!(matches!(
            decode_frame(b.freeze()).unwrap(),
            ServerFrame::Keepalive {
                wal_end: 99,
                reply_requested: true,
                ..
            }
        ));
    }

    #[test]
    fn short_and_unknown_frames_are_errors() {
        assert!(decode_frame(Bytes::from_static(b"w123")).is_err());
        assert!(decode_frame(Bytes::from_static(b"k")).is_err());
        assert!(decode_frame(Bytes::new()).is_err());
        assert!(decode_frame(Bytes::from_static(b"q12345678901234567890123456")).is_err());
    }

    #[test]
    fn standby_status_has_the_documented_layout() {
        let b = standby_status(0x1_0000_0002, 5, false);
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(be_u64(&b[1..]), 0x1_0000_0002);
        assert_eq!(be_u64(&b[17..]), 0x1_0000_0002);
        assert_eq!(b[33], 0);
    }

    #[test]
    fn lsn_round_trips_through_text() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nope"), None);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_after_any_tag_never_panic(
            tag in proptest::sample::select(b"wkrZ".to_vec()),
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let _ = decode_frame(Bytes::from([&[tag][..], &rest].concat()));
        }

        #[test]
        fn xlogdata_header_round_trips_and_a_short_header_is_truncated(
            (start, wal_end, server_time) in proptest::prelude::any::<(u64, u64, i64)>(),
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut b = BytesMut::new();
            b.put_u8(b'w');
            b.put_u64(start);
            b.put_u64(wal_end);
            b.put_i64(server_time);
            b.put_slice(&payload);
            let frame = b.freeze();
            proptest::prop_assert_eq!(
                decode_frame(frame.clone()),
                Ok(ServerFrame::XLogData {
                    start,
                    wal_end,
                    server_time,
                    data: Bytes::from(payload),
                })
            );
            for len in 1..25 {
                proptest::prop_assert_eq!(
                    decode_frame(frame.slice(..len)),
                    Err(FrameError::Truncated { tag: 'w', len, need: 25 })
                );
            }
        }

        #[test]
        fn keepalive_round_trips_and_any_nonzero_flag_asks_for_a_reply(
            (wal_end, server_time, flag) in proptest::prelude::any::<(u64, i64, u8)>(),
        ) {
            let mut b = BytesMut::new();
            b.put_u8(b'k');
            b.put_u64(wal_end);
            b.put_i64(server_time);
            b.put_u8(flag);
            proptest::prop_assert_eq!(
                decode_frame(b.freeze()),
                Ok(ServerFrame::Keepalive {
                    wal_end,
                    server_time,
                    reply_requested: flag != 0,
                })
            );
        }

        #[test]
        fn lsn_text_round_trips(lsn in proptest::prelude::any::<u64>()) {
            proptest::prop_assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
    }

    /// Replays the `replication_frame` fuzz target's seeds and regression inputs: each
    /// frame is decoded, and an XLogData payload goes on to the pgoutput decoder.
    #[test]
    fn fuzz_corpus_and_regressions_decode_without_panic() {
        for (path, bytes) in crate::fuzz_inputs::fuzz_inputs("replication_frame") {
            let frame = Bytes::from(bytes);
            let result = std::panic::catch_unwind(|| {
                if let Ok(ServerFrame::XLogData { data, .. }) = decode_frame(frame) {
                    let _ = crate::replication::pgoutput::decode(&data);
                }
            });
            assert!(result.is_ok(), "{} panicked", path.display());
        }
    }
}
