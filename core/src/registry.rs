//! The client registry: enrolment records, the memory-resident search index, and the bounded client
//! key cache each frontend keeps.
//!
//! # Identity (invariant 6 (docs/architecture.md))
//!
//! A client's id is derived from its public key ([`ClientId::from_public_key`]); the registry also
//! keeps the full SHA-256 fingerprint of the key it enrolled with. A later sighting under the same id
//! with a different fingerprint is refused ([`RegistryError::KeyMismatch`]) and changes nothing.
//!
//! # Search
//!
//! Queries: `all`, `host:X` (hostname or fqdn), `label:X`, `ip:X`, and a client id prefix `C.xxxx`.
//! Matching is by case-insensitive prefix (`host:web` finds `web01` and `WEB02.corp`). The index is
//! a set of `(term, client id)` pairs per field, so a query is a range scan, never a full scan
//! (except `all`, which is an in-order walk), and results come in a stable order.

use crate::ids::{ClientId, key_fingerprint};
use crate::time::{Monotonic, Timestamp};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// Bounds of the registry.
#[derive(Clone, Debug)]
pub struct RegistryLimits {
    /// Clients enrolled at most (set it well above the deployment's size).
    pub clients_max: usize,
    /// Labels per client.
    pub labels_per_client_max: usize,
    /// IP addresses kept per client.
    pub ips_per_client_max: usize,
    /// Longest hostname, label or address kept (bytes).
    pub term_bytes_max: usize,
    /// Results one search returns at most.
    pub search_results_max: usize,
    /// A client's `last_seen` is persisted at most this often (it is always current in memory).
    pub persist_seen_every_ms: u64,
    /// New clients admitted per second on average (`enrolments_per_second`); known clients are
    /// never limited.
    pub enrolments_per_second: u64,
    /// New clients admitted at once before the rate applies (a fleet's first connections).
    pub enrolment_burst: u64,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            clients_max: 2_000_000,
            labels_per_client_max: 64,
            ips_per_client_max: 16,
            term_bytes_max: 255,
            search_results_max: 100_000,
            persist_seen_every_ms: 10 * 60 * 1000,
            enrolments_per_second: 1_000,
            enrolment_burst: 60_000,
        }
    }
}

/// What a frontend reports when a client connects or pings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    /// The id derived from the key the client presented.
    pub id: ClientId,
    /// The key the client presented.
    pub public_key: Vec<u8>,
    /// Its hostname.
    pub hostname: String,
    /// Its fully qualified name.
    pub fqdn: String,
    /// Its OS.
    pub os: String,
    /// Its interface addresses.
    pub ips: Vec<String>,
    /// The address it connected from.
    pub last_ip: String,
    /// The node holding its connection.
    pub node: String,
    /// When that connection was established (wall clock, onto the master's: recorded, shown).
    pub connected_at: Timestamp,
    /// When that connection was established on the monotonic clock of the node judging the
    /// sighting (the master's: a minion's sighting is its age subtracted from the master's
    /// monotonic now). Orders sightings of one client from different nodes; a wall clock stepped
    /// back would make every new connection look older than the ones recorded before the step.
    pub connected_order: Monotonic,
}

/// One client, as kept in memory and persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRecord {
    /// The client.
    pub id: ClientId,
    /// SHA-256 of the key it enrolled with.
    pub key_fingerprint: [u8; 32],
    /// Hostname.
    pub hostname: String,
    /// Fully qualified name.
    pub fqdn: String,
    /// OS.
    pub os: String,
    /// Labels (lower case).
    pub labels: BTreeSet<String>,
    /// Interface addresses.
    pub ips: Vec<String>,
    /// When it enrolled.
    pub first_seen: Timestamp,
    /// When it was last seen.
    pub last_seen: Timestamp,
    /// The address it last connected from.
    pub last_ip: String,
    /// The node holding its connection (or that last held it).
    pub node: String,
    /// Whether it is connected now.
    pub connected: bool,
    /// When `last_seen` was last persisted.
    pub persisted_seen: Timestamp,
    /// When the connection `node` holds was established (0 until seen since a restart).
    pub connected_at: Timestamp,
}

/// A parsed search query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// Every client.
    All,
    /// Hostname or fqdn prefix.
    Host(String),
    /// Label prefix.
    Label(String),
    /// Address prefix.
    Ip(String),
    /// Client id prefix (`C.` included).
    Id(String),
}

/// Why a query could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError(pub String);

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad search query {:?}: use all, host:NAME, label:NAME, ip:ADDR, a client id prefix C.xxxx \
             or a bare host-name prefix",
            self.0
        )
    }
}

impl std::error::Error for QueryError {}

impl Query {
    /// Parses `all | host:X | label:X | ip:X | C.<prefix>`; a bare word is a host-name prefix.
    pub fn parse(s: &str) -> Result<Query, QueryError> {
        let s = s.trim();
        let err = || QueryError(s.to_owned());
        let (field, value) = match s.split_once(':') {
            Some((f, v)) => (f.to_ascii_lowercase(), v.trim().to_ascii_lowercase()),
            None if s.eq_ignore_ascii_case("all") => return Ok(Query::All),
            None if s.starts_with("C.") => {
                return Ok(Query::Id(s.to_ascii_lowercase().replacen("c.", "C.", 1)));
            }
            None if !s.is_empty() && !s.contains(char::is_whitespace) => {
                ("host".to_owned(), s.to_ascii_lowercase())
            }
            None => return Err(err()),
        };
        if value.is_empty() || value.len() > 255 {
            return Err(err());
        }
        match field.as_str() {
            "host" => Ok(Query::Host(value)),
            "label" => Ok(Query::Label(value)),
            "ip" => Ok(Query::Ip(value)),
            _ => Err(err()),
        }
    }
}

/// Why the registry refused something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryError {
    /// The client enrolled with a different key: the sighting is an impersonation attempt.
    KeyMismatch(ClientId),
    /// The presented key does not derive the claimed id.
    IdNotFromKey(ClientId),
    /// `clients_max` clients are enrolled.
    Full {
        /// The bound.
        max: usize,
    },
    /// New clients arrive faster than `enrolments_per_second` (after the burst): retry later.
    EnrolmentRate {
        /// The rate.
        per_second: u64,
    },
    /// No such client.
    UnknownClient(ClientId),
    /// A label is empty, too long, or has characters outside `[a-z0-9_.:-]`.
    BadLabel(String),
    /// The client carries `labels_per_client_max` labels.
    TooManyLabels {
        /// The bound.
        max: usize,
    },
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::KeyMismatch(id) => {
                write!(f, "client {id} presented a key it did not enrol with")
            }
            RegistryError::IdNotFromKey(id) => {
                write!(f, "client id {id} is not derived from the presented key")
            }
            RegistryError::Full { max } => write!(
                f,
                "{max} clients enrolled; no more are admitted (Frontend.resources.max_clients)"
            ),
            RegistryError::EnrolmentRate { per_second } => write!(
                f,
                "new clients are admitted at {per_second} per second \
                 (Frontend.resources.enrolments_per_second); retry later"
            ),
            RegistryError::UnknownClient(id) => write!(f, "no client {id}"),
            RegistryError::BadLabel(l) => {
                let shown: String = l.chars().take(64).collect();
                write!(
                    f,
                    "label {shown:?} must be 1..=64 characters of a-z 0-9 _ . : -"
                )
            }
            RegistryError::TooManyLabels { max } => write!(f, "client already has {max} labels"),
        }
    }
}

impl std::error::Error for RegistryError {}

/// Whether a sighting enrolled a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrolment {
    /// First contact: the client is now enrolled under its key.
    New,
    /// A known client, same key.
    Known,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryAction {
    /// Persist the client's record (enrolment, label or host change, or a throttled `last_seen`).
    Persist(Box<ClientRecord>),
    /// The client's labels changed: broadcast to the frontends (hunts may now match it).
    LabelsChanged(ClientId),
}

/// Normalises and checks a label.
pub fn normalize_label(label: &str) -> Result<String, RegistryError> {
    let l = label.trim().to_ascii_lowercase();
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
    if l.is_empty() || l.len() > 64 || !l.bytes().all(ok) {
        return Err(RegistryError::BadLabel(label.to_owned()));
    }
    Ok(l)
}

fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Search results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchResult<'a> {
    /// Matching clients of the page, in the order asked for.
    pub clients: Vec<&'a ClientRecord>,
    /// True if more matched after this page.
    pub truncated: bool,
    /// How many matched in all.
    pub total: usize,
}

/// The order of search results: by one field, ties (and [`SortKey::Id`]) in client id order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    /// Client id.
    #[default]
    Id,
    /// Host name.
    Host,
    /// When it was last seen.
    LastSeen,
    /// OS.
    Os,
    /// The node holding (or that last held) its connection.
    Node,
    /// The address it last connected from.
    LastIp,
    /// Connected first (ascending: offline first).
    Connected,
}

impl SortKey {
    /// Parses the API's name: `id`, `hostname`, `last_seen`, `os`, `node`, `last_ip`, `connected`
    /// (empty: `id`).
    pub fn parse(s: &str) -> Result<SortKey, String> {
        Ok(match s {
            "" | "id" | "client_id" => SortKey::Id,
            "hostname" => SortKey::Host,
            "last_seen" => SortKey::LastSeen,
            "os" => SortKey::Os,
            "node" => SortKey::Node,
            "last_ip" => SortKey::LastIp,
            "connected" => SortKey::Connected,
            other => {
                return Err(format!(
                    "cannot sort clients by {other:?}: use id, hostname, last_seen, os, node, last_ip or connected"
                ));
            }
        })
    }

    fn cmp(self, a: &ClientRecord, b: &ClientRecord) -> std::cmp::Ordering {
        let by = match self {
            SortKey::Id => std::cmp::Ordering::Equal,
            SortKey::Host => a.hostname.cmp(&b.hostname),
            SortKey::LastSeen => a.last_seen.cmp(&b.last_seen),
            SortKey::Os => a.os.cmp(&b.os),
            SortKey::Node => a.node.cmp(&b.node),
            SortKey::LastIp => a.last_ip.cmp(&b.last_ip),
            SortKey::Connected => a.connected.cmp(&b.connected),
        };
        by.then_with(|| a.id.cmp(&b.id))
    }
}

/// All enrolled clients and their index.
#[derive(Debug)]
pub struct Registry {
    limits: RegistryLimits,
    records: BTreeMap<ClientId, ClientRecord>,
    by_host: BTreeSet<(String, ClientId)>,
    by_label: BTreeSet<(String, ClientId)>,
    by_ip: BTreeSet<(String, ClientId)>,
    actions: VecDeque<RegistryAction>,
    /// Paces enrolments (made at the first one, full).
    enrolments: Option<crate::ratelimit::TokenBucket>,
    /// The `connected_order` of the connection each record reflects, since this process started
    /// (at most one per record: bounded by `clients_max`).
    connection_order: BTreeMap<ClientId, Monotonic>,
    /// Records whose last persist was refused or may not have landed: persisted again with the
    /// next sighting or label, changed or not (bounded by `clients_max`).
    dirty: BTreeSet<ClientId>,
}

impl Registry {
    /// Rebuilds the registry from persisted records (every client is marked disconnected).
    pub fn restore(
        limits: RegistryLimits,
        records: impl IntoIterator<Item = ClientRecord>,
    ) -> Registry {
        let mut r = Registry {
            limits,
            records: BTreeMap::new(),
            by_host: BTreeSet::new(),
            by_label: BTreeSet::new(),
            by_ip: BTreeSet::new(),
            actions: VecDeque::new(),
            enrolments: None,
            connection_order: BTreeMap::new(),
            dirty: BTreeSet::new(),
        };
        for mut rec in records {
            rec.connected = false;
            r.index(&rec);
            r.records.insert(rec.id.clone(), rec);
        }
        r
    }

    /// Clients enrolled.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True if no client is enrolled.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// One client.
    pub fn get(&self, id: &ClientId) -> Option<&ClientRecord> {
        self.records.get(id)
    }

    fn terms(rec: &ClientRecord) -> [Vec<String>; 3] {
        let mut hosts = vec![rec.hostname.to_ascii_lowercase()];
        if !rec.fqdn.is_empty() && !rec.fqdn.eq_ignore_ascii_case(&rec.hostname) {
            hosts.push(rec.fqdn.to_ascii_lowercase());
        }
        let labels = rec.labels.iter().cloned().collect();
        let mut ips: Vec<String> = rec.ips.iter().map(|s| s.to_ascii_lowercase()).collect();
        if !rec.last_ip.is_empty() {
            ips.push(rec.last_ip.to_ascii_lowercase());
        }
        [hosts, labels, ips]
    }

    fn index(&mut self, rec: &ClientRecord) {
        let [h, l, i] = Self::terms(rec);
        self.by_host
            .extend(h.into_iter().map(|t| (t, rec.id.clone())));
        self.by_label
            .extend(l.into_iter().map(|t| (t, rec.id.clone())));
        self.by_ip
            .extend(i.into_iter().map(|t| (t, rec.id.clone())));
    }

    fn unindex(&mut self, rec: &ClientRecord) {
        let [h, l, i] = Self::terms(rec);
        for t in h {
            self.by_host.remove(&(t, rec.id.clone()));
        }
        for t in l {
            self.by_label.remove(&(t, rec.id.clone()));
        }
        for t in i {
            self.by_ip.remove(&(t, rec.id.clone()));
        }
    }

    /// A frontend saw a client: enrol it on first contact (at most `enrolments_per_second`, paced
    /// on the monotonic clock `at`), refuse a different key, update its facts (`now`: the wall
    /// clock, recorded).
    pub fn handle_seen(
        &mut self,
        now: Timestamp,
        at: Monotonic,
        s: Sighting,
    ) -> Result<Enrolment, RegistryError> {
        self.seen(now, s, Some(at))
    }

    /// [`Registry::handle_seen`] for a sighting another node admitted already (a minion paces the
    /// first contacts it accepts): not paced again here, or a refusal would leave a client the
    /// minion serves unenrolled until it reconnects.
    pub fn handle_seen_admitted(
        &mut self,
        now: Timestamp,
        s: Sighting,
    ) -> Result<Enrolment, RegistryError> {
        self.seen(now, s, None)
    }

    fn seen(
        &mut self,
        now: Timestamp,
        s: Sighting,
        pace: Option<Monotonic>,
    ) -> Result<Enrolment, RegistryError> {
        if ClientId::from_public_key(&s.public_key) != s.id {
            return Err(RegistryError::IdNotFromKey(s.id));
        }
        let fp = key_fingerprint(&s.public_key);
        let max = self.limits.term_bytes_max;
        let mut ips: Vec<String> = s
            .ips
            .iter()
            .take(self.limits.ips_per_client_max)
            .map(|ip| clip(ip, max))
            .collect();
        ips.sort();
        ips.dedup();
        let (old, enrolment) = match self.records.get(&s.id) {
            Some(old) if old.key_fingerprint != fp => return Err(RegistryError::KeyMismatch(s.id)),
            Some(old) => (Some(old.clone()), Enrolment::Known),
            None if self.records.len() >= self.limits.clients_max => {
                return Err(RegistryError::Full {
                    max: self.limits.clients_max,
                });
            }
            None if pace.is_none() => (None, Enrolment::New),
            None => {
                let at = pace.unwrap_or_default();
                let (rate, burst) = (
                    self.limits.enrolments_per_second,
                    self.limits.enrolment_burst,
                );
                let bucket = self
                    .enrolments
                    .get_or_insert_with(|| crate::ratelimit::TokenBucket::new(rate, burst, at));
                if !bucket.try_take(at) {
                    return Err(RegistryError::EnrolmentRate { per_second: rate });
                }
                (None, Enrolment::New)
            }
        };
        // Sightings from different nodes arrive in no particular order (a minion re-announces its
        // clients when its link to the master comes back, and may still hold a connection that died
        // silently): one older than the connection the record reflects, from another node, is stale.
        if let Some(o) = &old
            && o.node != s.node
            && self
                .connection_order
                .get(&s.id)
                .is_some_and(|&prev| s.connected_order < prev)
        {
            return Ok(Enrolment::Known);
        }
        self.connection_order
            .insert(s.id.clone(), s.connected_order);
        let rec = ClientRecord {
            id: s.id.clone(),
            key_fingerprint: fp,
            hostname: clip(&s.hostname, max),
            fqdn: clip(&s.fqdn, max),
            os: clip(&s.os, 32),
            labels: old.as_ref().map(|o| o.labels.clone()).unwrap_or_default(),
            ips,
            first_seen: old.as_ref().map_or(now, |o| o.first_seen),
            last_seen: now,
            last_ip: clip(&s.last_ip, max),
            node: clip(&s.node, max),
            connected: true,
            persisted_seen: old.as_ref().map_or(now, |o| o.persisted_seen),
            connected_at: s.connected_at,
        };
        let changed = old.as_ref().is_none_or(|o| {
            (&o.hostname, &o.fqdn, &o.os, &o.ips, &o.last_ip, &o.node)
                != (
                    &rec.hostname,
                    &rec.fqdn,
                    &rec.os,
                    &rec.ips,
                    &rec.last_ip,
                    &rec.node,
                )
        });
        let stale = now.since_ms(rec.persisted_seen) >= self.limits.persist_seen_every_ms;
        if let Some(o) = &old {
            self.unindex(o);
        }
        self.index(&rec);
        let mut rec = rec;
        if changed || stale || self.dirty.contains(&s.id) {
            rec.persisted_seen = now;
            self.dirty.remove(&s.id);
            self.actions
                .push_back(RegistryAction::Persist(Box::new(rec.clone())));
        }
        self.records.insert(s.id, rec);
        Ok(enrolment)
    }

    /// A client's connection closed (or its node went away).
    pub fn set_disconnected(&mut self, now: Timestamp, id: &ClientId, node: &str) {
        if let Some(r) = self.records.get_mut(id) {
            // Only the node that holds the client may say it is gone (it may have moved already).
            if r.node == node {
                r.connected = false;
                r.last_seen = now;
            }
        }
    }

    /// Clients connected to some node now, in id order.
    pub fn connected(&self) -> impl Iterator<Item = &ClientRecord> {
        self.records.values().filter(|r| r.connected)
    }

    /// A node restarted: every client it held is disconnected (until it is seen again). Returns how
    /// many were.
    pub fn disconnect_node(&mut self, now: Timestamp, node: &str) -> usize {
        let mut n = 0;
        for r in self.records.values_mut() {
            if r.connected && r.node == node {
                r.connected = false;
                r.last_seen = now;
                n += 1;
            }
        }
        n
    }

    /// Adds (or, with `remove`, removes) a label.
    pub fn set_label(
        &mut self,
        id: &ClientId,
        label: &str,
        remove: bool,
    ) -> Result<&ClientRecord, RegistryError> {
        let label = normalize_label(label)?;
        let max = self.limits.labels_per_client_max;
        let rec = self
            .records
            .get(id)
            .ok_or_else(|| RegistryError::UnknownClient(id.clone()))?;
        if !remove && !rec.labels.contains(&label) && rec.labels.len() >= max {
            return Err(RegistryError::TooManyLabels { max });
        }
        let had = rec.labels.contains(&label);
        if had != remove {
            if self.dirty.remove(id) {
                // Nothing to change, but what is on storage may lack an earlier change.
                let rec = rec.clone();
                self.actions
                    .push_back(RegistryAction::Persist(Box::new(rec)));
            }
            return Ok(&self.records[id]); // Nothing to change.
        }
        self.dirty.remove(id);
        if remove {
            self.by_label.remove(&(label.clone(), id.clone()));
        } else {
            self.by_label.insert((label.clone(), id.clone()));
        }
        let rec = self.records.get_mut(id).expect("checked above");
        if remove {
            rec.labels.remove(&label);
        } else {
            rec.labels.insert(label);
        }
        self.actions
            .push_back(RegistryAction::Persist(Box::new(rec.clone())));
        self.actions
            .push_back(RegistryAction::LabelsChanged(id.clone()));
        Ok(rec)
    }

    /// A record's persist (its [`RegistryAction::Persist`]) was refused or may not have landed: it
    /// is persisted again with the client's next sighting or label change, changed or not.
    pub fn handle_persist_failed(&mut self, id: &ClientId) {
        if self.records.contains_key(id) {
            self.dirty.insert(id.clone());
        }
    }

    /// Runs a query; at most `limit` (and `search_results_max`) results, in client id order.
    pub fn search(&self, q: &Query, limit: usize) -> SearchResult<'_> {
        self.search_page(q, 0, limit)
    }

    /// Runs a query, skipping the first `offset` matches (in client id order); at most `limit`
    /// (and `search_results_max`) results.
    pub fn search_page(&self, q: &Query, offset: usize, limit: usize) -> SearchResult<'_> {
        self.search_sorted(q, SortKey::Id, false, offset, limit)
    }

    /// Runs a query, matches ordered by `sort` (`descending`: reversed), skipping the first `offset`;
    /// at most `limit` (and `search_results_max`) results, and how many matched in all. In client
    /// id order the page costs its offset and length (and, but for `all`, the matches' count); in
    /// another, the matches are sorted (O(m log m) for m matches).
    pub fn search_sorted(
        &self,
        q: &Query,
        sort: SortKey,
        descending: bool,
        offset: usize,
        limit: usize,
    ) -> SearchResult<'_> {
        let limit = limit.min(self.limits.search_results_max);
        let prefix_scan = |set: &BTreeSet<(String, ClientId)>, p: &str| -> BTreeSet<ClientId> {
            set.range(
                (
                    p.to_owned(),
                    ClientId::parse("C.0000000000000000").expect("valid"),
                )..,
            )
            .take_while(|(t, _)| t.starts_with(p))
            .map(|(_, id)| id.clone())
            .collect()
        };
        let ids: Box<dyn Iterator<Item = ClientId>> = match q {
            Query::All => Box::new(self.records.keys().cloned()),
            Query::Host(p) => Box::new(prefix_scan(&self.by_host, p).into_iter()),
            Query::Label(p) => Box::new(prefix_scan(&self.by_label, p).into_iter()),
            Query::Ip(p) => Box::new(prefix_scan(&self.by_ip, p).into_iter()),
            Query::Id(p) => Box::new(
                self.records
                    .range::<str, _>((
                        std::ops::Bound::Included(p.as_str()),
                        std::ops::Bound::Unbounded,
                    ))
                    .take_while(|(id, _)| id.as_str().starts_with(p.as_str()))
                    .map(|(id, _)| id.clone()),
            ),
        };
        if sort == SortKey::Id && !descending && matches!(q, Query::All) {
            // Every record, in id order: no need to gather them.
            let total = self.records.len();
            let clients: Vec<&ClientRecord> =
                self.records.values().skip(offset).take(limit).collect();
            let truncated = offset.saturating_add(clients.len()) < total;
            return SearchResult {
                clients,
                truncated,
                total,
            };
        }
        let mut all: Vec<&ClientRecord> = match q {
            // Every record: no id to clone and look up.
            Query::All => self.records.values().collect(),
            _ => ids.filter_map(|id| self.records.get(&id)).collect(),
        };
        let total = all.len();
        // Only the matches up to the end of the page are put in order: the first `end` in
        // O(m) (a selection), then those sorted; the rest stay unordered.
        let end = offset.saturating_add(limit).min(total);
        let order = |a: &&ClientRecord, b: &&ClientRecord| {
            let o = sort.cmp(a, b);
            if descending { o.reverse() } else { o }
        };
        if end > 0 && (sort != SortKey::Id || descending) {
            if end < total {
                all.select_nth_unstable_by(end - 1, order);
            }
            all[..end].sort_unstable_by(order);
        }
        all.truncate(end);
        let clients: Vec<&ClientRecord> = all.into_iter().skip(offset).collect();
        let truncated = offset.saturating_add(clients.len()) < total;
        SearchResult {
            clients,
            truncated,
            total,
        }
    }

    /// Per node (by name): clients whose connection it holds or last held, and of them connected.
    /// One pass over the records.
    pub fn counts_by_node(&self) -> Vec<(String, u64, u64)> {
        let mut by: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for r in self.records.values() {
            let e = by.entry(r.node.as_str()).or_default();
            e.0 += 1;
            e.1 += u64::from(r.connected);
        }
        by.into_iter()
            .map(|(n, (all, on))| (n.to_owned(), all, on))
            .collect()
    }

    /// Clients carrying every label of `include` and none of `exclude`, of OS `os` (any case) if
    /// given, as a hunt would take them: (matching, of them connected). Narrowed by the first
    /// included label's index when there is one, else one pass over the records.
    pub fn count_matching(
        &self,
        include: &BTreeSet<String>,
        exclude: &BTreeSet<String>,
        os: Option<&str>,
    ) -> (u64, u64) {
        let fits = |r: &ClientRecord| {
            include.iter().all(|l| r.labels.contains(l))
                && !exclude.iter().any(|l| r.labels.contains(l))
                && os.is_none_or(|o| o.eq_ignore_ascii_case(&r.os))
        };
        let candidates: Box<dyn Iterator<Item = &ClientRecord>> = match include.first() {
            Some(l) => Box::new(
                self.by_label
                    .range(
                        (
                            l.clone(),
                            ClientId::parse("C.0000000000000000").expect("valid"),
                        )..,
                    )
                    .take_while(move |(t, _)| t == l)
                    .filter_map(|(_, id)| self.records.get(id)),
            ),
            None => Box::new(self.records.values()),
        };
        candidates
            .filter(|r| fits(r))
            .fold((0, 0), |(n, on), r| (n + 1, on + u64::from(r.connected)))
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<RegistryAction> {
        self.actions.pop_front()
    }
}

/// Whether a connecting client's key is the one on record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// Cached, same key: accept without a storage read.
    Match,
    /// Cached, different key: refuse.
    Mismatch,
    /// Not cached: look the record up (and `insert` it).
    Unknown,
}

/// A frontend's bounded LRU of client key fingerprints, sized by `Frontend.resources.expected_clients`,
/// so that a connecting client needs no storage read.
#[derive(Debug)]
pub struct KeyCache {
    capacity: usize,
    map: BTreeMap<ClientId, ([u8; 32], u64)>,
    lru: BTreeMap<u64, ClientId>,
    next_tick: u64,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that were not.
    pub misses: u64,
}

impl KeyCache {
    /// An empty cache holding at most `capacity` keys.
    pub fn new(capacity: usize) -> KeyCache {
        assert!(capacity > 0);
        KeyCache {
            capacity,
            map: BTreeMap::new(),
            lru: BTreeMap::new(),
            next_tick: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Checks a presented key against the cached fingerprint.
    pub fn check(&mut self, id: &ClientId, public_key: &[u8]) -> KeyCheck {
        let tick = self.next_tick;
        match self.map.get_mut(id) {
            None => {
                self.misses += 1;
                KeyCheck::Unknown
            }
            Some((fp, t)) => {
                self.hits += 1;
                self.lru.remove(t);
                *t = tick;
                self.lru.insert(tick, id.clone());
                self.next_tick += 1;
                if *fp == key_fingerprint(public_key) {
                    KeyCheck::Match
                } else {
                    KeyCheck::Mismatch
                }
            }
        }
    }

    /// Caches a client's enrolled fingerprint, evicting the least recently used beyond capacity.
    pub fn insert(&mut self, id: ClientId, fingerprint: [u8; 32]) {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some((_, old)) = self.map.insert(id.clone(), (fingerprint, tick)) {
            self.lru.remove(&old);
        }
        self.lru.insert(tick, id);
        while self.map.len() > self.capacity {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            self.map.remove(&victim);
        }
    }
}

#[cfg(test)]
mod tests;
