//! Client event monitoring on every node (docs/events.md): the client event table each node
//! keeps and tells its clients, and the event batches they send — stored through the node's
//! write-behind buffer under a name derived from the batch (so a resend is stored once) and
//! acknowledged twice, as flow messages are (core `node::intake`).

use super::*;
use serde::{Deserialize, Serialize};
use talon_core::events::{Assignment, EventKey};

/// One entry of the client event table as stored (`paths::client_event`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct EntryJson {
    /// Whose clients: a label, or empty for all.
    pub label: String,
    /// The event artifact.
    pub artifact: String,
    /// Its parameters, validated and with defaults (a custom artifact's definition in
    /// `_artifact`).
    pub params: BTreeMap<String, String>,
    /// Who set it, and when (ms since the epoch): for `events list`.
    #[serde(default)]
    pub set_by: String,
    #[serde(default)]
    pub set_ms: u64,
}

impl EntryJson {
    pub(crate) fn assignment(&self) -> Assignment {
        Assignment {
            label: self.label.clone(),
            artifact: self.artifact.clone(),
            params: self.params.clone(),
        }
    }
}

/// The client event table as stored: every entry, in key order, read concurrently
/// ([`super::load::get_many`]: each read may be a volume round trip). At most
/// `events::TABLE_ENTRIES_MAX` are read (the master refuses more).
pub(crate) async fn load_table(ds: &Meta) -> Result<Vec<EntryJson>, ReadError> {
    let (keys, _) = ds.list(paths::CLIENT_EVENTS).await?;
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|k| k.ends_with(".json"))
        .take(talon_core::events::TABLE_ENTRIES_MAX)
        .collect();
    let mut out = Vec::with_capacity(keys.len());
    // A key without a value was removed since the listing.
    for (key, value) in super::load::get_many(ds, keys).await? {
        let Some(value) = value else { continue };
        match super::load::parse_value::<EntryJson>(&key, &value) {
            Ok(e) => out.push(e),
            Err(e) => {
                tracing::warn!(%key, error = %e, "a client event table entry is malformed; left out")
            }
        }
    }
    Ok(out)
}

/// What a client is told of the table: the entries it runs.
fn table_for(table: &[Assignment], labels: &BTreeSet<String>) -> comms::EventTable {
    let (chosen, left) = talon_core::events::for_client(table, labels);
    if left > 0 {
        tracing::warn!(
            left,
            max = talon_core::events::PER_CLIENT_MAX,
            "a client is assigned more event artifacts than it runs; the rest are left out"
        );
    }
    comms::EventTable {
        artifacts: chosen
            .into_iter()
            .map(|a| comms::EventAssignment {
                artifact: a.artifact.clone(),
                params: a.params.clone().into_iter().collect(),
            })
            .collect(),
    }
}

/// A client's labels, from its record (none if it has none yet).
async fn labels_of(ds: &Meta, client: &ClientId) -> Result<BTreeSet<String>, ReadError> {
    let key = paths::client_record(client);
    Ok(load_json::<ClientJson>(ds, &key)
        .await?
        .map(|r| r.labels)
        .unwrap_or_default())
}

impl Frontend {
    /// Reads the client event table again (at start, and when it changed), then tells every
    /// client connected here what it runs.
    pub(super) fn reload_event_table(&self) {
        self.reload_event_table_after(std::time::Duration::ZERO);
    }

    /// [`Frontend::reload_event_table`] after `delay` (a failed read is tried again).
    fn reload_event_table_after(&self, delay: std::time::Duration) {
        let ds = self.datastore.clone();
        self.spawn_then(
            async move {
                tokio::time::sleep(delay).await;
                load_table(&ds).await.map_err(|e| e.to_string())
            },
            |table| Msg::EventTable { table },
        );
    }

    /// Tells `client` (connected here) the event artifacts it runs: at once when no entry names
    /// a label, else once its labels are read.
    pub(super) fn send_event_table(&self, client: &ClientId) {
        if !self.event_table_loaded {
            return; // Told when it is read.
        }
        let labelled = self
            .event_table
            .iter()
            .any(|a| a.label != talon_core::events::ALL_CLIENTS);
        if !labelled {
            return self.send_event_table_with(client, BTreeSet::new());
        }
        let (ds, client, table) = (
            self.datastore.clone(),
            client.clone(),
            self.event_table.clone(),
        );
        let work = async move {
            if let Meta::Remote(r) = &ds {
                // Labels change on the master: read them afresh.
                r.invalidate(&paths::client_record(&client));
            }
            match labels_of(&ds, &client).await {
                Ok(labels) => Some((client, table_for(&table, &labels))),
                Err(why) => {
                    tracing::warn!(error = %why, "cannot read a client's labels; its event table is sent when it reconnects");
                    None
                }
            }
        };
        self.spawn_then(work, |told| Msg::EventTableFor { told });
    }

    /// Tells `client`, if connected here, the event artifacts a client with `labels` runs.
    pub(super) fn send_event_table_with(&self, client: &ClientId, labels: BTreeSet<String>) {
        if self.event_table_loaded && self.conns.contains_key(client) {
            let table = table_for(&self.event_table, &labels);
            self.push(client, server_message::Kind::EventTable(table));
        }
    }

    /// An input about client events.
    pub(super) fn handle_events(&mut self, msg: Msg) {
        match msg {
            Msg::Event { client, key, raw } => self.event_batch(client, key, raw),
            Msg::EventStored { key, ok } => self.intake.handle_event_stored(&key, ok),
            Msg::EventTable { table: Ok(entries) } => {
                self.event_table = Arc::new(entries.iter().map(EntryJson::assignment).collect());
                self.event_table_loaded = true;
                tracing::info!(
                    entries = self.event_table.len(),
                    "client event table loaded"
                );
                let clients: Vec<ClientId> = self.conns.keys().cloned().collect();
                for c in clients {
                    self.send_event_table(&c);
                }
            }
            Msg::EventTable { table: Err(why) } => {
                tracing::warn!(error = %why, "cannot read the client event table; trying again in 5 s");
                self.reload_event_table_after(std::time::Duration::from_secs(5));
            }
            Msg::LabelsChanged { client } if self.conns.contains_key(&client) => {
                self.send_event_table(&client);
            }
            Msg::EventTableFor {
                told: Some((client, table)),
            } => {
                self.push(&client, server_message::Kind::EventTable(table));
            }
            _ => {}
        }
    }

    /// A client's event batch: stored if its artifact is in the client event table and the node
    /// is not storing too many; else refused (the agent resends a busy one).
    fn event_batch(&mut self, client: ClientId, key: EventKey, raw: Bytes) {
        let refuse = |fe: &Self, code: comms::ErrorCode, message: String| {
            let m = comms::ServerError {
                code: code as i32,
                message,
                flow_id: String::new(),
                seq: key.seq,
            };
            fe.push(&client, server_message::Kind::Error(m));
        };
        if !self.event_table_loaded {
            let why = "the client event table is not read yet; send the batch again".to_owned();
            return refuse(self, comms::ErrorCode::Busy, why);
        }
        if !self.event_table.iter().any(|a| a.artifact == key.artifact) {
            let why = format!(
                "event artifact {} is not in the client event table; its batch is not stored",
                key.artifact
            );
            return refuse(self, comms::ErrorCode::InvalidMessage, why);
        }
        match self.intake.handle_event(key.clone()) {
            Ok(()) => {
                self.raw_events.insert(key, raw);
            }
            Err(busy) => refuse(self, comms::ErrorCode::Busy, busy.to_string()),
        }
    }

    /// Stores an event batch in the write-behind buffer in the background, then reports
    /// `EventStored`.
    pub(super) fn store_event(&mut self, key: EventKey) {
        let Some(raw) = self.raw_events.remove(&key) else {
            // The bytes are gone (cannot happen: kept right after handle_event).
            self.intake.handle_event_stored(&key, false);
            return;
        };
        let fs = self.filestore.clone();
        self.spawn_then(
            async move {
                let ok = match fs.store(&paths::event_batch(&key), raw).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(client = %key.client, artifact = %key.artifact, error = %e, "cannot store an event batch; the client resends it");
                        false
                    }
                };
                (key, ok)
            },
            |(key, ok)| Msg::EventStored { key, ok },
        );
    }

    /// Tells a client one of its event batches is stored (`settled`: on the shared volume).
    pub(super) fn ack_event(&self, key: EventKey, settled: bool) {
        let ack = comms::EventAck {
            artifact: key.artifact,
            stream: key.stream,
            seq: key.seq,
            settled,
        };
        self.push(&key.client, server_message::Kind::EventAck(ack));
    }
}

/// What `events list` shows of an entry: without a custom artifact's compiled definition.
pub(super) fn entry_view(e: EntryJson) -> api::ClientEventEntry {
    api::ClientEventEntry {
        artifact: e.artifact,
        label: e.label,
        params: e
            .params
            .into_iter()
            .filter(|(k, _)| k != talon_core::artifacts::DEFINITION_PARAM)
            .collect(),
        set_by: e.set_by,
        set_ms: e.set_ms,
    }
}

/// Sets (or removes) an entry of the client event table through the master's core, then tells
/// every node (its own clients, and the minions' by broadcast) to read the table again.
pub(super) async fn set_entry(
    node: &Node,
    user: &str,
    r: api::SetClientEventRequest,
) -> Result<api::ClientEventEntry, Status> {
    let label = if r.label.trim().is_empty() {
        talon_core::events::ALL_CLIENTS.to_owned()
    } else {
        talon_core::registry::normalize_label(&r.label)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
    };
    if !talon_core::artifacts::artifact_name_ok(&r.artifact) {
        return Err(Status::invalid_argument(format!(
            "{:?} is not an artifact name",
            r.artifact.chars().take(64).collect::<String>()
        )));
    }
    let key = paths::client_event(&label, &r.artifact);
    let existing = node.datastore.get(&key).await.map_err(|e| e.status())?;
    let whose = if label.is_empty() {
        "every client".to_owned()
    } else {
        format!("label {label}")
    };
    let (entry, view) = if r.remove {
        if existing.is_none() {
            return Err(Status::not_found(format!(
                "{} is not set for {whose} (see `talon events list`)",
                r.artifact
            )));
        }
        (
            None,
            EntryJson {
                label: label.clone(),
                artifact: r.artifact.clone(),
                params: BTreeMap::new(),
                set_by: user.to_owned(),
                set_ms: node.clock.now().as_ms(),
            },
        )
    } else {
        let given = r.params.into_iter().collect();
        let (_, params, _) =
            super::repository::prepare(&node.datastore, &r.artifact, &given, true).await?;
        if existing.is_none() {
            let (keys, _) = node
                .datastore
                .list(paths::CLIENT_EVENTS)
                .await
                .map_err(|e| e.status())?;
            if keys.len() >= talon_core::events::TABLE_ENTRIES_MAX {
                return Err(Status::resource_exhausted(format!(
                    "the client event table holds {} entries, its bound; unset one first",
                    talon_core::events::TABLE_ENTRIES_MAX
                )));
            }
        }
        let e = EntryJson {
            label: label.clone(),
            artifact: r.artifact.clone(),
            params,
            set_by: user.to_owned(),
            set_ms: node.clock.now().as_ms(),
        };
        let json = serde_json::to_string(&e).map_err(|e| Status::internal(e.to_string()))?;
        (Some(json), e)
    };
    let detail = entry_view(view.clone())
        .params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    let req = CoreRequest::SetClientEvent {
        label,
        artifact: r.artifact.clone(),
        entry,
        detail,
    };
    match node.request(user, req).await? {
        Answer::ClientEventSet => {
            tracing::info!(artifact = %r.artifact, whose = %whose, remove = r.remove, %user, "client event table changed");
            node.datastore_changed(key, 0).await;
            Ok(entry_view(view))
        }
        a => Err(Status::internal(format!("unexpected answer {a:?}"))),
    }
}

/// A stream of stored event batches.
pub(super) type EventPages = tokio_stream::wrappers::ReceiverStream<Result<api::EventPage, Status>>;

/// Days one `GetEvents` may span.
pub const EVENT_DAYS_MAX: u64 = 366;
/// How often a followed day is read again for new batches.
pub const FOLLOW_POLL_MS: u64 = 1000;

/// A day (ms).
const DAY_MS: u64 = 86_400_000;

/// The UTC days from `since` to `until` (inclusive), oldest first.
fn days(since: Timestamp, until: Timestamp) -> Vec<String> {
    let (first, last) = (since.as_ms() / DAY_MS, until.as_ms() / DAY_MS);
    (first..=last)
        .map(|d| Timestamp(d * DAY_MS).utc_day())
        .collect()
}

/// Whether a batch made at `t` is shown: from `since`, until `until` — or, when following, with
/// no end.
fn in_window(t: Timestamp, since: Timestamp, until: Timestamp, follow: bool) -> bool {
    t >= since && (follow || t <= until)
}

fn check_artifact_name(name: &str) -> Result<(), Status> {
    if talon_core::artifacts::artifact_name_ok(name) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "{:?} is not an artifact name",
        name.chars().take(64).collect::<String>()
    )))
}

/// A read's window: from `since_ms` until `until_ms` (0: `now`), and its UTC days; refused if it
/// ends before it starts or spans more than [`EVENT_DAYS_MAX`] days.
fn window(
    now: Timestamp,
    since_ms: u64,
    until_ms: u64,
) -> Result<(Timestamp, Timestamp, Vec<String>), Status> {
    let since = Timestamp(since_ms);
    let until = if until_ms == 0 {
        now
    } else {
        Timestamp(until_ms)
    };
    if since > until {
        return Err(Status::invalid_argument("--since is after --until"));
    }
    let all = days(since, until);
    if all.len() as u64 > EVENT_DAYS_MAX {
        return Err(Status::invalid_argument(format!(
            "{} days asked for; at most {EVENT_DAYS_MAX} at once",
            all.len()
        )));
    }
    Ok((since, until, all))
}

/// A client's stored batches of an event artifact between two times, streamed (`GetEvents`).
pub(super) fn get_events(node: &Node, r: api::GetEventsRequest) -> Result<EventPages, Status> {
    let client =
        ClientId::parse(&r.client_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    check_artifact_name(&r.artifact)?;
    let now = node.clock.now();
    let since_ms = match r.since_ms {
        0 => now.as_ms() - now.as_ms() % DAY_MS,
        t => t,
    };
    let (since, until, all) = window(now, since_ms, r.until_ms)?;
    let (tx, rx) = mpsc::channel(16);
    let (volume, clock) = (node.filestore.volume().clone(), node.clock.clone());
    let follow = r.follow && r.until_ms == 0;
    tokio::spawn(async move {
        let (artifact, client_id) = (r.artifact, client.to_string());
        let page = |value: Bytes| -> Option<api::EventPage> {
            let b = comms::EventBatch::decode(value).ok()?;
            let t = Timestamp(b.time_unix_ms);
            in_window(t, since, until, follow).then(|| api::EventPage {
                client_id: client_id.clone(),
                artifact: artifact.clone(),
                stream: b.stream,
                seq: b.seq,
                time_ms: b.time_unix_ms,
                rows: b.rows,
                dropped: b.dropped,
            })
        };
        let mut readers: Vec<(String, crate::storage::events::DayReader)> = all
            .iter()
            .map(|d| {
                let dir = paths::events_day(&client, &artifact, d);
                (d.clone(), crate::storage::events::DayReader::new(&dir))
            })
            .collect();
        loop {
            for (_, reader) in &mut readers {
                let mut pages = Vec::new();
                let r = reader
                    .read_new(&volume, &mut |(_, v)| {
                        if let Some(p) = page(v) {
                            pages.push(p);
                        }
                        true
                    })
                    .await;
                for p in pages {
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
                if let Err(e) = r {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "cannot read the stored events: {e}"
                        ))))
                        .await;
                    return;
                }
            }
            if !follow {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(FOLLOW_POLL_MS)) => {}
            }
            // Following: today's day, once it begins, is read too; days before it are done.
            let today = clock.now().utc_day();
            if readers.last().is_some_and(|(d, _)| *d != today) {
                let dir = paths::events_day(&client, &artifact, &today);
                readers = vec![(today, crate::storage::events::DayReader::new(&dir))];
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// How often the master deletes event days past retention.
pub const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The master's retention of client events (`Datastore.events_retention_days` = `days`): at start
/// and then hourly, deletes every event day before the `days` most recent UTC days (today counts)
/// from the filestore. A day's batches still in a frontend's write-behind buffer (an agent that
/// sent old batches late) make that day's files again; the next pass deletes them.
pub(super) async fn retention(
    volume: crate::storage::volume::SharedVolume,
    clock: Arc<dyn Clock>,
    days: u64,
) {
    loop {
        let today = clock.now().as_ms() / DAY_MS;
        let first_kept = Timestamp(today.saturating_sub(days - 1) * DAY_MS).utc_day();
        match crate::storage::segments::delete_event_days_before(&volume, &first_kept).await {
            Ok(gone) if gone.is_empty() => {}
            Ok(gone) => {
                tracing::info!(days = ?gone, kept_from = %first_kept, "client event days past retention deleted")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot delete client event days past retention; trying again in an hour")
            }
        }
        tokio::time::sleep(RETENTION_EVERY).await;
    }
}

/// Rows one `SearchEvents` returns when it names no limit.
pub const SEARCH_ROWS_DEFAULT: u64 = 10_000;
/// Rows one `SearchEvents` returns at most.
pub const SEARCH_ROWS_MAX: u64 = 1_000_000;
/// `where` conditions one search takes at most.
pub const SEARCH_WHERE_MAX: usize = 16;

/// `COLUMN=VALUE` → (column, value); the column a name of letters, digits and `_`.
fn parse_where(w: &str) -> Result<(String, String), Status> {
    let refuse = || {
        Status::invalid_argument(format!(
            "--where {:?}: expected COLUMN=VALUE (a column of the artifact's rows)",
            w.chars().take(128).collect::<String>()
        ))
    };
    let (c, v) = w.split_once('=').ok_or_else(refuse)?;
    let c = c.trim();
    if c.is_empty() || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
        return Err(refuse());
    }
    Ok((c.to_owned(), v.to_owned()))
}

/// Whether a stored row (a JSON object) matches every condition: a string column equals the
/// value as it is; any other column equals the value read as JSON (`42`, `true`).
fn row_matches(row: &[u8], conds: &[(String, String)]) -> bool {
    if conds.is_empty() {
        return true;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(row) else {
        return false;
    };
    conds.iter().all(|(c, want)| match v.get(c) {
        Some(serde_json::Value::String(s)) => s == want,
        Some(other) => serde_json::from_str::<serde_json::Value>(want).is_ok_and(|w| w == *other),
        None => false,
    })
}

/// An event artifact's stored batches across clients (those with `label`, if named) between two
/// times, only the rows matching every `where`, at most `limit` rows, streamed (`SearchEvents`):
/// by day, then client, then stream and number. One pass over the segment index files per day
/// finds every client's runs; a client's labels are read once per search, only for clients with
/// batches in the window.
pub(super) fn search_events(
    node: &Node,
    r: api::SearchEventsRequest,
) -> Result<EventPages, Status> {
    check_artifact_name(&r.artifact)?;
    if r.since_ms == 0 {
        return Err(Status::invalid_argument(
            "a search needs --since (a time, a UTC day, or a time ago such as 2h)",
        ));
    }
    let (since, until, all) = window(node.clock.now(), r.since_ms, r.until_ms)?;
    if r.r#where.len() > SEARCH_WHERE_MAX {
        return Err(Status::invalid_argument(format!(
            "{} --where conditions; at most {SEARCH_WHERE_MAX}",
            r.r#where.len()
        )));
    }
    let conds = r
        .r#where
        .iter()
        .map(|w| parse_where(w))
        .collect::<Result<Vec<_>, _>>()?;
    let limit = match r.limit {
        0 => SEARCH_ROWS_DEFAULT,
        n if n > SEARCH_ROWS_MAX => {
            return Err(Status::invalid_argument(format!(
                "--limit {n}: at most {SEARCH_ROWS_MAX}"
            )));
        }
        n => n,
    };
    let (tx, rx) = mpsc::channel(16);
    let (volume, ds) = (node.filestore.volume().clone(), node.datastore.clone());
    tokio::spawn(async move {
        let fail = |e: String| {
            Err(Status::unavailable(format!(
                "cannot read the stored events: {e}"
            )))
        };
        let mut left = limit;
        // Whether each client read so far has the label: read once per search, not per day (at
        // most one entry per client with events in the window).
        let mut labelled: BTreeMap<ClientId, bool> = BTreeMap::new();
        for day in all {
            let suffix = format!("/events/{}/{day}", r.artifact);
            let wanted = |d: &str| {
                d.starts_with("clients/") && d.ends_with(&suffix) && paths::is_events_dir(d)
            };
            let seg_dir = format!("{}/{day}", crate::storage::segments::EVENT_SEGMENTS_DIR);
            let found = match crate::storage::segments::index_runs_where(&volume, &seg_dir, &wanted)
                .await
            {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(fail(e.to_string())).await;
                    return;
                }
            };
            let mut by_dir: BTreeMap<String, Vec<crate::storage::segments::RunRef>> =
                BTreeMap::new();
            for (dir, run) in found {
                by_dir.entry(dir).or_default().push(run);
            }
            for (dir, runs) in by_dir {
                let Some(client) = dir.split('/').nth(1).and_then(|c| ClientId::parse(c).ok())
                else {
                    continue;
                };
                if !r.label.is_empty() {
                    let has = match labelled.get(&client) {
                        Some(has) => *has,
                        None => match labels_of(&ds, &client).await {
                            Ok(labels) => *labelled
                                .entry(client.clone())
                                .or_insert(labels.contains(&r.label)),
                            Err(e) => {
                                let _ = tx.send(fail(e.to_string())).await;
                                return;
                            }
                        },
                    };
                    if !has {
                        continue;
                    }
                }
                let mut pages = Vec::new();
                let mut reader = crate::storage::events::DayReader::new(&dir);
                let read = reader
                    .read_runs(&volume, runs, &mut |(_, v)| {
                        let Ok(b) = comms::EventBatch::decode(v) else {
                            return true;
                        };
                        if !in_window(Timestamp(b.time_unix_ms), since, until, false) {
                            return true;
                        }
                        let rows: Vec<Bytes> = b
                            .rows
                            .into_iter()
                            .filter(|row| row_matches(row, &conds))
                            .take(usize::try_from(left).unwrap_or(usize::MAX))
                            .collect();
                        if rows.is_empty() {
                            return true;
                        }
                        left -= rows.len() as u64;
                        pages.push(api::EventPage {
                            client_id: client.to_string(),
                            artifact: b.artifact,
                            stream: b.stream,
                            seq: b.seq,
                            time_ms: b.time_unix_ms,
                            rows,
                            dropped: b.dropped,
                        });
                        left > 0
                    })
                    .await;
                for p in pages {
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
                if let Err(e) = read {
                    let _ = tx.send(fail(e.to_string())).await;
                    return;
                }
                if left == 0 {
                    return;
                }
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A condition is COLUMN=VALUE, refused otherwise naming it; a row matches when every
    /// condition's column, as text, equals the value.
    #[test]
    fn search_conditions_parse_and_match() {
        assert_eq!(
            parse_where("name=sshd").unwrap(),
            ("name".to_owned(), "sshd".to_owned())
        );
        assert_eq!(parse_where("path=/a=b").unwrap().1, "/a=b");
        for bad in ["name", "=x", "na me=x", "a;b=1"] {
            let e = parse_where(bad).unwrap_err();
            assert!(e.message().contains("COLUMN=VALUE"), "{bad}: {e}");
        }
        let row = br#"{"name":"sshd","pid":42,"root":true}"#;
        let c = |w: &[&str]| -> Vec<(String, String)> {
            w.iter().map(|w| parse_where(w).unwrap()).collect()
        };
        assert!(row_matches(row, &c(&[])));
        assert!(row_matches(row, &c(&["name=sshd", "pid=42", "root=true"])));
        assert!(!row_matches(row, &c(&["name=ssh"])));
        assert!(!row_matches(row, &c(&["pid=42", "user=root"])));
        assert!(!row_matches(b"not json", &c(&["name=sshd"])));
    }

    /// `--since` holds when following too (a followed day's earlier batches are not shown);
    /// `--until` ends the window unless following.
    #[test]
    fn the_window_starts_at_since_also_when_following() {
        let (since, until) = (Timestamp(1_000), Timestamp(2_000));
        for follow in [false, true] {
            assert!(!in_window(Timestamp(999), since, until, follow));
            assert!(in_window(Timestamp(1_000), since, until, follow));
            assert!(in_window(Timestamp(2_000), since, until, follow));
        }
        assert!(!in_window(Timestamp(2_001), since, until, false));
        assert!(in_window(Timestamp(2_001), since, until, true));
        assert_eq!(days(since, until), ["1970-01-01"]);
        // A window is refused if it ends before it starts or spans too many days.
        let now = Timestamp(400 * DAY_MS);
        assert_eq!(window(now, 100 * DAY_MS, 0).unwrap().1, now);
        let e = window(now, 2_000, 1_000).unwrap_err();
        assert!(e.message().contains("after --until"), "{e}");
        let e = window(now, 1_000, 0).map(|w| w.2.len());
        assert!(e.unwrap_err().message().contains("at most 366"));
        assert_eq!(window(now, 35 * DAY_MS, 0).unwrap().2.len(), 366);
    }
}
