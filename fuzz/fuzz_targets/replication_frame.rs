//! Fuzz target: a CopyData payload through `protocol::decode_frame` and, for XLogData,
//! its payload through `pgoutput::decode`, as the replication stream does.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pginval::replication::pgoutput::decode;
use pginval::replication::protocol::{ServerFrame, decode_frame};

/// XLogData's fixed header: tag, start LSN, WAL end, server time.
const XLOGDATA_HEADER: usize = 25;

fuzz_target!(|data: &[u8]| {
    if let Ok(ServerFrame::XLogData { data: payload, .. }) =
        decode_frame(Bytes::copy_from_slice(data))
    {
        assert_eq!(payload.len(), data.len() - XLOGDATA_HEADER);
        let _ = decode(&payload);
    }
});
