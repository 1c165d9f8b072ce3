//! Registry tests: identity, search against a naive model, and the bounds.

use super::*;
use proptest::prelude::*;

fn key(n: u32) -> Vec<u8> {
    format!("public-key-{n}").into_bytes()
}

fn sighting(n: u32, host: &str) -> Sighting {
    Sighting {
        id: ClientId::from_public_key(&key(n)),
        public_key: key(n),
        hostname: host.to_owned(),
        fqdn: format!("{host}.corp.example"),
        os: "linux".into(),
        ips: vec![format!("10.0.0.{n}")],
        last_ip: format!("127.0.0.{n}"),
        node: "master-8000".into(),
        connected_at: Timestamp(0),
        connected_order: Monotonic(0),
    }
}

#[test]
fn enrols_once_and_refuses_another_key_under_the_same_id() {
    let mut r = Registry::restore(RegistryLimits::default(), []);
    assert_eq!(
        r.handle_seen(Timestamp(1), Monotonic(1), sighting(1, "web01")),
        Ok(Enrolment::New)
    );
    assert!(matches!(r.poll_action(), Some(RegistryAction::Persist(_))));
    assert_eq!(
        r.handle_seen(Timestamp(2), Monotonic(2), sighting(1, "web01")),
        Ok(Enrolment::Known)
    );
    assert_eq!(
        r.poll_action(),
        None,
        "nothing changed, last_seen persistence is throttled"
    );

    // A client presenting key 2 but claiming key 1's id: refused, nothing changed.
    let mut forged = sighting(2, "evil");
    forged.id = ClientId::from_public_key(&key(1));
    assert_eq!(
        r.handle_seen(Timestamp(3), Monotonic(3), forged),
        Err(RegistryError::IdNotFromKey(ClientId::from_public_key(
            &key(1)
        )))
    );
    assert_eq!(
        r.get(&ClientId::from_public_key(&key(1))).unwrap().hostname,
        "web01"
    );
}

/// Found by the simulator's `clock-step` fault: the master's wall clock stepped back an hour, and
/// every client that then connected to it looked older than its record from a minion — the client
/// stayed "on" the minion, the minion's "gone" marked it disconnected, and hunts never reached it.
#[test]
fn a_wall_clock_stepped_back_does_not_make_a_newer_connection_look_stale() {
    let mut r = Registry::restore(RegistryLimits::default(), []);
    let id = ClientId::from_public_key(&key(1));
    let hour = 3_600_000;
    let on_minion = Sighting {
        node: "minion1-8000".into(),
        connected_at: Timestamp(10 * hour),
        connected_order: Monotonic(1_000),
        ..sighting(1, "web01")
    };
    r.handle_seen(Timestamp(10 * hour), Monotonic(1_000), on_minion)
        .unwrap();
    // The client moves to the master, whose wall clock has meanwhile stepped back an hour.
    let on_master = Sighting {
        node: "master-8000".into(),
        connected_at: Timestamp(9 * hour + 5_000),
        connected_order: Monotonic(6_000),
        ..sighting(1, "web01")
    };
    r.handle_seen(Timestamp(9 * hour + 5_000), Monotonic(6_000), on_master)
        .unwrap();
    assert_eq!(r.get(&id).unwrap().node, "master-8000");
    r.set_disconnected(Timestamp(9 * hour + 6_000), &id, "minion1-8000");
    assert!(
        r.get(&id).unwrap().connected,
        "the minion's gone must not disconnect it"
    );
}

#[test]
fn a_stale_sighting_from_another_node_does_not_take_the_client_back() {
    let mut r = Registry::restore(RegistryLimits::default(), []);
    let id = ClientId::from_public_key(&key(1));
    let on = |node: &str, at: u64| Sighting {
        node: node.into(),
        connected_at: Timestamp(at),
        connected_order: Monotonic(at),
        ..sighting(1, "web01")
    };
    r.handle_seen(Timestamp(10), Monotonic(10), on("minion1-8000", 0))
        .unwrap();
    // It moved to minion2 at t=40; minion1 re-announces its old (silently dead) connection later.
    r.handle_seen(Timestamp(41), Monotonic(41), on("minion2-8000", 40))
        .unwrap();
    r.handle_seen(Timestamp(45), Monotonic(45), on("minion1-8000", 0))
        .unwrap();
    assert_eq!(r.get(&id).unwrap().node, "minion2-8000");
    // When minion1 finally notices the dead connection, its "gone" does not disconnect the client.
    r.set_disconnected(Timestamp(50), &id, "minion1-8000");
    assert!(r.get(&id).unwrap().connected);
    // A newer connection on minion1 does take it back.
    r.handle_seen(Timestamp(60), Monotonic(60), on("minion1-8000", 59))
        .unwrap();
    assert_eq!(r.get(&id).unwrap().node, "minion1-8000");
}

#[test]
fn key_mismatch_for_a_known_id_is_refused() {
    let rec = ClientRecord {
        id: ClientId::from_public_key(&key(1)),
        key_fingerprint: [7; 32],
        hostname: "h".into(),
        fqdn: String::new(),
        os: "linux".into(),
        labels: BTreeSet::new(),
        ips: vec![],
        first_seen: Timestamp(0),
        last_seen: Timestamp(0),
        last_ip: String::new(),
        node: String::new(),
        connected: false,
        persisted_seen: Timestamp(0),
        connected_at: Timestamp(0),
    };
    let mut r = Registry::restore(RegistryLimits::default(), [rec]);
    assert_eq!(
        r.handle_seen(Timestamp(1), Monotonic(1), sighting(1, "h")),
        Err(RegistryError::KeyMismatch(ClientId::from_public_key(&key(
            1
        ))))
    );
}

#[test]
fn search_by_every_field_with_prefixes() {
    let mut r = Registry::restore(RegistryLimits::default(), []);
    for (n, h) in [(1, "web01"), (2, "WEB02"), (3, "db01")] {
        r.handle_seen(Timestamp(1), Monotonic(1), sighting(n, h))
            .unwrap();
    }
    let id3 = ClientId::from_public_key(&key(3));
    r.set_label(&id3, "Prod", false).unwrap();
    let hosts = |q: &str| -> Vec<String> {
        let q = Query::parse(q).unwrap();
        let mut v: Vec<String> = r
            .search(&q, 100)
            .clients
            .iter()
            .map(|c| c.hostname.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(hosts("host:web"), vec!["WEB02", "web01"]);
    assert_eq!(hosts("host:db01.corp"), vec!["db01"]);
    assert_eq!(hosts("label:prod"), vec!["db01"]);
    assert_eq!(hosts("ip:127.0.0.2"), vec!["WEB02"]);
    assert_eq!(hosts("all").len(), 3);
    assert!(
        hosts(&id3.as_str()[..6]).contains(&"db01".to_string()),
        "id prefix finds db01"
    );
    assert_eq!(hosts(id3.as_str()), vec!["db01"]);
    assert!(Query::parse("hostname:x").is_err());
    assert_eq!(Query::parse("Web01").unwrap(), Query::Host("web01".into()));
    assert!(Query::parse("web 01").is_err());
    assert!(Query::parse("").is_err());
    assert!(Query::parse("host:").is_err());
    let limited = r.search(&Query::All, 2);
    assert_eq!((limited.clients.len(), limited.truncated), (2, true));
}

#[test]
fn enrolments_are_paced_and_known_clients_never_are() {
    let lim = RegistryLimits {
        enrolments_per_second: 2,
        enrolment_burst: 3,
        ..RegistryLimits::default()
    };
    let mut r = Registry::restore(lim, []);
    let t = Timestamp(1_000);
    for n in 1..=3 {
        assert_eq!(
            r.handle_seen(t, Monotonic(t.0), sighting(n, "a")),
            Ok(Enrolment::New)
        );
    }
    let e = r
        .handle_seen(t, Monotonic(t.0), sighting(4, "d"))
        .unwrap_err();
    assert_eq!(e, RegistryError::EnrolmentRate { per_second: 2 });
    assert!(e.to_string().contains("enrolments_per_second"), "{e}");
    assert!(
        r.get(&ClientId::from_public_key(&key(4))).is_none(),
        "refused is not enrolled"
    );
    // A known client reconnecting is not an enrolment.
    assert_eq!(
        r.handle_seen(t, Monotonic(t.0), sighting(1, "a")),
        Ok(Enrolment::Known)
    );
    // Half a second later, one more token.
    let later = Timestamp(1_500);
    assert_eq!(
        r.handle_seen(later, Monotonic(later.0), sighting(4, "d")),
        Ok(Enrolment::New)
    );
    assert!(
        r.handle_seen(later, Monotonic(later.0), sighting(5, "e"))
            .is_err()
    );
    // A minion's sighting was paced by the minion.
    assert_eq!(
        r.handle_seen_admitted(later, sighting(5, "e")),
        Ok(Enrolment::New)
    );
}

#[test]
fn label_and_client_bounds() {
    let lim = RegistryLimits {
        clients_max: 2,
        labels_per_client_max: 1,
        ..RegistryLimits::default()
    };
    let mut r = Registry::restore(lim, []);
    r.handle_seen(Timestamp(1), Monotonic(1), sighting(1, "a"))
        .unwrap();
    r.handle_seen(Timestamp(1), Monotonic(1), sighting(2, "b"))
        .unwrap();
    assert_eq!(
        r.handle_seen(Timestamp(1), Monotonic(1), sighting(3, "c")),
        Err(RegistryError::Full { max: 2 })
    );
    let id = ClientId::from_public_key(&key(1));
    r.set_label(&id, "one", false).unwrap();
    assert_eq!(
        r.set_label(&id, "two", false).unwrap_err(),
        RegistryError::TooManyLabels { max: 1 }
    );
    assert!(matches!(
        r.set_label(&id, "bad label", false),
        Err(RegistryError::BadLabel(_))
    ));
    r.set_label(&id, "one", true).unwrap();
    assert!(r.search(&Query::Label("one".into()), 10).clients.is_empty());
}

#[test]
fn key_cache_answers_without_storage_and_detects_mismatch() {
    let mut c = KeyCache::new(2);
    let id = ClientId::from_public_key(&key(1));
    assert_eq!(c.check(&id, &key(1)), KeyCheck::Unknown);
    c.insert(id.clone(), key_fingerprint(&key(1)));
    assert_eq!(c.check(&id, &key(1)), KeyCheck::Match);
    assert_eq!(c.check(&id, &key(2)), KeyCheck::Mismatch);
    assert_eq!((c.hits, c.misses), (2, 1));
}

proptest! {
    /// Search agrees with a naive filter over all records, and the index stays consistent through
    /// re-sightings that change hostnames and addresses.
    #[test]
    fn search_matches_a_naive_filter(
        sightings in prop::collection::vec((0u32..20, "[a-cA-C]{1,3}", 0u8..4), 1..60),
        labels in prop::collection::vec((0u32..20, "[a-c]{1,2}", any::<bool>()), 0..30),
        q in "[a-cA-C]{1,2}",
    ) {
        let mut r = Registry::restore(RegistryLimits::default(), []);
        for (n, host, ip) in &sightings {
            let mut s = sighting(*n, host);
            s.ips = vec![format!("10.{ip}.0.1")];
            r.handle_seen(Timestamp(1), Monotonic(1), s).unwrap();
        }
        for (n, l, remove) in &labels {
            let _ = r.set_label(&ClientId::from_public_key(&key(*n)), l, *remove);
        }
        let all: Vec<&ClientRecord> = r.search(&Query::All, usize::MAX).clients;
        let ql = q.to_ascii_lowercase();
        let naive_host: Vec<&ClientId> = all.iter()
            .filter(|c| c.hostname.to_ascii_lowercase().starts_with(&ql) || c.fqdn.to_ascii_lowercase().starts_with(&ql))
            .map(|c| &c.id).collect();
        let got: Vec<&ClientId> = r.search(&Query::Host(ql.clone()), usize::MAX).clients.iter().map(|c| &c.id).collect();
        prop_assert_eq!(got, naive_host);
        let naive_label: Vec<&ClientId> = all.iter()
            .filter(|c| c.labels.iter().any(|l| l.starts_with(&ql))).map(|c| &c.id).collect();
        let got: Vec<&ClientId> = r.search(&Query::Label(ql.clone()), usize::MAX).clients.iter().map(|c| &c.id).collect();
        prop_assert_eq!(got, naive_label);
        let naive_ip: Vec<&ClientId> = all.iter()
            .filter(|c| c.ips.iter().chain([&c.last_ip]).any(|i| i.starts_with("10.1"))).map(|c| &c.id).collect();
        let got: Vec<&ClientId> = r.search(&Query::Ip("10.1".into()), usize::MAX).clients.iter().map(|c| &c.id).collect();
        prop_assert_eq!(got, naive_ip);
    }

    /// A sorted, paged search is the naive filter sorted by the key (ties by id), cut into pages;
    /// its total is the number of matches; estimates and per-node counts agree with naive counts.
    #[test]
    fn sorted_pages_counts_and_estimates_match_a_naive_model(
        sightings in prop::collection::vec((0u32..25, "[a-c]{1,2}", 0u8..3, any::<bool>(), 0u64..5), 1..50),
        labels in prop::collection::vec((0u32..25, "[a-c]", any::<bool>()), 0..30),
        sort in prop::sample::select(vec!["id", "hostname", "last_seen", "os", "node", "last_ip", "connected"]),
        descending in any::<bool>(),
        query in prop::sample::select(vec!["all", "host:a", "label:b", "ip:10.0.0.1"]),
        page in 1usize..7,
        include in prop::collection::btree_set("[a-c]", 0..2),
        exclude in prop::collection::btree_set("[a-c]", 0..2),
    ) {
        let mut r = Registry::restore(RegistryLimits::default(), []);
        for (n, host, node, connected, seen) in &sightings {
            let mut s = sighting(*n, host);
            s.node = format!("node-{node}");
            r.handle_seen(Timestamp(*seen), Monotonic(1), s).unwrap();
            if !connected {
                r.set_disconnected(Timestamp(*seen), &ClientId::from_public_key(&key(*n)), &format!("node-{node}"));
            }
        }
        for (n, l, remove) in &labels {
            let _ = r.set_label(&ClientId::from_public_key(&key(*n)), l, *remove);
        }
        let q = Query::parse(query).unwrap();
        let key_of = SortKey::parse(sort).unwrap();
        let mut naive: Vec<&ClientRecord> = r.search(&q, usize::MAX).clients;
        naive.sort_by(|a, b| key_of.cmp(a, b));
        if descending {
            naive.reverse();
        }
        let mut paged = Vec::new();
        let mut offset = 0;
        loop {
            let got = r.search_sorted(&q, key_of, descending, offset, page);
            prop_assert_eq!(got.total, naive.len());
            prop_assert!(got.clients.len() <= page);
            offset += got.clients.len();
            paged.extend(got.clients.iter().map(|c| c.id.clone()));
            prop_assert_eq!(got.truncated, offset < naive.len());
            if !got.truncated {
                break;
            }
        }
        prop_assert_eq!(paged, naive.iter().map(|c| c.id.clone()).collect::<Vec<_>>());

        let all = r.search(&Query::All, usize::MAX).clients;
        let fits: Vec<&&ClientRecord> = all.iter()
            .filter(|c| include.iter().all(|l| c.labels.contains(l)) && !exclude.iter().any(|l| c.labels.contains(l)))
            .collect();
        let want = (fits.len() as u64, fits.iter().filter(|c| c.connected).count() as u64);
        prop_assert_eq!(r.count_matching(&include, &exclude, None), want);
        prop_assert_eq!(r.count_matching(&include, &exclude, Some("LINUX")), want);
        prop_assert_eq!(r.count_matching(&include, &exclude, Some("windows")), (0, 0));
        let mut by_node: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for c in &all {
            let e = by_node.entry(c.node.clone()).or_default();
            e.0 += 1;
            e.1 += u64::from(c.connected);
        }
        let want: Vec<(String, u64, u64)> = by_node.into_iter().map(|(n, (a, b))| (n, a, b)).collect();
        prop_assert_eq!(r.counts_by_node(), want);
    }

    /// Invariant 7 for the key cache: never above capacity; the most recent insert is always held.
    #[test]
    fn key_cache_is_bounded(cap in 1usize..8, ops in prop::collection::vec((0u32..30, any::<bool>()), 0..200)) {
        let mut c = KeyCache::new(cap);
        for (n, insert) in ops {
            let id = ClientId::from_public_key(&key(n));
            if insert {
                c.insert(id.clone(), key_fingerprint(&key(n)));
                prop_assert_eq!(c.check(&id, &key(n)), KeyCheck::Match);
            } else {
                let _ = c.check(&id, &key(n));
            }
            prop_assert!(c.len() <= cap);
            prop_assert_eq!(c.lru.len(), c.map.len());
        }
    }
}

#[test]
fn a_restarted_node_disconnects_only_its_own_clients() {
    let mut r = Registry::restore(RegistryLimits::default(), []);
    let mut on_minion = sighting(1, "alpha");
    on_minion.node = "minion-8001".into();
    r.handle_seen(Timestamp(1), Monotonic(1), on_minion)
        .unwrap();
    r.handle_seen(Timestamp(1), Monotonic(1), sighting(2, "beta"))
        .unwrap();
    // A client that moved from the minion to the master stays connected.
    let mut moved = sighting(3, "gamma");
    moved.node = "minion-8001".into();
    r.handle_seen(Timestamp(1), Monotonic(1), moved).unwrap();
    r.handle_seen(Timestamp(2), Monotonic(2), sighting(3, "gamma"))
        .unwrap();

    assert_eq!(r.disconnect_node(Timestamp(5), "minion-8001"), 1);
    let id = |n| ClientId::from_public_key(&key(n));
    assert!(!r.get(&id(1)).unwrap().connected);
    assert_eq!(r.get(&id(1)).unwrap().last_seen, Timestamp(5));
    assert!(r.get(&id(2)).unwrap().connected);
    assert!(r.get(&id(3)).unwrap().connected);
    assert_eq!(r.disconnect_node(Timestamp(6), "minion-8001"), 0);
}
