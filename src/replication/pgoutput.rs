//! The pgoutput message decoder (protocol versions 1 and 2): bytes in, typed messages
//! out. Version 2 adds streamed transactions: Stream Start/Stop/Commit/Abort, and the
//! (sub)transaction's xid on every message between a Stream Start and its Stop.
//!
//! Pure: no IO, no logging, no allocation of copies — text and binary values are
//! `Bytes` slices of the XLogData payload. Never panics; a malformed message is an
//! error naming the message tag and the byte offset where decoding stopped.

use bytes::Bytes;

/// A Postgres WAL position.
pub type Lsn = u64;

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message is empty: not even a tag byte.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is not a pgoutput message tag.
    #[error("unknown pgoutput message tag {tag:?} at offset 0")]
    UnknownTag {
        /// The tag byte as a char.
        tag: char,
    },
    /// The message ended before a field it must contain.
    #[error("pgoutput message {tag:?} truncated at offset {offset}: expected {what}")]
    Truncated {
        /// Message tag.
        tag: char,
        /// Offset where more bytes were expected.
        offset: usize,
        /// The field that was being read.
        what: &'static str,
    },
    /// A field holds a value the protocol does not allow.
    #[error("pgoutput message {tag:?} invalid at offset {offset}: {what}")]
    Invalid {
        /// Message tag.
        tag: char,
        /// Offset of the offending field.
        offset: usize,
        /// What is wrong.
        what: &'static str,
    },
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: the transaction commits.
    Commit(Commit),
    /// `O`: the changes originated on another node.
    Origin(Origin),
    /// `R`: the description of a table, sent before its first change.
    Relation(Relation),
    /// `Y`: the description of a user-defined type.
    Type(TypeInfo),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
    /// `M`: a `pg_logical_emit_message` call.
    Message(LogicalMessage),
    /// `S`: a block of an in-progress transaction's changes starts (version 2).
    StreamStart(StreamStart),
    /// `E`: the block ends.
    StreamStop,
    /// `c`: a streamed transaction commits.
    StreamCommit(StreamCommit),
    /// `A`: a streamed transaction, or one of its subtransactions, aborts.
    StreamAbort(StreamAbort),
}

/// `Stream Start` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The top-level transaction's id.
    pub xid: u32,
    /// Whether this is the transaction's first block.
    pub first_segment: bool,
}

/// `Stream Commit` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// The top-level transaction's id.
    pub xid: u32,
    /// What a non-streamed transaction's `Commit` would say.
    pub commit: Commit,
}

/// `Stream Abort` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction's id.
    pub xid: u32,
    /// The aborted subtransaction's id; equal to `xid` when the whole transaction aborts.
    pub subxid: u32,
}

/// `Begin` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
}

/// `Commit` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags (unused, 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction: the position to confirm once it is applied.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
}

/// `Origin` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// Origin name.
    pub name: Bytes,
}

/// A column of a `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit 0 set: the column is part of the replica identity.
    pub flags: u8,
    /// Column name.
    pub name: Bytes,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

impl Column {
    /// Whether the column belongs to the table's replica identity (key).
    pub fn is_key(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Table OID.
    pub oid: u32,
    /// Schema name (empty for pg_catalog).
    pub namespace: Bytes,
    /// Table name.
    pub name: Bytes,
    /// REPLICA IDENTITY setting: `d`efault, `n`othing, `f`ull, `i`ndex.
    pub replica_identity: u8,
    /// The published columns, in tuple order.
    pub columns: Vec<Column>,
}

/// `Type` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// Type OID.
    pub oid: u32,
    /// Schema name.
    pub namespace: Bytes,
    /// Type name.
    pub name: Bytes,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that was not sent: unknown, never NULL.
    UnchangedToast,
    /// The value in Postgres' text output form.
    Text(Bytes),
    /// The value in binary send form.
    Binary(Bytes),
}

/// A row image: one value per column of the relation.
pub type Tuple = Vec<Value>;

/// `Insert` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Table OID.
    pub relation: u32,
    /// The new row.
    pub new: Tuple,
}

/// The old row image sent with an `Update` or `Delete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity columns (others are NULL).
    Key(Tuple),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    /// The values, whichever kind of image this is.
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// `Update` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Table OID.
    pub relation: u32,
    /// The old image, when Postgres sent one.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: Tuple,
}

/// `Delete` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Table OID.
    pub relation: u32,
    /// The deleted row's key or whole image.
    pub old: OldTuple,
}

/// `Truncate` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 0: CASCADE, bit 1: RESTART IDENTITY.
    pub options: u8,
    /// OIDs of the truncated tables.
    pub relations: Vec<u32>,
}

/// `Message` message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Whether the message belongs to the surrounding transaction.
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The prefix given by the caller.
    pub prefix: Bytes,
    /// The payload.
    pub content: Bytes,
}

/// Decodes one pgoutput message (the payload of an XLogData frame) outside a stream
/// block: protocol version 1, and version 2 between transactions.
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    decode_in(buf, false).map(|(_, msg)| msg)
}

/// Decodes one pgoutput message; `in_stream`: it came between a Stream Start and its
/// Stop, where every change, Relation, Type and Message carries the xid of the
/// (sub)transaction it belongs to, returned first.
pub fn decode_in(buf: &Bytes, in_stream: bool) -> Result<(Option<u32>, Message), DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty);
    };
    let mut r = Reader {
        buf,
        pos: 1,
        tag: tag as char,
    };
    let xid = match tag {
        b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M' if in_stream => Some(r.u32("xid")?),
        _ => None,
    };
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time: r.i64("commit time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(r.commit()?),
        b'S' => Message::StreamStart(StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.u8("first segment flag")? == 1,
        }),
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            commit: r.commit()?,
        }),
        // Protocol version 4 adds the abort's LSN and time; version 2 ends here.
        b'A' => Message::StreamAbort(StreamAbort {
            xid: r.u32("xid")?,
            subxid: r.u32("subtransaction xid")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: r.u64("origin commit LSN")?,
            name: r.cstr("origin name")?,
        }),
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.u16("column count")?;
            // Each column takes at least 10 bytes; cap the reservation by what is there.
            let mut columns = Vec::with_capacity((n as usize).min(r.remaining() / 10));
            for _ in 0..n {
                columns.push(Column {
                    flags: r.u8("column flags")?,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type oid")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type(TypeInfo {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => {
            let relation = r.u32("relation oid")?;
            r.expect(b'N', "new tuple marker 'N'")?;
            Message::Insert(Insert {
                relation,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let old = match r.peek("tuple marker")? {
                b'K' | b'O' => Some(r.old_tuple()?),
                _ => None,
            };
            r.expect(b'N', "new tuple marker 'N'")?;
            Message::Update(Update {
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => Message::Delete(Delete {
            relation: r.u32("relation oid")?,
            old: r.old_tuple()?,
        }),
        b'T' => {
            let n = r.u32("relation count")?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity((n as usize).min(r.remaining() / 4));
            for _ in 0..n {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate(Truncate { options, relations })
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = r.u64("message LSN")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("message length")? as usize;
            Message::Message(LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            })
        }
        other => {
            return Err(DecodeError::UnknownTag { tag: other as char });
        }
    };
    Ok((xid, msg))
}

/// A cursor over one message that turns every short read into a `Truncated` error.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: char,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self, what: &'static str) -> DecodeError {
        DecodeError::Truncated {
            tag: self.tag,
            offset: self.pos,
            what,
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let slice = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or_else(|| self.truncated(what))?;
        self.pos += N;
        // The slice has exactly N bytes, so the conversion cannot fail.
        Ok(slice.try_into().unwrap_or([0; N]))
    }

    fn peek(&self, what: &'static str) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.truncated(what))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        if self.u8(what)? != byte {
            return Err(DecodeError::Invalid {
                tag: self.tag,
                offset: at,
                what,
            });
        }
        Ok(())
    }

    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if self.remaining() < len {
            return Err(self.truncated(what));
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A NUL-terminated string, returned without its terminator.
    fn cstr(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated(what))?;
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len + 1;
        Ok(out)
    }

    /// The fields `Commit` and `Stream Commit` share.
    fn commit(&mut self) -> Result<Commit, DecodeError> {
        Ok(Commit {
            flags: self.u8("flags")?,
            commit_lsn: self.u64("commit LSN")?,
            end_lsn: self.u64("end LSN")?,
            commit_time: self.i64("commit time")?,
        })
    }

    fn old_tuple(&mut self) -> Result<OldTuple, DecodeError> {
        let at = self.pos;
        match self.u8("old tuple marker")? {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            _ => Err(DecodeError::Invalid {
                tag: self.tag,
                offset: at,
                what: "old tuple marker must be 'K' or 'O'",
            }),
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.u16("tuple column count")?;
        // Every column takes at least one byte.
        let mut values = Vec::with_capacity((n as usize).min(self.remaining()));
        for _ in 0..n {
            let at = self.pos;
            let value = match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.u32("column value length")? as usize;
                    let data = self.bytes(len, "column value")?;
                    if kind == b't' {
                        Value::Text(data)
                    } else {
                        Value::Binary(data)
                    }
                }
                _ => {
                    return Err(DecodeError::Invalid {
                        tag: self.tag,
                        offset: at,
                        what: "column kind must be 'n', 'u', 't' or 'b'",
                    });
                }
            };
            values.push(value);
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert_bytes() -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend_from_slice(&16384u32.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&3u16.to_be_bytes());
        b.push(b't');
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(b"42");
        b.push(b'n');
        b.push(b'u');
        b
    }

    #[test]
    fn insert_decodes_text_null_and_unchanged_toast() {
        let msg = decode(&Bytes::from(insert_bytes())).unwrap();
        assert_eq!(
            msg,
            Message::Insert(Insert {
                relation: 16384,
                new: vec![
                    Value::Text(Bytes::from_static(b"42")),
                    Value::Null,
                    Value::UnchangedToast
                ],
            })
        );
    }

    #[test]
    fn every_truncation_of_a_message_is_an_error_not_a_panic() {
        let full = insert_bytes();
        for len in 0..full.len() {
            let err = decode(&Bytes::copy_from_slice(&full[..len])).unwrap_err();
            assert!(
                matches!(err, DecodeError::Truncated { .. } | DecodeError::Empty),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn unknown_tag_is_reported() {
        let err = decode(&Bytes::from_static(b"Zxyz")).unwrap_err();
        assert_eq!(err, DecodeError::UnknownTag { tag: 'Z' });
    }

    #[test]
    fn huge_declared_counts_do_not_allocate_or_panic() {
        let mut b = vec![b'T'];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        b.push(0);
        assert!(matches!(
            decode(&Bytes::from(b)),
            Err(DecodeError::Truncated { .. })
        ));
    }

    /// Real pgoutput bytes captured by `scripts/capture-pgoutput.sh`.
    fn fixture(text: &str) -> Vec<Bytes> {
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(_, hex)| {
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect::<Vec<u8>>();
                Bytes::from(bytes)
            })
            .collect()
    }

    const TEXT: &str = include_str!("../../tests/fixtures/pgoutput/text.hex");
    const BINARY: &str = include_str!("../../tests/fixtures/pgoutput/binary.hex");

    fn tags(messages: &[Message]) -> String {
        messages
            .iter()
            .map(|m| match m {
                Message::Begin(_) => 'B',
                Message::Commit(_) => 'C',
                Message::Origin(_) => 'O',
                Message::Relation(_) => 'R',
                Message::Type(_) => 'Y',
                Message::Insert(_) => 'I',
                Message::Update(_) => 'U',
                Message::Delete(_) => 'D',
                Message::Truncate(_) => 'T',
                Message::Message(_) => 'M',
                Message::StreamStart(_) => 'S',
                Message::StreamStop => 'E',
                Message::StreamCommit(_) => 'c',
                Message::StreamAbort(_) => 'A',
            })
            .collect()
    }

    #[test]
    fn captured_text_stream_decodes_every_message_kind() {
        let msgs: Vec<Message> = fixture(TEXT).iter().map(|b| decode(b).unwrap()).collect();
        assert_eq!(
            tags(&msgs),
            "BYRIICBUCBUCBDCBRIIUDCBRICBUCBRICBOICBMCMBRRTCBRTC"
        );
        let Message::Relation(account) = &msgs[2] else {
            panic!()
        };
        assert_eq!(&account.name[..], b"account");
        assert_eq!(&account.namespace[..], b"public");
        assert!(account.columns[0].is_key());
        // A primary key change carries the old key; other columns are 'n' in it.
        let Message::Update(pk_change) = &msgs[10] else {
            panic!()
        };
        let Some(OldTuple::Key(old)) = &pk_change.old else {
            panic!("{pk_change:?}")
        };
        assert!(matches!(old[0], Value::Text(_)));
        assert_eq!(old[1], Value::Null);
        // REPLICA IDENTITY FULL sends the whole old row.
        let Message::Update(full) = &msgs[19] else {
            panic!()
        };
        assert!(matches!(full.old, Some(OldTuple::Full(_))));
        // An update leaving a TOASTed column alone marks it unchanged, not NULL.
        let Message::Update(toast) = &msgs[27] else {
            panic!()
        };
        assert_eq!(toast.new[2], Value::UnchangedToast);
        let Message::Origin(origin) = &msgs[34] else {
            panic!()
        };
        assert_eq!(&origin.name[..], b"pginval_fixture_origin");
        let Message::Message(m) = &msgs[40] else {
            panic!()
        };
        assert!(!m.transactional);
        let Message::Truncate(t) = &msgs[44] else {
            panic!()
        };
        assert_eq!((t.options, t.relations.len()), (3, 2));
        let Message::Commit(c) = &msgs[5] else {
            panic!()
        };
        assert!(c.end_lsn > c.commit_lsn);
    }

    #[test]
    fn captured_binary_stream_decodes_binary_values() {
        let msgs: Vec<Message> = fixture(BINARY).iter().map(|b| decode(b).unwrap()).collect();
        let Message::Insert(i) = &msgs[3] else {
            panic!()
        };
        assert!(matches!(i.new[0], Value::Binary(_)));
    }

    #[test]
    fn every_prefix_of_every_captured_message_is_an_error_not_a_panic() {
        for msg in fixture(TEXT).iter().chain(&fixture(BINARY)) {
            for len in 0..msg.len() {
                assert!(decode(&msg.slice(..len)).is_err());
            }
        }
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        // xorshift: deterministic, no dependency; the fuzz target explores further.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let tags = b"BCORYIUDTMX";
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = b.first_mut() {
                *first = tags[(next() % tags.len() as u64) as usize];
            }
            let _ = decode(&Bytes::from(b));
        }
    }

    /// Every captured message, parsed once for all property test cases.
    static CAPTURED: std::sync::LazyLock<Vec<Bytes>> =
        std::sync::LazyLock::new(|| fixture(TEXT).into_iter().chain(fixture(BINARY)).collect());

    /// Encodes a message as pgoutput sends it: the inverse of `decode`.
    fn encode(msg: &Message) -> Vec<u8> {
        fn cstr(b: &mut Vec<u8>, s: &[u8]) {
            b.extend_from_slice(s);
            b.push(0);
        }
        fn data(b: &mut Vec<u8>, kind: u8, d: &[u8]) {
            b.push(kind);
            b.extend((d.len() as u32).to_be_bytes());
            b.extend_from_slice(d);
        }
        fn tuple(b: &mut Vec<u8>, marker: u8, t: &Tuple) {
            b.push(marker);
            b.extend((t.len() as u16).to_be_bytes());
            for v in t {
                match v {
                    Value::Null => b.push(b'n'),
                    Value::UnchangedToast => b.push(b'u'),
                    Value::Text(d) => data(b, b't', d),
                    Value::Binary(d) => data(b, b'b', d),
                }
            }
        }
        fn old(b: &mut Vec<u8>, o: &OldTuple) {
            match o {
                OldTuple::Key(t) => tuple(b, b'K', t),
                OldTuple::Full(t) => tuple(b, b'O', t),
            }
        }
        let mut b = Vec::new();
        match msg {
            Message::Begin(m) => {
                b.push(b'B');
                b.extend(m.final_lsn.to_be_bytes());
                b.extend(m.commit_time.to_be_bytes());
                b.extend(m.xid.to_be_bytes());
            }
            Message::Commit(m) => {
                b.extend([b'C', m.flags]);
                b.extend(m.commit_lsn.to_be_bytes());
                b.extend(m.end_lsn.to_be_bytes());
                b.extend(m.commit_time.to_be_bytes());
            }
            Message::Origin(m) => {
                b.push(b'O');
                b.extend(m.commit_lsn.to_be_bytes());
                cstr(&mut b, &m.name);
            }
            Message::Relation(m) => {
                b.push(b'R');
                b.extend(m.oid.to_be_bytes());
                cstr(&mut b, &m.namespace);
                cstr(&mut b, &m.name);
                b.push(m.replica_identity);
                b.extend((m.columns.len() as u16).to_be_bytes());
                for c in &m.columns {
                    b.push(c.flags);
                    cstr(&mut b, &c.name);
                    b.extend(c.type_oid.to_be_bytes());
                    b.extend(c.type_modifier.to_be_bytes());
                }
            }
            Message::Type(m) => {
                b.push(b'Y');
                b.extend(m.oid.to_be_bytes());
                cstr(&mut b, &m.namespace);
                cstr(&mut b, &m.name);
            }
            Message::Insert(m) => {
                b.push(b'I');
                b.extend(m.relation.to_be_bytes());
                tuple(&mut b, b'N', &m.new);
            }
            Message::Update(m) => {
                b.push(b'U');
                b.extend(m.relation.to_be_bytes());
                if let Some(o) = &m.old {
                    old(&mut b, o);
                }
                tuple(&mut b, b'N', &m.new);
            }
            Message::Delete(m) => {
                b.push(b'D');
                b.extend(m.relation.to_be_bytes());
                old(&mut b, &m.old);
            }
            Message::Truncate(m) => {
                b.push(b'T');
                b.extend((m.relations.len() as u32).to_be_bytes());
                b.push(m.options);
                for oid in &m.relations {
                    b.extend(oid.to_be_bytes());
                }
            }
            Message::Message(m) => {
                b.extend([b'M', m.transactional as u8]);
                b.extend(m.lsn.to_be_bytes());
                cstr(&mut b, &m.prefix);
                b.extend((m.content.len() as u32).to_be_bytes());
                b.extend_from_slice(&m.content);
            }
            Message::StreamStart(m) => {
                b.push(b'S');
                b.extend(m.xid.to_be_bytes());
                b.push(m.first_segment as u8);
            }
            Message::StreamStop => b.push(b'E'),
            Message::StreamCommit(m) => {
                b.push(b'c');
                b.extend(m.xid.to_be_bytes());
                b.push(m.commit.flags);
                b.extend(m.commit.commit_lsn.to_be_bytes());
                b.extend(m.commit.end_lsn.to_be_bytes());
                b.extend(m.commit.commit_time.to_be_bytes());
            }
            Message::StreamAbort(m) => {
                b.push(b'A');
                b.extend(m.xid.to_be_bytes());
                b.extend(m.subxid.to_be_bytes());
            }
        }
        b
    }

    /// Encodes a message as it comes inside a stream block: a change, Relation, Type
    /// or Message carries `xid` after its tag.
    fn encode_in(msg: &Message, xid: u32) -> Vec<u8> {
        let mut b = encode(msg);
        if matches!(b[0], b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M') {
            b.splice(1..1, xid.to_be_bytes());
        }
        b
    }

    /// The xid a message decoded inside a stream block comes with.
    fn carries_xid(msg: &Message) -> bool {
        !matches!(
            msg,
            Message::Begin(_)
                | Message::Commit(_)
                | Message::Origin(_)
                | Message::StreamStart(_)
                | Message::StreamStop
                | Message::StreamCommit(_)
                | Message::StreamAbort(_)
        )
    }

    mod strategy {
        use super::*;
        use proptest::collection::vec;
        use proptest::option;
        use proptest::prelude::*;

        /// A name: any bytes but NUL, which ends it on the wire.
        fn name() -> impl Strategy<Value = Bytes> {
            vec(1..=u8::MAX, 0..12).prop_map(Bytes::from)
        }

        fn data() -> impl Strategy<Value = Bytes> {
            vec(any::<u8>(), 0..24).prop_map(Bytes::from)
        }

        fn tuple() -> impl Strategy<Value = Tuple> {
            let value = prop_oneof![
                Just(Value::Null),
                Just(Value::UnchangedToast),
                data().prop_map(Value::Text),
                data().prop_map(Value::Binary),
            ];
            vec(value, 0..6)
        }

        fn old_tuple() -> impl Strategy<Value = OldTuple> {
            prop_oneof![
                tuple().prop_map(OldTuple::Key),
                tuple().prop_map(OldTuple::Full)
            ]
        }

        /// Any pgoutput message of protocol version 1 or 2.
        pub fn message() -> impl Strategy<Value = Message> {
            let column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
                |(flags, name, type_oid, type_modifier)| Column {
                    flags,
                    name,
                    type_oid,
                    type_modifier,
                },
            );
            prop_oneof![
                any::<(u64, i64, u32)>().prop_map(|(final_lsn, commit_time, xid)| {
                    Message::Begin(Begin {
                        final_lsn,
                        commit_time,
                        xid,
                    })
                }),
                any::<(u8, u64, u64, i64)>().prop_map(
                    |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit(Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    })
                ),
                (any::<u64>(), name())
                    .prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })),
                (any::<u32>(), name(), name(), any::<u8>(), vec(column, 0..5)).prop_map(
                    |(oid, namespace, name, replica_identity, columns)| {
                        Message::Relation(Relation {
                            oid,
                            namespace,
                            name,
                            replica_identity,
                            columns,
                        })
                    }
                ),
                (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| {
                    Message::Type(TypeInfo {
                        oid,
                        namespace,
                        name,
                    })
                }),
                (any::<u32>(), tuple())
                    .prop_map(|(relation, new)| Message::Insert(Insert { relation, new })),
                (any::<u32>(), option::of(old_tuple()), tuple()).prop_map(
                    |(relation, old, new)| { Message::Update(Update { relation, old, new }) }
                ),
                (any::<u32>(), old_tuple())
                    .prop_map(|(relation, old)| Message::Delete(Delete { relation, old })),
                (any::<u8>(), vec(any::<u32>(), 0..5)).prop_map(|(options, relations)| {
                    Message::Truncate(Truncate { options, relations })
                }),
                (any::<(bool, u64)>(), name(), data()).prop_map(
                    |((transactional, lsn), prefix, content)| {
                        Message::Message(LogicalMessage {
                            transactional,
                            lsn,
                            prefix,
                            content,
                        })
                    }
                ),
                any::<(u32, bool)>().prop_map(|(xid, first_segment)| {
                    Message::StreamStart(StreamStart { xid, first_segment })
                }),
                Just(Message::StreamStop),
                any::<(u32, u8, u64, u64, i64)>().prop_map(
                    |(xid, flags, commit_lsn, end_lsn, commit_time)| {
                        Message::StreamCommit(StreamCommit {
                            xid,
                            commit: Commit {
                                flags,
                                commit_lsn,
                                end_lsn,
                                commit_time,
                            },
                        })
                    }
                ),
                any::<(u32, u32)>()
                    .prop_map(|(xid, subxid)| Message::StreamAbort(StreamAbort { xid, subxid })),
            ]
        }
    }

    proptest::proptest! {
        #[test]
        fn generated_messages_round_trip_and_every_prefix_is_truncated(
            msg in strategy::message()
        ) {
            let bytes = Bytes::from(encode(&msg));
            proptest::prop_assert_eq!(decode(&bytes), Ok(msg));
            for len in 0..bytes.len() {
                let err = decode(&bytes.slice(..len)).unwrap_err();
                proptest::prop_assert!(
                    matches!(err, DecodeError::Truncated { .. } | DecodeError::Empty),
                    "{}: {}", len, err
                );
            }
        }

        #[test]
        fn messages_inside_a_stream_block_round_trip_with_their_xid(
            msg in strategy::message(),
            xid in proptest::prelude::any::<u32>(),
        ) {
            let bytes = Bytes::from(encode_in(&msg, xid));
            let expected = carries_xid(&msg).then_some(xid);
            proptest::prop_assert_eq!(decode_in(&bytes, true), Ok((expected, msg)));
            for len in 0..bytes.len() {
                let err = decode_in(&bytes.slice(..len), true).unwrap_err();
                proptest::prop_assert!(
                    matches!(err, DecodeError::Truncated { .. } | DecodeError::Empty),
                    "{}: {}", len, err
                );
            }
        }

        #[test]
        fn any_bytes_after_any_tag_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTMSEcAZ".to_vec()),
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
            in_stream in proptest::prelude::any::<bool>(),
        ) {
            let _ = decode_in(&Bytes::from([&[tag][..], &rest].concat()), in_stream);
        }

        #[test]
        fn changing_one_byte_of_a_captured_message_never_panics(
            which in proptest::prelude::any::<proptest::sample::Index>(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let mut msg = which.get(&CAPTURED).to_vec();
            let at = at.index(msg.len());
            msg[at] = byte;
            let _ = decode(&Bytes::from(msg));
        }
    }

    #[test]
    fn fuzz_corpus_and_regressions_decode_without_panic() {
        for (path, bytes) in crate::fuzz_inputs::fuzz_inputs("pgoutput_decode") {
            let result = std::panic::catch_unwind(|| decode(&Bytes::from(bytes)));
            assert!(result.is_ok(), "{} panicked", path.display());
        }
    }
}
