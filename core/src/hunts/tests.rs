//! Hunt manager tests: unit cases, and properties for invariants 2 and 3 (docs/architecture.md) across master crashes.

use super::*;
use proptest::prelude::*;

fn client(n: u8) -> ClientId {
    ClientId::from_public_key(&[n])
}

fn spec(expires: u64) -> HuntSpec {
    HuntSpec {
        artifact: "Generic.Client.Info".into(),
        params: BTreeMap::new(),
        include_labels: BTreeSet::new(),
        exclude_labels: BTreeSet::new(),
        os: None,
        expires: Timestamp(expires),
        client_limit: None,
        description: String::new(),
        creator: String::new(),
    }
}

fn labels(ls: &[&str]) -> BTreeSet<String> {
    ls.iter().map(|s| s.to_string()).collect()
}

#[test]
fn schedules_each_matching_client_once() {
    let mut m = HuntManager::new(HuntLimits::default());
    let h = HuntId::from_u64(1);
    let mut s = spec(1000);
    s.os = Some("linux".into());
    s.include_labels = labels(&["web"]);
    s.exclude_labels = labels(&["prod"]);
    m.create(Timestamp(0), h.clone(), s).unwrap();
    let c = client(1);
    let web = labels(&["web"]);
    let none = BTreeSet::new();
    let f = |os, l| ClientFacts {
        id: &c,
        os,
        labels: l,
    };
    assert_eq!(
        m.offer_to(Timestamp(1), &h, f("windows", &web)),
        Decision::WrongOs
    );
    assert_eq!(
        m.offer_to(Timestamp(1), &h, f("linux", &none)),
        Decision::MissingLabel("web".into())
    );
    let both = labels(&["web", "prod"]);
    assert_eq!(
        m.offer_to(Timestamp(1), &h, f("linux", &both)),
        Decision::ExcludedLabel("prod".into())
    );
    assert!(matches!(
        m.offer_to(Timestamp(1), &h, f("Linux", &web)),
        Decision::Scheduled(_)
    ));
    assert_eq!(
        m.offer_to(Timestamp(2), &h, f("linux", &web)),
        Decision::AlreadyIn
    );
    assert_eq!(m.get(&h).unwrap().stats().scheduled, 1);
}

#[test]
fn expiry_stop_and_limit_end_scheduling() {
    let mut m = HuntManager::new(HuntLimits::default());
    let none = BTreeSet::new();
    let (a, b) = (client(1), client(2));
    let h1 = HuntId::from_u64(1);
    m.create(Timestamp(0), h1.clone(), spec(100)).unwrap();
    assert_eq!(m.poll_timeout(), Some(Timestamp(100)));
    let fa = ClientFacts {
        id: &a,
        os: "linux",
        labels: &none,
    };
    assert_eq!(
        m.offer_to(Timestamp(100), &h1, fa),
        Decision::NotRunning(HuntState::Expired)
    );

    let h2 = HuntId::from_u64(2);
    let mut s = spec(1000);
    s.client_limit = Some(1);
    m.create(Timestamp(0), h2.clone(), s).unwrap();
    assert!(matches!(
        m.offer_to(Timestamp(1), &h2, fa),
        Decision::Scheduled(_)
    ));
    let fb = ClientFacts {
        id: &b,
        os: "linux",
        labels: &none,
    };
    assert_eq!(m.offer_to(Timestamp(1), &h2, fb), Decision::LimitReached);
    m.handle_outcome(Timestamp(2), &h2, &a, FinalState::Completed, 5, 0);
    assert_eq!(m.get(&h2).unwrap().record().state, HuntState::Complete);

    let h3 = HuntId::from_u64(3);
    m.create(Timestamp(0), h3.clone(), spec(1000)).unwrap();
    m.stop(Timestamp(1), &h3).unwrap();
    assert_eq!(
        m.offer_to(Timestamp(1), &h3, fa),
        Decision::NotRunning(HuntState::Stopped)
    );
    // Stopping again changes nothing and writes nothing; nor does stopping a complete hunt.
    while m.poll_action().is_some() {}
    assert_eq!(
        m.stop(Timestamp(1), &h3).unwrap().record().state,
        HuntState::Stopped
    );
    assert_eq!(
        m.stop(Timestamp(1), &h2).unwrap().record().state,
        HuntState::Complete
    );
    assert_eq!(m.poll_action(), None);
}

/// A hunt whose creation could not be recorded is forgotten: no client becomes a participant of a
/// hunt that storage does not know (and a restart would not).
#[test]
fn a_hunt_whose_record_was_not_written_is_forgotten() {
    let mut m = HuntManager::new(HuntLimits::default());
    let h = HuntId::from_u64(1);
    m.create(Timestamp(0), h.clone(), spec(1000)).unwrap();
    assert!(matches!(m.poll_action(), Some(HuntAction::Record(_))));
    assert!(m.handle_create_failed(&h));
    assert!(m.get(&h).is_none());
    let (c, none) = (client(1), BTreeSet::new());
    let facts = ClientFacts {
        id: &c,
        os: "linux",
        labels: &none,
    };
    assert_eq!(m.offer(Timestamp(1), facts), 0);
    assert!(m.poll_action().is_none());
    // Once it has participants its record was written: not forgotten.
    let h2 = HuntId::from_u64(2);
    m.create(Timestamp(2), h2.clone(), spec(1000)).unwrap();
    m.offer_to(Timestamp(3), &h2, facts);
    assert!(!m.handle_create_failed(&h2));
    assert!(m.get(&h2).is_some());
}

#[test]
fn refuses_bad_creates() {
    let mut m = HuntManager::new(HuntLimits {
        hunts_max: 1,
        participants_max: 10,
        ..HuntLimits::default()
    });
    assert_eq!(
        m.create(Timestamp(5), HuntId::from_u64(1), spec(5))
            .unwrap_err(),
        HuntError::ExpiryInPast
    );
    m.create(Timestamp(0), HuntId::from_u64(1), spec(5))
        .unwrap();
    assert_eq!(
        m.create(Timestamp(0), HuntId::from_u64(2), spec(5))
            .unwrap_err(),
        HuntError::TooManyHunts { max: 1 }
    );
}

#[test]
fn participants_bound_is_enforced() {
    let mut m = HuntManager::new(HuntLimits {
        hunts_max: 4,
        participants_max: 2,
        ..HuntLimits::default()
    });
    let h = HuntId::from_u64(1);
    m.create(Timestamp(0), h.clone(), spec(100)).unwrap();
    let none = BTreeSet::new();
    let ids: Vec<ClientId> = (0..3).map(client).collect();
    let d: Vec<Decision> = ids
        .iter()
        .map(|id| {
            m.offer_to(
                Timestamp(1),
                &h,
                ClientFacts {
                    id,
                    os: "linux",
                    labels: &none,
                },
            )
        })
        .collect();
    assert!(matches!(d[1], Decision::Scheduled(_)));
    assert_eq!(d[2], Decision::Full);
}

// ---- Properties: invariants 2 and 3 under duplicated, late and reordered outcomes and crashes. ----

#[derive(Clone, Debug)]
enum Op {
    Create {
        limit: Option<u64>,
        os_linux: bool,
        need_label: bool,
        ttl: u64,
    },
    Offer {
        client: u8,
    },
    Outcome {
        hunt: usize,
        client: u8,
        ok: bool,
        rows: u64,
    },
    Stop {
        hunt: usize,
    },
    Advance(u64),
    Crash,
    /// The store refuses (busy) the next `n` schedules it is asked to persist.
    Refuse(u8),
    /// The store refuses (busy) the next `n` outcomes it is asked to persist.
    RefuseOutcomes(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (prop::option::of(1u64..6), any::<bool>(), any::<bool>(), 1u64..200)
            .prop_map(|(limit, os_linux, need_label, ttl)| Op::Create { limit, os_linux, need_label, ttl }),
        6 => (0u8..12).prop_map(|client| Op::Offer { client }),
        6 => (0usize..4, 0u8..12, any::<bool>(), 0u64..50)
            .prop_map(|(hunt, client, ok, rows)| Op::Outcome { hunt, client, ok, rows }),
        1 => (0usize..4).prop_map(|hunt| Op::Stop { hunt }),
        2 => (1u64..50).prop_map(Op::Advance),
        1 => Just(Op::Crash),
        1 => (1u8..4).prop_map(Op::Refuse),
        1 => (1u8..4).prop_map(Op::RefuseOutcomes),
    ]
}

fn facts_for(n: u8) -> (ClientId, &'static str, BTreeSet<String>) {
    let os = if n.is_multiple_of(3) {
        "windows"
    } else {
        "linux"
    };
    let l = if n.is_multiple_of(2) {
        labels(&["even"])
    } else {
        BTreeSet::new()
    };
    (client(n), os, l)
}

/// What the shell persisted: the latest record of each hunt and participant.
#[derive(Default)]
struct Store {
    hunts: BTreeMap<HuntId, HuntRecord>,
    parts: BTreeMap<(HuntId, ClientId), Participation>,
    scheduled_ever: BTreeMap<(HuntId, ClientId), u32>,
    /// Schedules still to refuse.
    refuse: u8,
    /// Outcome writes still to refuse.
    refuse_outcomes: u8,
    /// Outcomes refused since the last drain (the flow's completion is not recorded: the client
    /// resends its final status and the outcome comes again).
    unrecorded: Vec<(HuntId, ClientId)>,
    /// Schedules refused since the last crash (a restart forgets them: the shell offers every
    /// client again when it reconnects).
    refused: BTreeSet<(HuntId, ClientId)>,
}

impl Store {
    /// Carries out `m`'s actions as the shell does (every client is connected: an `Offer` is made).
    fn drain(&mut self, m: &mut HuntManager, now: Timestamp) {
        while let Some(a) = m.poll_action() {
            match a {
                HuntAction::Schedule { hunt, client, .. } if self.refuse > 0 => {
                    self.refuse -= 1;
                    self.refused.insert((hunt.clone(), client.clone()));
                    m.handle_schedule_failed(Monotonic(now.0), &hunt, &client);
                }
                HuntAction::Offer { hunt, client } => {
                    let n = (0u8..12)
                        .find(|n| client_id_of(*n) == client)
                        .expect("a known client");
                    let (id, os, l) = facts_for(n);
                    m.offer_to(
                        now,
                        &hunt,
                        ClientFacts {
                            id: &id,
                            os,
                            labels: &l,
                        },
                    );
                }
                HuntAction::Schedule { hunt, client, flow } => {
                    assert_eq!(flow, FlowId::for_hunt(&hunt, &client));
                    *self
                        .scheduled_ever
                        .entry((hunt.clone(), client.clone()))
                        .or_default() += 1;
                    self.parts.insert((hunt, client), Participation::Scheduled);
                }
                HuntAction::Participant {
                    hunt,
                    client,
                    participation,
                } if self.refuse_outcomes > 0 => {
                    self.refuse_outcomes -= 1;
                    m.handle_outcome_failed(&hunt, &client, participation);
                    self.unrecorded.push((hunt, client));
                }
                HuntAction::Participant {
                    hunt,
                    client,
                    participation,
                } => {
                    self.parts.insert((hunt, client), participation);
                }
                HuntAction::Record(r) => {
                    self.hunts.insert(r.id.clone(), r);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Invariant 3: a client is scheduled into a hunt at most once, across crashes, and never past
    /// its limit. Invariant 2: stats equal what the distinct participant records say, and match an
    /// independent model of distinct clients' first outcomes.
    #[test]
    fn stats_are_exact_and_scheduling_at_most_once(ops in prop::collection::vec(op(), 1..150)) {
        let limits = HuntLimits { hunts_max: 4, participants_max: 1000, schedule_retry_ms: 10 };
        let mut m = HuntManager::new(limits.clone());
        let mut store = Store::default();
        let mut now = Timestamp(0);
        let mut ids: Vec<HuntId> = vec![];
        // Independent model: first outcome per (hunt, client) among scheduled clients.
        let mut first: BTreeMap<(HuntId, ClientId), (bool, u64)> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Create { limit, os_linux, need_label, ttl } => {
                    let mut s = spec(now.as_ms() + ttl);
                    s.client_limit = limit;
                    s.os = os_linux.then(|| "linux".to_string());
                    if need_label { s.include_labels = labels(&["even"]); }
                    let id = HuntId::from_u64(ids.len() as u64 + 1);
                    if m.create(now, id.clone(), s).is_ok() { ids.push(id); }
                }
                Op::Offer { client } => {
                    let (id, os, l) = facts_for(client);
                    m.offer(now, ClientFacts { id: &id, os, labels: &l });
                }
                Op::Outcome { hunt, client, ok, rows } => {
                    let Some(h) = ids.get(hunt).cloned() else { continue };
                    let c = client_id_of(client);
                    let state = if ok { FinalState::Completed } else { FinalState::Error };
                    let eff = m.handle_outcome(now, &h, &c, state, rows, 0);
                    let scheduled = store.parts.contains_key(&(h.clone(), c.clone()));
                    match eff {
                        OutcomeEffect::Counted => {
                            prop_assert!(scheduled);
                            prop_assert!(first.insert((h, c), (ok, rows)).is_none());
                        }
                        OutcomeEffect::Duplicate => prop_assert!(first.contains_key(&(h, c))),
                        OutcomeEffect::NotParticipant => prop_assert!(!scheduled),
                    }
                }
                Op::Stop { hunt } => {
                    if let Some(h) = ids.get(hunt) { let _ = m.stop(now, h); }
                }
                Op::Advance(ms) => { now = now.plus_ms(ms); m.handle_timeout(now, Monotonic(now.0)); }
                Op::Refuse(n) => store.refuse = n,
                Op::RefuseOutcomes(n) => store.refuse_outcomes = n,
                Op::Crash => {
                    store.drain(&mut m, now);
                    store.refused.clear();
                    let parts = store.parts.iter().map(|((h, c), p)| (h.clone(), c.clone(), *p));
                    m = HuntManager::restore(limits.clone(), now, store.hunts.values().cloned(), parts);
                }
            }
            store.drain(&mut m, now);
            // An outcome not recorded is not counted (the model forgets it too): it comes again.
            for k in store.unrecorded.drain(..) {
                first.remove(&k);
            }
            for ((h, c), n) in &store.scheduled_ever {
                prop_assert_eq!(*n, 1, "client {} scheduled {} times into {}", c, n, h);
            }
            for hunt in m.list() {
                let id = &hunt.record().id;
                let s = hunt.stats();
                let sched = store.parts.keys().filter(|(h, _)| h == id).count() as u64;
                let done: Vec<_> = first.iter().filter(|((h, _), _)| h == id).map(|(_, v)| *v).collect();
                prop_assert_eq!(s.scheduled, sched);
                prop_assert_eq!(s.completed, done.iter().filter(|(ok, _)| *ok).count() as u64);
                prop_assert_eq!(s.errors, done.iter().filter(|(ok, _)| !*ok).count() as u64);
                prop_assert_eq!(s.rows, done.iter().map(|(_, r)| r).sum::<u64>());
                if let Some(limit) = hunt.record().spec.client_limit {
                    prop_assert!(s.scheduled <= limit);
                }
                prop_assert_eq!(store.hunts.get(id), Some(hunt.record()));
                // Invariant 2: every figure is backed by the participant records on storage.
                let mut stored = HuntStats::default();
                for ((h, _), p) in &store.parts {
                    if h == id {
                        p.add_to(&mut stored);
                    }
                }
                prop_assert_eq!(s, stored);
            }
        }
        // A refused schedule is offered again: once nothing refuses, each such client of a hunt
        // still running is a participant on storage, unless the hunt's limit filled meanwhile.
        store.refuse = 0;
        now = now.plus_ms(limits.schedule_retry_ms);
        m.handle_timeout(now, Monotonic(now.0));
        store.drain(&mut m, now);
        for (h, c) in &store.refused {
            let Some(hunt) = m.get(h) else { continue };
            let full = hunt.record().spec.client_limit.is_some_and(|n| hunt.stats().scheduled >= n);
            if hunt.record().state == HuntState::Running && !full {
                prop_assert!(store.parts.contains_key(&(h.clone(), c.clone())), "{} never offered {} again", h, c);
            }
        }
        prop_assert_eq!(m.retries(), 0);
    }
}

fn client_id_of(n: u8) -> ClientId {
    facts_for(n).0
}
