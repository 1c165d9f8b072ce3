//! The simulator's volume implements the same primitives as the real filesystem, with the same
//! outcomes: the production volume logic (`FsVolume`) relies on their error kinds (a missing
//! directory is `NotFound`, an existing one `AlreadyExists`) and on listings, so a difference here
//! would make the simulator test a different program. Each step runs on both and must agree.

use bytes::Bytes;
use std::io;
use talon_io::storage::fs::{Entry, Fs, OsFs};
use talon_io::storage::volume::{FsVolume, SyncMode, Volume};
use talon_sim::latency::LatencyModel;
use talon_sim::rng::SimRng;
use talon_sim::world::SimVolume;

/// An outcome as comparable text: the value, or the error's kind (messages differ).
fn outcome<T: std::fmt::Debug>(r: io::Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("err {:?}", e.kind()),
    }
}

async fn primitives<F: Fs>(fs: &F) -> Vec<String> {
    let b = |s: &'static str| Bytes::from_static(s.as_bytes());
    let sorted = |r: io::Result<Vec<Entry>>| {
        r.map(|mut v| {
            v.sort();
            v
        })
    };
    vec![
        outcome(fs.create("a/x", b("1"), true).await),
        outcome(fs.mkdir("a/b").await),
        outcome(fs.mkdir("a").await),
        outcome(fs.mkdir("a").await),
        outcome(fs.mkdir("a/b").await),
        outcome(fs.create("a/x", b("1"), true).await),
        outcome(fs.create("a/.x.tmp", b("2"), false).await),
        outcome(fs.append("a/b/log", b("p"), false).await),
        outcome(fs.append("a/b/log", b("q"), true).await),
        outcome(fs.append("z/log", b("p"), true).await),
        outcome(fs.read("a/b/log").await),
        outcome(fs.read_range("a/b/log", 1, 5).await),
        outcome(fs.read_range("a/b/log", 9, 5).await),
        outcome(fs.read_range("a/none", 0, 5).await),
        outcome(fs.read("a/none").await),
        outcome(sorted(fs.list("").await)),
        outcome(sorted(fs.list("a").await)),
        outcome(sorted(fs.list("a/missing").await)),
        outcome(fs.rename("a/.x.tmp", "a/x").await),
        outcome(fs.read("a/x").await),
        outcome(fs.rename("a/.x.tmp", "a/y").await),
        outcome(fs.rename("a/x", "q/x").await),
        outcome(fs.sync("a/x").await),
        outcome(fs.sync("a").await),
        outcome(fs.sync("").await),
        outcome(fs.sync("a/none").await),
        outcome(fs.sync_all().await),
        outcome(fs.remove("a/x").await),
        outcome(fs.remove("a/x").await),
        outcome(fs.mkdir("a/b/log").await),
        outcome(sorted(fs.list("a").await)),
    ]
}

async fn volume<V: Volume>(v: &V) -> Vec<String> {
    let b = |s: &'static str| Bytes::from_static(s.as_bytes());
    vec![
        outcome(v.write("c/d/e/k", b("1")).await),
        outcome(
            v.write_many(vec![
                ("c/d/k2".into(), Some(b("2"))),
                ("c/f/k3".into(), Some(b("3"))),
                ("c/d/e/k".into(), None),
                ("c/none".into(), None),
            ])
            .await,
        ),
        outcome(v.list("c/").await),
        outcome(v.list("c/d").await),
        outcome(v.list("").await),
        outcome(v.append("u/p", b("ab")).await),
        outcome(v.append_synced("u/p", b("cd")).await),
        outcome(v.read_range("u/p", 1, 2).await),
        outcome(v.append_synced("u/none", b("x")).await),
        outcome(v.commit("u/p", "u/done/p").await),
        outcome(v.read("u/done/p").await),
        outcome(v.read("u/p").await),
        outcome(v.commit("u/p", "u/done/p").await),
        outcome(v.delete("c/d/k2").await),
        outcome(v.delete("c/d/k2").await),
        outcome(v.write("../x", b("no")).await),
        outcome(v.list("").await),
    ]
}

#[tokio::test(start_paused = true)]
async fn the_simulated_volume_answers_every_primitive_as_the_real_filesystem_does() {
    let dir = tempfile::tempdir().unwrap();
    let real = OsFs::new(dir.path()).unwrap();
    let sim = SimVolume::new(LatencyModel::network_volume(), SimRng::new(3)).mount("n");
    assert_eq!(primitives(&sim).await, primitives(&real).await);
}

#[tokio::test(start_paused = true)]
async fn the_volume_logic_gives_the_same_results_over_both() {
    let dir = tempfile::tempdir().unwrap();
    let real = FsVolume::new(dir.path())
        .unwrap()
        .with_sync_mode(SyncMode::PerFile);
    let sim = SimVolume::new(LatencyModel::network_volume(), SimRng::new(3));
    let on_sim = FsVolume::over(sim.mount("n"), SyncMode::PerFile, "n");
    let expected = volume(&real).await;
    assert_eq!(volume(&on_sim).await, expected);
    // What checkers see is the keys, never a temp file.
    let keys: Vec<String> = sim.snapshot().into_keys().collect();
    assert_eq!(keys, vec!["c/f/k3", "u/done/p", "u/none"]);
}
