//! Fuzz target: `pgoutput::decode` on any bytes returns a message or an error, never
//! panics, and the text it returns is sliced out of the input, never copied.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pginval::replication::pgoutput::{Message, Value, decode};

/// Asserts `part` points into `whole` (an empty slice may be a fresh empty `Bytes`).
fn assert_slice_of(whole: &Bytes, part: &Bytes) {
    if part.is_empty() {
        return;
    }
    let range = whole.as_ptr_range();
    assert!(range.start <= part.as_ptr() && part.as_ptr_range().end <= range.end);
}

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    let Ok(msg) = decode(&input) else {
        return;
    };
    let mut parts: Vec<&Bytes> = Vec::new();
    let mut tuples = Vec::new();
    match &msg {
        Message::Origin(o) => parts.push(&o.name),
        Message::Relation(r) => {
            parts.extend([&r.namespace, &r.name]);
            parts.extend(r.columns.iter().map(|c| &c.name));
        }
        Message::Type(t) => parts.extend([&t.namespace, &t.name]),
        Message::Insert(i) => tuples.push(&i.new),
        Message::Update(u) => tuples.extend(u.old.iter().map(|o| o.tuple()).chain([&u.new])),
        Message::Delete(d) => tuples.push(d.old.tuple()),
        Message::Message(m) => parts.extend([&m.prefix, &m.content]),
        Message::Begin(_)
        | Message::Commit(_)
        | Message::Truncate(_)
        | Message::StreamStart(_)
        | Message::StreamStop
        | Message::StreamCommit(_)
        | Message::StreamAbort(_) => {}
    }
    for value in tuples.into_iter().flatten() {
        if let Value::Text(b) | Value::Binary(b) = value {
            parts.push(b);
        }
    }
    for part in parts {
        assert_slice_of(&input, part);
    }
});
