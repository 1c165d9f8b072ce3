//! The `config` fuzz target's property (`fuzz/props/config.rs`) on stable: over every input in
//! `fuzz/corpus/config/` and over seeds — a freshly generated config, that config with each limit
//! set, and hostile variants (unknown keys, wrong types, out-of-range limits, deep nesting).
//! `TALON_WRITE_CORPUS=1 cargo test -p talon-io --test fuzz_corpus` writes the seeds into the corpus.

// Reading (and on request writing) the corpus is this harness's job.
#![allow(clippy::disallowed_methods)]

#[path = "../../fuzz/props/config.rs"]
mod config;

use std::path::PathBuf;
use talon_io::deploy::config::{GenerateOptions, ServerConfig, generate, to_yaml};

fn generated() -> String {
    let opts = GenerateOptions {
        hostname: "master.corp.example".into(),
        frontend_port: 8000,
        api_port: 8001,
        gui_port: 8889,
        monitoring_port: 8003,
        datastore: "/opt/talon".into(),
        key_type: talon_io::deploy::pki::KeyType::default(),
    };
    let c = generate(
        &opts,
        &talon_io::clock::SystemClock,
        &talon_io::clock::OsEntropy::default(),
    )
    .unwrap();
    to_yaml(&c).unwrap()
}

#[test]
fn config_corpus() {
    let good = generated();
    assert!(ServerConfig::parse(&good).is_ok());
    let with = |from: &str, to: &str| {
        assert!(good.contains(from), "{from}");
        good.replacen(from, to, 1)
    };
    let seeds: Vec<String> = vec![
        good.clone(),
        with("max_upload_size: 1073741824", "max_upload_size: 1048576"),
        with("max_upload_size: 1073741824", "max_upload_size: 0"),
        with("hello_timeout_s: 10", "hello_timeout_s: 100000"),
        with("max_message_size: 8388608", "max_message_size: 1024"),
        with("connections_per_second: 1000", "connections_per_second: -1"),
        with(
            "connections_per_second: 1000",
            "connections_per_second: lots",
        ),
        with(
            "expected_clients: 10000",
            "expected_clients: 10000\n    surprise: 1",
        ),
        with("bind_port: 8000", "bind_port: 70000"),
        with("memcache_bytes: 536870912", "memcache_bytes: 1"),
        good.replace("CERTIFICATE", "CERTIFICATE-ish"),
        "Frontend: [".repeat(200),
        "{a: ".repeat(300),
        String::new(),
        "---\n- 1\n- 2\n".into(),
    ];
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config");
    if std::env::var_os("TALON_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), s).unwrap();
        }
    }
    for s in &seeds {
        config::check(s.as_bytes());
    }
    for e in std::fs::read_dir(&dir).into_iter().flatten() {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| config::check(&data));
        assert!(r.is_ok(), "config: {} fails the property", path.display());
    }
}
