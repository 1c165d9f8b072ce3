//! The hunt manager (master only, the single writer of hunt state): create, stop and expire hunts;
//! decide whether a client takes part; keep exact statistics.
//!
//! # Exactness
//!
//! Statistics are derived from one record per participating client ([`Participation`]), never from
//! counters bumped by events. An outcome that arrives twice, late, after a stop or after a restart
//! changes nothing the second time. So `completed` is the number of distinct clients with a completed
//! flow, `scheduled` the number of distinct clients scheduled (invariant 2 (docs/architecture.md)).
//!
//! # At most once
//!
//! [`HuntAction::Schedule`] carries the participation record; the shell journals it (durable) before
//! delivering the task. After a master crash the restored records say who was scheduled, so no client
//! is scheduled into a hunt twice (invariant 3 (docs/architecture.md)). The flow id is derived from the hunt and client
//! ids, so even a task delivered twice by a confused shell names one flow.

use crate::flows::FinalState;
use crate::ids::{ClientId, FlowId, HuntId};
use crate::time::{Monotonic, Timestamp};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// Bounds of the hunt manager.
#[derive(Clone, Debug)]
pub struct HuntLimits {
    /// Hunts kept in memory (running or not).
    pub hunts_max: usize,
    /// Participants one hunt may have (set to the deployment's client bound).
    pub participants_max: u64,
    /// How long after a failed schedule the client is offered the hunt again.
    pub schedule_retry_ms: u64,
}

impl Default for HuntLimits {
    fn default() -> Self {
        HuntLimits {
            hunts_max: 10_000,
            participants_max: 1_000_000,
            schedule_retry_ms: SCHEDULE_RETRY_MS,
        }
    }
}

/// What an analyst asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HuntSpec {
    /// The artifact (validated by the caller with [`crate::artifacts::validate`]).
    pub artifact: String,
    /// Its parameters, defaults filled in.
    pub params: BTreeMap<String, String>,
    /// A client must carry every one of these labels.
    pub include_labels: BTreeSet<String>,
    /// A client carrying any of these labels is left out.
    pub exclude_labels: BTreeSet<String>,
    /// Only clients of this OS (`linux`, `windows`, `darwin`); `None` for all.
    pub os: Option<String>,
    /// No client is scheduled at or after this time.
    pub expires: Timestamp,
    /// At most this many clients take part.
    pub client_limit: Option<u64>,
    /// Free text.
    pub description: String,
    /// Who created it (the API or GUI user).
    pub creator: String,
}

/// Where a hunt stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum HuntState {
    /// Scheduling clients.
    Running,
    /// Stopped by an analyst; scheduled flows still report.
    Stopped,
    /// Reached its expiry time.
    Expired,
    /// Reached its client limit and every participant finished.
    Complete,
}

impl HuntState {
    /// Lower-case name, as the CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            HuntState::Running => "running",
            HuntState::Stopped => "stopped",
            HuntState::Expired => "expired",
            HuntState::Complete => "complete",
        }
    }
}

/// Exact hunt statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HuntStats {
    /// Distinct clients scheduled.
    pub scheduled: u64,
    /// Distinct clients whose flow completed.
    pub completed: u64,
    /// Distinct clients whose flow ended in error.
    pub errors: u64,
    /// Rows from finished flows.
    pub rows: u64,
    /// Uploaded bytes from finished flows.
    pub uploaded_bytes: u64,
}

/// One client's part in one hunt: the unit that is persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Participation {
    /// Tasked; no outcome yet.
    Scheduled,
    /// The flow completed.
    Completed {
        /// Rows stored.
        rows: u64,
        /// Bytes uploaded.
        uploaded_bytes: u64,
    },
    /// The flow failed.
    Error {
        /// Rows stored before the error.
        rows: u64,
        /// Bytes uploaded before the error.
        uploaded_bytes: u64,
    },
}

impl Participation {
    fn add_to(self, s: &mut HuntStats) {
        s.scheduled += 1;
        match self {
            Participation::Scheduled => {}
            Participation::Completed {
                rows,
                uploaded_bytes,
            } => {
                s.completed += 1;
                s.rows += rows;
                s.uploaded_bytes += uploaded_bytes;
            }
            Participation::Error {
                rows,
                uploaded_bytes,
            } => {
                s.errors += 1;
                s.rows += rows;
                s.uploaded_bytes += uploaded_bytes;
            }
        }
    }
}

/// The persisted part of a hunt (participants are persisted one record each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HuntRecord {
    /// The hunt.
    pub id: HuntId,
    /// What was asked.
    pub spec: HuntSpec,
    /// When it was created.
    pub created: Timestamp,
    /// Where it stands.
    pub state: HuntState,
}

/// A hunt in memory.
#[derive(Clone, Debug)]
pub struct Hunt {
    record: HuntRecord,
    participants: BTreeMap<ClientId, Participation>,
    stats: HuntStats,
}

impl Hunt {
    /// The persisted part.
    pub fn record(&self) -> &HuntRecord {
        &self.record
    }

    /// Exact statistics.
    pub fn stats(&self) -> HuntStats {
        self.stats
    }

    /// A client's part, if it takes part.
    pub fn participation(&self, client: &ClientId) -> Option<Participation> {
        self.participants.get(client).copied()
    }

    /// Every participant, in client id order.
    pub fn participants(&self) -> impl Iterator<Item = (&ClientId, &Participation)> {
        self.participants.iter()
    }

    fn recount(&self) -> HuntStats {
        let mut s = HuntStats::default();
        for p in self.participants.values() {
            p.add_to(&mut s);
        }
        s
    }

    fn all_finished(&self) -> bool {
        self.stats.completed + self.stats.errors == self.stats.scheduled
    }
}

/// What a client needs to show for a participation decision.
#[derive(Clone, Copy, Debug)]
pub struct ClientFacts<'a> {
    /// The client.
    pub id: &'a ClientId,
    /// Its OS.
    pub os: &'a str,
    /// Its labels.
    pub labels: &'a BTreeSet<String>,
}

/// The participation decision for one client and one hunt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Scheduled now, in this flow.
    Scheduled(FlowId),
    /// Already takes part (scheduled earlier): not scheduled again.
    AlreadyIn,
    /// The hunt is not running.
    NotRunning(HuntState),
    /// The client's OS does not match.
    WrongOs,
    /// The client lacks an include label.
    MissingLabel(String),
    /// The client carries an exclude label.
    ExcludedLabel(String),
    /// The client limit is reached.
    LimitReached,
    /// The hunt has `participants_max` participants.
    Full,
    /// No such hunt.
    UnknownHunt,
}

/// What counting an outcome did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeEffect {
    /// Counted once.
    Counted,
    /// The client's outcome was already counted: ignored.
    Duplicate,
    /// The client does not take part in the hunt (or the hunt is unknown): ignored.
    NotParticipant,
}

/// Why a hunt operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HuntError {
    /// `hunts_max` hunts exist.
    TooManyHunts {
        /// The bound.
        max: usize,
    },
    /// The expiry is not in the future.
    ExpiryInPast,
    /// The id is taken.
    DuplicateId(HuntId),
    /// No such hunt.
    NotFound(HuntId),
}

impl fmt::Display for HuntError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HuntError::TooManyHunts { max } => {
                write!(f, "{max} hunts exist; delete old ones first")
            }
            HuntError::ExpiryInPast => write!(f, "the hunt's expiry must be in the future"),
            HuntError::DuplicateId(id) => write!(f, "hunt {id} already exists"),
            HuntError::NotFound(id) => write!(f, "no hunt {id}"),
        }
    }
}

impl std::error::Error for HuntError {}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HuntAction {
    /// Persist the participant as scheduled (journal, durable), then deliver the task.
    Schedule {
        /// The hunt.
        hunt: HuntId,
        /// The client.
        client: ClientId,
        /// The flow to run.
        flow: FlowId,
    },
    /// Persist a participant's outcome.
    Participant {
        /// The hunt.
        hunt: HuntId,
        /// The client.
        client: ClientId,
        /// Its new state.
        participation: Participation,
    },
    /// Persist a hunt record (created or state changed); broadcast it to minions.
    Record(HuntRecord),
    /// Offer the client to the hunt again ([`HuntManager::offer_to`]) if it is connected: its
    /// schedule failed ([`HuntManager::handle_schedule_failed`]) `schedule_retry_ms` ago.
    Offer {
        /// The hunt.
        hunt: HuntId,
        /// The client.
        client: ClientId,
    },
}

/// How long after a failed schedule the client is offered the hunt again (default of
/// [`HuntLimits::schedule_retry_ms`]).
pub const SCHEDULE_RETRY_MS: u64 = 5_000;

/// All hunts.
#[derive(Debug)]
pub struct HuntManager {
    limits: HuntLimits,
    hunts: BTreeMap<HuntId, Hunt>,
    actions: VecDeque<HuntAction>,
    /// Failed schedules to offer again, by when (at most `participants_max`; beyond it a client
    /// is offered the hunt when it next connects).
    retries: BTreeSet<(Monotonic, HuntId, ClientId)>,
}

impl HuntManager {
    /// No hunts.
    pub fn new(limits: HuntLimits) -> HuntManager {
        HuntManager {
            limits,
            hunts: BTreeMap::new(),
            actions: VecDeque::new(),
            retries: BTreeSet::new(),
        }
    }

    /// Rebuilds the manager from persisted records after a restart; expires what expired meanwhile.
    pub fn restore(
        limits: HuntLimits,
        now: Timestamp,
        records: impl IntoIterator<Item = HuntRecord>,
        participants: impl IntoIterator<Item = (HuntId, ClientId, Participation)>,
    ) -> HuntManager {
        let mut m = HuntManager::new(limits);
        for r in records {
            let h = Hunt {
                record: r,
                participants: BTreeMap::new(),
                stats: HuntStats::default(),
            };
            m.hunts.insert(h.record.id.clone(), h);
        }
        for (hunt, client, p) in participants {
            if let Some(h) = m.hunts.get_mut(&hunt) {
                h.participants.insert(client, p);
            }
        }
        for h in m.hunts.values_mut() {
            h.stats = h.recount();
        }
        m.expire_due(now);
        m
    }

    /// Creates a running hunt.
    pub fn create(
        &mut self,
        now: Timestamp,
        id: HuntId,
        spec: HuntSpec,
    ) -> Result<&Hunt, HuntError> {
        if self.hunts.len() >= self.limits.hunts_max {
            return Err(HuntError::TooManyHunts {
                max: self.limits.hunts_max,
            });
        }
        if spec.expires <= now {
            return Err(HuntError::ExpiryInPast);
        }
        if self.hunts.contains_key(&id) {
            return Err(HuntError::DuplicateId(id));
        }
        let record = HuntRecord {
            id: id.clone(),
            spec,
            created: now,
            state: HuntState::Running,
        };
        self.actions.push_back(HuntAction::Record(record.clone()));
        let h = Hunt {
            record,
            participants: BTreeMap::new(),
            stats: HuntStats::default(),
        };
        Ok(self.hunts.entry(id).or_insert(h))
    }

    /// The record of a hunt just created could not be written (refused, or maybe written by a
    /// master that then stopped): the caller was told it failed, so the hunt is forgotten rather
    /// than left running in memory with nothing on storage — where clients offered it would become
    /// participants of a hunt a restart does not know. Ignored once the hunt has participants (its
    /// record was written then). Returns whether it was forgotten.
    pub fn handle_create_failed(&mut self, id: &HuntId) -> bool {
        let fresh = self
            .hunts
            .get(id)
            .is_some_and(|h| h.participants.is_empty());
        if fresh {
            self.hunts.remove(id);
            self.retries.retain(|(_, h, _)| h != id);
            self.actions.retain(|a| match a {
                HuntAction::Record(r) => &r.id != id,
                HuntAction::Schedule { hunt, .. }
                | HuntAction::Participant { hunt, .. }
                | HuntAction::Offer { hunt, .. } => hunt != id,
            });
        }
        fresh
    }

    /// Stops a running hunt (a hunt not running is left as it is). Scheduled flows still report
    /// and are counted.
    pub fn stop(&mut self, now: Timestamp, id: &HuntId) -> Result<&Hunt, HuntError> {
        self.expire_due(now);
        let h = self
            .hunts
            .get_mut(id)
            .ok_or_else(|| HuntError::NotFound(id.clone()))?;
        if h.record.state != HuntState::Running {
            // Stopped, expired or complete already: nothing left to stop, and asking again (a
            // retried request, a script run twice) is not an error.
            return Ok(h);
        }
        h.record.state = HuntState::Stopped;
        self.actions.push_back(HuntAction::Record(h.record.clone()));
        Ok(h)
    }

    /// Offers a client to every running hunt (on connect, or when a hunt starts). Returns how many
    /// hunts scheduled it.
    pub fn offer(&mut self, now: Timestamp, facts: ClientFacts<'_>) -> usize {
        self.expire_due(now);
        let running: Vec<HuntId> = self
            .hunts
            .values()
            .filter(|h| h.record.state == HuntState::Running)
            .map(|h| h.record.id.clone())
            .collect();
        running
            .iter()
            .filter(|id| matches!(self.offer_to(now, id, facts), Decision::Scheduled(_)))
            .count()
    }

    /// Decides whether one client takes part in one hunt, and schedules it if so.
    pub fn offer_to(&mut self, now: Timestamp, id: &HuntId, facts: ClientFacts<'_>) -> Decision {
        self.expire_one(now, id);
        let participants_max = self.limits.participants_max;
        let Some(h) = self.hunts.get_mut(id) else {
            return Decision::UnknownHunt;
        };
        if h.participants.contains_key(facts.id) {
            return Decision::AlreadyIn;
        }
        if h.record.state != HuntState::Running {
            return Decision::NotRunning(h.record.state);
        }
        let spec = &h.record.spec;
        if spec
            .os
            .as_deref()
            .is_some_and(|os| !os.eq_ignore_ascii_case(facts.os))
        {
            return Decision::WrongOs;
        }
        if let Some(l) = spec
            .include_labels
            .iter()
            .find(|l| !facts.labels.contains(*l))
        {
            return Decision::MissingLabel(l.clone());
        }
        if let Some(l) = spec
            .exclude_labels
            .iter()
            .find(|l| facts.labels.contains(*l))
        {
            return Decision::ExcludedLabel(l.clone());
        }
        if spec.client_limit.is_some_and(|n| h.stats.scheduled >= n) {
            return Decision::LimitReached;
        }
        if h.stats.scheduled >= participants_max {
            return Decision::Full;
        }
        h.participants
            .insert(facts.id.clone(), Participation::Scheduled);
        Participation::Scheduled.add_to(&mut h.stats);
        let flow = FlowId::for_hunt(id, facts.id);
        self.actions.push_back(HuntAction::Schedule {
            hunt: id.clone(),
            client: facts.id.clone(),
            flow: flow.clone(),
        });
        Decision::Scheduled(flow)
    }

    /// Counts a participant's flow outcome. Idempotent: the first outcome for a client is final.
    pub fn handle_outcome(
        &mut self,
        now: Timestamp,
        id: &HuntId,
        client: &ClientId,
        state: FinalState,
        rows: u64,
        uploaded_bytes: u64,
    ) -> OutcomeEffect {
        self.expire_one(now, id);
        let Some(h) = self.hunts.get_mut(id) else {
            return OutcomeEffect::NotParticipant;
        };
        let Some(p) = h.participants.get_mut(client) else {
            return OutcomeEffect::NotParticipant;
        };
        if *p != Participation::Scheduled {
            return OutcomeEffect::Duplicate;
        }
        *p = match state {
            FinalState::Completed => Participation::Completed {
                rows,
                uploaded_bytes,
            },
            FinalState::Error => Participation::Error {
                rows,
                uploaded_bytes,
            },
        };
        let new = *p;
        // Replace the Scheduled contribution with the outcome's.
        h.stats.scheduled -= 1;
        new.add_to(&mut h.stats);
        self.actions.push_back(HuntAction::Participant {
            hunt: id.clone(),
            client: client.clone(),
            participation: new,
        });
        let limit_done = h
            .record
            .spec
            .client_limit
            .is_some_and(|n| h.stats.scheduled >= n);
        if h.record.state == HuntState::Running && limit_done && h.all_finished() {
            h.record.state = HuntState::Complete;
            self.actions.push_back(HuntAction::Record(h.record.clone()));
        }
        debug_assert_eq!(h.stats, h.recount());
        OutcomeEffect::Counted
    }

    /// A [`HuntAction::Schedule`] could not be carried out: its records were refused (the datastore
    /// was busy: nothing was written), or its client already has as many tasks waiting as it may.
    /// The client is not a participant after all (stats no longer count it: a participant has a
    /// durable task, docs/architecture.md "Invariants"), and the shell is asked to offer it the hunt again
    /// `schedule_retry_ms` later ([`HuntAction::Offer`]). Ignored unless the client is a
    /// scheduled participant with no outcome.
    pub fn handle_schedule_failed(&mut self, at: Monotonic, id: &HuntId, client: &ClientId) {
        let Some(h) = self.hunts.get_mut(id) else {
            return;
        };
        if h.participants.get(client) != Some(&Participation::Scheduled) {
            return;
        }
        h.participants.remove(client);
        h.stats.scheduled -= 1;
        debug_assert_eq!(h.stats, h.recount());
        if (self.retries.len() as u64) < self.limits.participants_max {
            self.retries.insert((
                at.plus_ms(self.limits.schedule_retry_ms),
                id.clone(),
                client.clone(),
            ));
        }
    }

    /// A [`HuntAction::Participant`] could not be persisted (the datastore was busy: nothing was
    /// written): the participant is scheduled again in memory, as storage still says, so that the
    /// outcome counts when it comes again (the flow's completion is not recorded either, and the
    /// client resends its final status, or the minion its event). Without this the outcome would
    /// come back as a duplicate and never be written: the API would count a completion that no
    /// record backs, and lose it at the next restart (invariant 2). Ignored unless the client's
    /// participation is still `participation`.
    pub fn handle_outcome_failed(
        &mut self,
        id: &HuntId,
        client: &ClientId,
        participation: Participation,
    ) {
        let Some(h) = self.hunts.get_mut(id) else {
            return;
        };
        let Some(p) = h.participants.get_mut(client) else {
            return;
        };
        if *p != participation || participation == Participation::Scheduled {
            return;
        }
        *p = Participation::Scheduled;
        h.stats = h.recount();
        if h.record.state == HuntState::Complete && !h.all_finished() {
            // It completed with this outcome: running again until the outcome is recorded.
            h.record.state = HuntState::Running;
            self.actions.push_back(HuntAction::Record(h.record.clone()));
        }
    }

    /// Failed schedules waiting to be offered again.
    pub fn retries(&self) -> usize {
        self.retries.len()
    }

    fn expire_one(&mut self, now: Timestamp, id: &HuntId) {
        if let Some(h) = self.hunts.get_mut(id)
            && h.record.state == HuntState::Running
            && now >= h.record.spec.expires
        {
            h.record.state = HuntState::Expired;
            self.actions.push_back(HuntAction::Record(h.record.clone()));
        }
    }

    /// Expires running hunts whose time has come (`now`: a hunt expires at a wall-clock time the
    /// analyst named); asks for failed schedules to be offered again (`at`: their retry is a
    /// deadline, on the monotonic clock).
    pub fn handle_timeout(&mut self, now: Timestamp, at: Monotonic) {
        while let Some(first) = self.retries.first()
            && first.0 <= at
        {
            let (_, hunt, client) = self.retries.pop_first().expect("a first entry");
            if self
                .hunts
                .get(&hunt)
                .is_some_and(|h| h.record.state == HuntState::Running)
            {
                self.actions.push_back(HuntAction::Offer { hunt, client });
            }
        }
        self.expire_due(now);
    }

    fn expire_due(&mut self, now: Timestamp) {
        let due: Vec<HuntId> = self
            .hunts
            .values()
            .filter(|h| h.record.state == HuntState::Running && now >= h.record.spec.expires)
            .map(|h| h.record.id.clone())
            .collect();
        for id in due {
            self.expire_one(now, &id);
        }
    }

    /// The next expiry among running hunts (wall clock).
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.hunts
            .values()
            .filter(|h| h.record.state == HuntState::Running)
            .map(|h| h.record.spec.expires)
            .min()
    }

    /// The next failed schedule to offer again (monotonic clock).
    pub fn poll_retry(&self) -> Option<Monotonic> {
        self.retries.first().map(|r| r.0)
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<HuntAction> {
        self.actions.pop_front()
    }

    /// One hunt.
    pub fn get(&self, id: &HuntId) -> Option<&Hunt> {
        self.hunts.get(id)
    }

    /// Every hunt, in id order.
    pub fn list(&self) -> impl Iterator<Item = &Hunt> {
        self.hunts.values()
    }
}

#[cfg(test)]
mod tests;
