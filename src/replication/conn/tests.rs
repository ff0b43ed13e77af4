//! Unit tests of the replication connection: reads, versions, errors.

use super::*;

fn server(code: &str, message: &str) -> ReplicationError {
    ReplicationError::Server {
        code: code.into(),
        message: message.into(),
        detail: None,
    }
}

#[test]
fn server_version_reads_like_server_version_num() {
    assert_eq!(version_num("17.2"), Some(170002));
    assert_eq!(version_num("16.4 (Debian 16.4-1.pgdg120+1)"), Some(160004));
    assert_eq!(version_num("18beta1"), Some(180000));
    assert_eq!(version_num("devel"), None);
}

#[test]
fn every_majors_wording_of_a_lost_slot_is_recognised() {
    for (code, message) in [
        // Dropped.
        ("42704", "replication slot \"s\" does not exist"),
        // PostgreSQL 14-17, invalidated by max_slot_wal_keep_size.
        (
            "55000",
            "can no longer get changes from replication slot \"s\"",
        ),
        ("55000", "cannot read from logical replication slot \"s\""),
        // PostgreSQL 18 (detail: invalidated due to "wal_removed" / "rows_removed").
        ("55000", "can no longer access replication slot \"s\""),
        (
            "58P01",
            "requested WAL segment 000000010000000000000001 has already been removed",
        ),
    ] {
        assert!(server(code, message).is_slot_lost(), "{code} {message}");
    }
    // A missing publication is also 42704, and not a lost slot.
    assert!(!server("42704", "publication \"p\" does not exist").is_slot_lost());
    assert!(!server("55006", "replication slot \"s\" is active for PID 7").is_slot_lost());
}

/// A connection over a loopback TCP pair, without a server behind it.
async fn pair() -> (ReplicationConnection, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (peer, _) = listener.accept().await.unwrap();
    let fd = Some(client.as_raw_fd());
    let conn = ReplicationConnection {
        io: Box::new(client),
        target: "test".into(),
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        tcp_fd: fd,
        low_water: 1,
        backend_pid: None,
        server_version: None,
    };
    (conn, peer)
}

#[tokio::test]
async fn a_paced_read_takes_a_short_tail_after_its_wait() {
    let (mut conn, mut peer) = pair().await;
    conn.pace_reads(true);
    assert_eq!(conn.low_water, PACED_READ_BYTES);
    peer.write_all(b"tail").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn.fill())
        .await
        .expect("the paced read gives up waiting for 64 KiB")
        .unwrap();
    assert_eq!(&conn.rbuf[..], b"tail");
    // Pacing lapses with the wait; live reads wake per byte again.
    assert_eq!(conn.low_water, 1);
}

#[tokio::test]
async fn a_paced_read_wakes_for_a_full_chunk() {
    let (mut conn, mut peer) = pair().await;
    conn.pace_reads(true);
    peer.write_all(&vec![7u8; 2 * PACED_READ_BYTES])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn.fill())
        .await
        .unwrap()
        .unwrap();
    assert!(
        conn.rbuf.len() >= PACED_READ_BYTES,
        "read {} bytes",
        conn.rbuf.len()
    );
    assert_eq!(conn.low_water, PACED_READ_BYTES);
    conn.pace_reads(false);
    assert_eq!(conn.low_water, 1);
}
