//! Talon on a real network filesystem: the mount named by `TALON_NETWORK_VOLUME` (a directory on,
//! for instance, an NFS, EFS or sshfs mount), whose round trip is `TALON_NETWORK_VOLUME_RTT_MS`.
//! `scripts/network-volume-test.sh` mounts one (sshfs through a latency proxy) and runs these; CI
//! runs that script. Ignored by a plain `cargo test`, which has no such mount; run without the
//! variables, they fail saying what they need.
// Waiting for real processes and timing a sync needs the wall clock. The only timing asserted is a
// lower bound set by the link itself: a request that reaches the server cannot return sooner than
// one round trip.
#![allow(clippy::disallowed_methods)]

mod common;
use common::*;

use bytes::Bytes;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use talon_io::storage::fs::{Fs, OsFs};
use talon_io::storage::volume::SyncMode;

/// The mount to test on, and its round trip.
fn mount() -> (PathBuf, Duration) {
    let dir = std::env::var_os("TALON_NETWORK_VOLUME")
        .map(PathBuf::from)
        .expect(
            "TALON_NETWORK_VOLUME=DIR (a directory on a network filesystem) and \
         TALON_NETWORK_VOLUME_RTT_MS=N are needed: run scripts/network-volume-test.sh",
        );
    let rtt: u64 = std::env::var("TALON_NETWORK_VOLUME_RTT_MS")
        .expect("TALON_NETWORK_VOLUME_RTT_MS=N (the mount's round trip) is needed")
        .parse()
        .expect("TALON_NETWORK_VOLUME_RTT_MS is a number of milliseconds");
    assert!(dir.is_dir(), "{} is not a directory", dir.display());
    (dir, Duration::from_millis(rtt))
}

fn scratch(under: &std::path::Path) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("talon-test-")
        .tempdir_in(under)
        .unwrap()
}

/// How long the fastest of five runs of `op` took (`op` gets the run's number).
macro_rules! fastest {
    (|$i:ident| $op:expr) => {{
        let mut best = Duration::MAX;
        for $i in 0..5 {
            let t = Instant::now();
            $op.await.unwrap();
            best = best.min(t.elapsed());
        }
        best
    }};
}

/// The volume's durability reaches the file server: the mount is detected as needing per-file
/// syncs; an `fsync` of an open file takes at least a round trip (it was sent to the server), and
/// so does the difference between the volume's durable `create` and a plain one. The check is shown
/// able to fail: `syncfs` on the same mount returns in well under a round trip, because FUSE sends
/// nothing for it, which is why the volume never relies on it there.
#[tokio::test]
#[ignore = "needs a network filesystem: scripts/network-volume-test.sh"]
async fn each_sync_the_volume_issues_reaches_the_file_server() {
    let (dir, rtt) = mount();
    let tmp = scratch(&dir);
    assert_eq!(SyncMode::detect(tmp.path()).unwrap(), SyncMode::PerFile);
    let fs = OsFs::new(tmp.path()).unwrap();
    let mut open = Vec::new();
    for i in 0..5 {
        let p = tmp.path().join(format!("f{i}"));
        std::fs::write(&p, b"data").unwrap();
        open.push(std::fs::OpenOptions::new().write(true).open(&p).unwrap());
    }
    let fsync = fastest!(|i| async { open[i].sync_all() });
    assert!(
        fsync >= rtt,
        "an fsync took {fsync:?}, under one round trip ({rtt:?})"
    );
    let durable = fastest!(|i| fs.create(&format!("g{i}"), Bytes::from_static(b"data"), true));
    let plain = fastest!(|i| fs.create(&format!("h{i}"), Bytes::from_static(b"data"), false));
    assert!(
        durable >= plain + rtt / 2,
        "a durable create ({durable:?}) costs no more than a plain one ({plain:?}): its sync did \
         not reach the server"
    );
    // The segment log's flush: an append made durable in the same open.
    let synced = fastest!(|i| fs.append(&format!("g{i}"), Bytes::from_static(b"more"), true));
    let unsynced = fastest!(|i| fs.append(&format!("h{i}"), Bytes::from_static(b"more"), false));
    assert!(
        synced >= unsynced + rtt / 2,
        "a durable append ({synced:?}) costs no more than a plain one ({unsynced:?}): its sync \
         did not reach the server"
    );
    let root = std::fs::File::open(tmp.path()).unwrap();
    let syncfs = fastest!(|_i| async { rustix::fs::syncfs(&root).map_err(std::io::Error::from) });
    assert!(
        syncfs < rtt / 2,
        "syncfs took {syncfs:?}: this mount forwards it, so the checks above prove nothing here"
    );
}

/// A master and a minion whose shared volume is on the mount: a row hunt over clients on both
/// completes, with exact stats and every row exactly once in the export; a master killed and
/// started again on the same volume still has all of it.
#[test]
#[ignore = "needs a network filesystem: scripts/network-volume-test.sh"]
fn a_hunt_on_a_network_volume_completes_with_exact_rows() {
    const CLIENTS: u64 = 6;
    const ROWS: u64 = 50;
    let (dir, _) = mount();
    let tmp = scratch(&dir);
    let d = Deployment::with_datastore(Some(&tmp.path().join("shared")));
    let (minion, _) = d.add_minion();
    let slow = Duration::from_secs(600);
    let master = d.start_master();
    let _minion = d.start_minion(&minion);
    let _pool = d.start_pool(CLIENTS as usize, "pool");
    d.wait_until_within("every client is connected", slow, || {
        d.clients()
            .iter()
            .filter(|c| c["connected"] == true)
            .count() as u64
            == CLIENTS
    });
    let hunt = json(&d.api(&[
        "hunt",
        "create",
        "Generic.Test.Rows",
        "--param",
        &format!("count={ROWS}"),
        "--json",
    ]))["hunt_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let show = || json(&d.api(&["hunt", "show", &hunt, "--json"]))["stats"].clone();
    d.wait_until_within("the hunt completes on every client", slow, || {
        let s = show();
        s["completed"].as_u64().unwrap_or(0) + s["errors"].as_u64().unwrap_or(0) >= CLIENTS
    });
    let s = show();
    assert_eq!(
        (
            s["scheduled"].as_u64(),
            s["completed"].as_u64(),
            s["errors"].as_u64(),
            s["rows"].as_u64()
        ),
        (Some(CLIENTS), Some(CLIENTS), Some(0), Some(CLIENTS * ROWS)),
        "{s}"
    );
    let rows = d.hunt_export(&hunt);
    assert_eq!(rows.len() as u64, CLIENTS * ROWS);
    let by_client: BTreeSet<&String> = rows.iter().map(|(c, _)| c).collect();
    assert_eq!(by_client.len() as u64, CLIENTS);
    // Killed, and started again on the same volume: the same results.
    drop(master);
    let _master = d.start_master();
    assert_eq!(d.hunt_export(&hunt), rows);
}
