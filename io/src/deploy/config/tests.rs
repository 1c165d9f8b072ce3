//! Config tests: generation, derivation of the multi-frontend config, API users, and errors that name
//! the key and the file.

use super::*;
use crate::clock::{Entropy, SystemClock};
use talon_core::Timestamp;

struct FixedClock;
impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        Timestamp(1_790_000_000_000)
    }
    fn monotonic(&self) -> talon_core::Monotonic {
        talon_core::Monotonic(0)
    }
}

struct Zeros;
impl Entropy for Zeros {
    fn fill(&self, buf: &mut [u8]) {
        buf.fill(7);
    }
}

fn opts(host: &str) -> GenerateOptions {
    GenerateOptions {
        hostname: host.into(),
        frontend_port: 8000,
        api_port: 8001,
        gui_port: 8889,
        monitoring_port: 8003,
        datastore: PathBuf::from("/srv/talon"),
        key_type: crate::deploy::pki::KeyType::default(),
    }
}

#[test]
fn generate_makes_a_valid_single_server_config() {
    let c = generate(&opts("master.example"), &FixedClock, &Zeros).unwrap();
    assert_eq!(c.client.server_urls, vec!["https://master.example:8000/"]);
    assert_eq!(c.client.nonce, "07".repeat(16));
    assert_eq!(c.api.bind_address, "127.0.0.1");
    assert!(c.extra_frontends.is_empty());
    let fe = pki::describe(&c.frontend.certificate).unwrap();
    assert_eq!(fe.sans, vec!["master.example"]);
    assert!(pki::signed_by(&c.frontend.certificate, &c.ca.certificate).unwrap());
    assert_eq!(c.master_node_name(), "master.example-8000");
    // Metadata and bulk data in separate directories of the shared volume.
    assert_eq!(c.datastore.location, PathBuf::from("/srv/talon/metadata"));
    assert_eq!(
        c.datastore.filestore_directory,
        PathBuf::from("/srv/talon/filestore")
    );
}

#[test]
fn round_trips_through_yaml_in_the_seed_shape() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("server.config.yaml");
    let c = generate(&opts("127.0.0.1"), &SystemClock, &Zeros).unwrap();
    write_yaml(&p, &c).unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    for key in [
        "Client:",
        "API:",
        "GUI:",
        "Frontend:",
        "Datastore:",
        "CA:",
        "server_urls:",
        "expected_clients:",
    ] {
        assert!(text.contains(key), "{key} missing from\n{text}");
    }
    assert_eq!(ServerConfig::load(&p).unwrap(), c);
    assert_eq!(
        pki::describe(&c.frontend.certificate).unwrap().sans,
        vec!["127.0.0.1"]
    );
}

#[test]
fn adding_frontends_derives_the_multi_frontend_config() {
    let mut c = generate(&opts("master"), &FixedClock, &Zeros).unwrap();
    let adds = vec![("minion1".to_string(), 8100), ("minion2".to_string(), 8100)];
    let change = add_frontends(&mut c, &adds, &FixedClock).unwrap();
    assert_eq!(change.added, vec!["minion1-8100", "minion2-8100"]);
    assert_eq!(
        c.client.server_urls,
        vec![
            "https://master:8000/",
            "https://minion1:8100/",
            "https://minion2:8100/"
        ]
    );
    assert_eq!(c.api.bind_address, "0.0.0.0");
    assert_eq!(
        pki::describe(&c.frontend.certificate).unwrap().sans,
        vec!["master", "minion1", "minion2"]
    );
    // Adding again is reported, not duplicated.
    let again = add_frontends(&mut c, &adds[..1], &FixedClock).unwrap();
    assert_eq!(again.already_present, vec!["minion1-8100"]);
    assert_eq!(c.extra_frontends.len(), 2);
    // A minion on the master's host and API port is refused.
    let err = add_frontends(&mut c, &[("master".into(), 8001)], &FixedClock).unwrap_err();
    assert!(err.contains("clashes with a master port"), "{err}");
}

#[test]
fn loopback_deployments_listen_only_on_loopback() {
    let mut c = generate(&opts("127.0.0.1"), &FixedClock, &Zeros).unwrap();
    assert_eq!(
        (
            c.frontend.bind_address.as_str(),
            c.api.bind_address.as_str()
        ),
        ("127.0.0.1", "127.0.0.1")
    );
    add_frontends(&mut c, &[("127.0.0.1".into(), 8100)], &FixedClock).unwrap();
    assert_eq!(
        (
            c.extra_frontends[0].bind_address.as_str(),
            c.api.bind_address.as_str()
        ),
        ("127.0.0.1", "127.0.0.1")
    );
    assert_eq!(bind_address_for("localhost"), "127.0.0.1");
    assert_eq!(bind_address_for("::1"), "::1");
    assert_eq!(bind_address_for("master.example"), "0.0.0.0");
}

#[test]
fn api_client_gets_a_ca_signed_certificate() {
    let c = generate(&opts("master"), &FixedClock, &Zeros).unwrap();
    let a = api_client(&c, "alice", &FixedClock).unwrap();
    assert_eq!(a.api_connection_string, "master:8001");
    let info = pki::describe(&a.client_cert).unwrap();
    assert_eq!(
        (info.common_name.as_str(), info.role.as_str()),
        ("alice", "api")
    );
    assert!(pki::signed_by(&a.client_cert, &c.ca.certificate).unwrap());
    assert!(
        api_client(&c, "bad name", &FixedClock)
            .unwrap_err()
            .contains("--name")
    );
}

fn load_err(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("server.config.yaml");
    std::fs::write(&p, yaml).unwrap();
    let e = ServerConfig::load(&p).unwrap_err();
    assert_eq!(e.path.as_deref(), Some(p.as_path()));
    e.to_string()
}

fn valid_yaml() -> String {
    serde_yaml_ng::to_string(&generate(&opts("master"), &FixedClock, &Zeros).unwrap()).unwrap()
}

#[test]
fn errors_name_the_file_and_the_key() {
    let unknown = valid_yaml().replace("  bind_port: 8000", "  bind_port: 8000\n  bind_prot: 1");
    assert!(
        load_err(&unknown).contains("unknown field `bind_prot`"),
        "{}",
        load_err(&unknown)
    );
    let missing = valid_yaml().replace("  bind_port: 8001\n", "");
    let e = load_err(&missing);
    assert!(
        e.contains("missing field `bind_port`") && e.contains("API"),
        "{e}"
    );
    let big = valid_yaml().replace("bind_port: 8889", "bind_port: 70000");
    let e = load_err(&big);
    assert!(e.contains("GUI") && e.contains("70000"), "{e}");
    let zero = valid_yaml().replace("bind_port: 8889", "bind_port: 0");
    assert!(load_err(&zero).contains("GUI.bind_port: 0 is not a usable port"));
    let same = valid_yaml().replace("bind_port: 8889", "bind_port: 8000");
    assert!(load_err(&same).contains("distinct ports"));
    let relative = valid_yaml().replace("location: /srv/talon", "location: srv/talon");
    assert!(load_err(&relative).contains("Datastore.location"));
    let implementation = valid_yaml().replace("MemcacheFileDataStore", "FileBaseDataStore");
    assert!(load_err(&implementation).contains("Datastore.master_implementation"));
    let top = format!("{}Extra: 1\n", valid_yaml());
    assert!(load_err(&top).contains("unknown field `Extra`"));
    assert!(load_err("not: [valid").contains("server.config.yaml"));
}

#[test]
fn unreadable_files_are_named() {
    let e = ServerConfig::load(Path::new("/nonexistent/server.config.yaml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/server.config.yaml: cannot read"),
        "{e}"
    );
}

#[test]
fn host_port_parsing() {
    assert_eq!(parse_host_port("m1:8100"), Ok(("m1".into(), 8100)));
    assert_eq!(parse_host_port("[::1]:8100"), Ok(("::1".into(), 8100)));
    for bad in ["m1", "m1:", ":8100", "m1:0", "m1:99999", "m1:x"] {
        assert!(parse_host_port(bad).is_err(), "{bad}");
    }
}

#[test]
fn every_limit_is_range_checked_and_named() {
    let c = generate(&opts("master.example"), &FixedClock, &Zeros).unwrap();
    // Each resources key, pushed below its range, is refused by name.
    for (key, _, lo, _) in c.frontend.resources.bounds() {
        if lo == 0 {
            continue;
        }
        let yaml = to_yaml(&c).unwrap();
        let line = yaml
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("{key} is written out by generate"))
            .to_owned();
        let indent = &line[..line.len() - line.trim_start().len()];
        let text = yaml.replace(&line, &format!("{indent}{key}: {}", lo - 1));
        let e = ServerConfig::parse(&text).unwrap_err();
        assert!(e.contains(&format!("Frontend.resources.{key}")), "{e}");
        assert!(e.contains("out of range"), "{e}");
    }
    let mut small = c.clone();
    small.datastore.max_value_size = small.datastore.memcache_dirty_bytes + 1;
    assert!(
        small
            .validate()
            .unwrap_err()
            .contains("Datastore.max_value_size")
    );
    let mut buffer = c.clone();
    buffer.datastore.filestore_buffer_bytes = 32 << 20;
    buffer.frontend.resources.max_message_size = 17 << 20;
    assert!(
        buffer
            .validate()
            .unwrap_err()
            .contains("Datastore.filestore_buffer_bytes")
    );
    let mut slow = c.clone();
    slow.datastore.volume_latency_ms = 10_001;
    let e = slow.validate().unwrap_err();
    assert!(e.contains("Datastore.volume_latency_ms"), "{e}");
    slow.datastore.volume_latency_ms = 50;
    slow.validate().unwrap();
    // Written out only when set (a test knob stays out of production configs).
    assert!(to_yaml(&slow).unwrap().contains("volume_latency_ms: 50"));
    assert!(!to_yaml(&c).unwrap().contains("volume_latency_ms"));
    let mut chunk = c;
    chunk.frontend.resources.max_chunk_size = chunk.frontend.resources.max_message_size;
    assert!(chunk.validate().unwrap_err().contains("max_message_size"));
}

#[test]
fn the_ca_rotates_in_two_steps_without_a_gap_in_trust() {
    let mut c = generate(&opts("master.example"), &FixedClock, &Zeros).unwrap();
    let old_ca = c.ca.certificate.clone();
    let old_fe = c.frontend.certificate.clone();
    let old_api = api_client(&c, "alice", &FixedClock).unwrap();
    let trusts = |bundle: &str, cert: &str| {
        pem_certificates(bundle)
            .iter()
            .any(|ca| pki::signed_by(cert, ca).unwrap())
    };
    assert!(rotate_ca(&mut c, CaRotation::Finish, &FixedClock).is_err());

    // Begin: a new CA signs; everything the old one signed is still trusted everywhere.
    rotate_ca(
        &mut c,
        CaRotation::Begin(pki::KeyType::default()),
        &FixedClock,
    )
    .unwrap();
    let bundle = pem_certificates(&c.ca.certificate);
    assert_eq!(bundle.len(), 2);
    assert_eq!(
        bundle[1],
        pem_certificates(&old_ca)[0],
        "the old CA is kept second"
    );
    assert_eq!(c.client.ca_certificate, c.ca.certificate);
    assert_eq!(
        c.frontend.certificate, old_fe,
        "agents with the old config still connect"
    );
    assert!(trusts(&c.ca.certificate, &old_api.client_cert));
    assert!(trusts(&c.client.ca_certificate, &c.frontend.certificate));
    let new_api = api_client(&c, "alice", &FixedClock).unwrap();
    assert!(pki::signed_by(&new_api.client_cert, &bundle[0]).unwrap());
    assert!(!pki::signed_by(&new_api.client_cert, &bundle[1]).unwrap());
    let err = rotate_ca(
        &mut c,
        CaRotation::Begin(pki::KeyType::default()),
        &FixedClock,
    )
    .unwrap_err();
    assert!(err.contains("already in progress"), "{err}");
    // The rotated config reads back.
    assert_eq!(ServerConfig::parse(&to_yaml(&c).unwrap()), Ok(c.clone()));

    // Finish: only the new CA is trusted; the frontend certificate is its.
    rotate_ca(&mut c, CaRotation::Finish, &FixedClock).unwrap();
    assert_eq!(pem_certificates(&c.ca.certificate), vec![bundle[0].clone()]);
    assert!(trusts(&c.client.ca_certificate, &c.frontend.certificate));
    assert!(trusts(&c.ca.certificate, &new_api.client_cert));
    assert!(
        !trusts(&c.ca.certificate, &old_api.client_cert),
        "the old API user is out"
    );
    assert!(!trusts(&c.client.ca_certificate, &old_fe));
    assert_eq!(
        pki::describe(&c.frontend.certificate).unwrap().sans,
        vec!["master.example"]
    );
}
