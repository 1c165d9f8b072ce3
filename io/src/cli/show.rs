//! How the analyst's commands show things as text (the `--json` forms are in `api_client`): times
//! as RFC 3339 (UTC, or the local zone with `--local-time`), lists as tables under a header of
//! column names, one object as a two-column record, and watches as a live progress line on a
//! terminal (one line per change otherwise). Text an agent sent is shown through
//! [`crate::text::printable`], so it cannot drive the terminal or forge a line.

use crate::cli::api_client::{hunt_state_name, state_name};
use crate::text::printable as p;
use comfy_table::{CellAlignment, Table, presets};
use std::io::{IsTerminal, Write};
use talon_proto::api;

/// How times are shown: RFC 3339 to the second, in UTC (`…Z`) or with the local zone's offset
/// at that instant (`--local-time`; daylight saving applied per instant, from the system's time
/// zone database).
pub struct Times {
    zone: Option<jiff::tz::TimeZone>,
}

impl Times {
    /// UTC.
    pub fn utc() -> Times {
        Times { zone: None }
    }

    /// The system's time zone (`TZ`, else `/etc/localtime`) when `local`, else UTC.
    pub fn new(local: bool) -> Result<Times, String> {
        if !local {
            return Ok(Times::utc());
        }
        let zone = jiff::tz::TimeZone::try_system().map_err(|e| {
            format!(
                "--local-time: cannot find this machine's time zone (TZ or /etc/localtime): {e}"
            )
        })?;
        Ok(Times { zone: Some(zone) })
    }

    /// A zone with a fixed offset from UTC (tests).
    #[cfg(test)]
    fn fixed(offset_hours: i8) -> Times {
        let offset = jiff::tz::Offset::from_hours(offset_hours).expect("a valid offset");
        Times {
            zone: Some(jiff::tz::TimeZone::fixed(offset)),
        }
    }

    /// `ms` since the Unix epoch as RFC 3339 to the second; 0 (not yet, never) as `-`.
    pub fn at(&self, ms: u64) -> String {
        if ms == 0 {
            return "-".into();
        }
        let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
        let shown = time::OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|utc| {
                let offset = match &self.zone {
                    None => time::UtcOffset::UTC,
                    Some(z) => {
                        let at = jiff::Timestamp::from_second(secs).ok()?;
                        time::UtcOffset::from_whole_seconds(z.to_offset(at).seconds()).ok()?
                    }
                };
                utc.to_offset(offset)
                    .format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
        // Beyond what RFC 3339 can write (year 10000 on, an offset with seconds): the number.
        shown.unwrap_or_else(|| format!("{ms} ms after the Unix epoch"))
    }
}

/// How a column's cells are aligned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// Rows under a header of column names, columns two spaces apart, no trailing spaces.
pub fn table(cols: &[(&str, Align)], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header(cols.iter().map(|(name, _)| *name).collect::<Vec<_>>());
    t.add_rows(rows);
    let last = cols.len().saturating_sub(1);
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i == last { 0 } else { 2 }));
        if cols.get(i).is_some_and(|(_, a)| *a == Align::Right) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.trim_fmt()
}

/// One object as `name  value` lines, the values aligned.
pub fn record<'a>(fields: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.add_rows(fields.into_iter().map(|(k, v)| vec![k.to_owned(), v]));
    for col in t.column_iter_mut() {
        col.set_padding((0, 2));
    }
    t.trim_fmt()
}

/// A flow as a record.
pub fn flow(f: &api::FlowSummary, t: &Times) -> String {
    let mut fields = vec![
        ("flow", f.flow_id.clone()),
        ("client", f.client_id.clone()),
        ("artifact", f.artifact.clone()),
        ("params", params(&f.params)),
        ("state", state_name(f.state).into()),
        ("created", t.at(f.created_unix_ms)),
        ("finished", t.at(f.finished_unix_ms)),
        ("rows", f.rows.to_string()),
        ("uploaded bytes", f.uploaded_bytes.to_string()),
    ];
    if !f.hunt_id.is_empty() {
        fields.push(("hunt", f.hunt_id.clone()));
    }
    if !f.error.is_empty() {
        fields.push(("error", p(&f.error).into_owned()));
    }
    record(fields)
}

/// Parameters as `name=value,...` (`-` for none), escaped; a custom artifact's compiled
/// definition is left out (`artifacts show` and `--json` show it).
fn params(all: &std::collections::BTreeMap<String, String>) -> String {
    let mut kv: Vec<_> = all
        .iter()
        .filter(|(k, _)| k.as_str() != talon_core::artifacts::DEFINITION_PARAM)
        .collect();
    kv.sort();
    if kv.is_empty() {
        return "-".to_owned();
    }
    let kv: Vec<String> = kv
        .into_iter()
        .map(|(k, v)| format!("{}={}", p(k), p(v)))
        .collect();
    kv.join(",")
}

/// A flow on one line (a watch's progress).
pub fn flow_line(f: &api::FlowSummary) -> String {
    format!(
        "flow {} {}: {}, {} rows, {} bytes uploaded",
        f.flow_id,
        f.artifact,
        state_name(f.state),
        f.rows,
        f.uploaded_bytes
    )
}

/// A hunt as a record.
pub fn hunt(h: &api::HuntSummary, t: &Times) -> String {
    let s = h.stats.unwrap_or_default();
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            p(&v.join(",")).into_owned()
        }
    };
    record([
        ("hunt", h.hunt_id.clone()),
        ("artifact", h.artifact.clone()),
        ("params", params(&h.params)),
        ("state", hunt_state_name(h.state).into()),
        ("description", p(&h.description).into_owned()),
        ("created", t.at(h.created_unix_ms)),
        ("expires", t.at(h.expires_unix_ms)),
        ("labels", list(&h.include_labels)),
        ("excluded labels", list(&h.exclude_labels)),
        ("os", if h.os.is_empty() { "any" } else { &h.os }.into()),
        (
            "client limit",
            match h.client_limit {
                0 => "none".into(),
                n => n.to_string(),
            },
        ),
        ("scheduled", s.scheduled.to_string()),
        ("completed", s.completed.to_string()),
        ("errors", s.errors.to_string()),
        ("rows", s.rows.to_string()),
        ("uploaded bytes", s.uploaded_bytes.to_string()),
    ])
}

/// A hunt on one line (a watch's progress; the progress adds reported of scheduled).
pub fn hunt_line(h: &api::HuntSummary) -> String {
    let s = h.stats.unwrap_or_default();
    format!(
        "hunt {} {}: {}, {} errors, {} rows, {} bytes uploaded",
        h.hunt_id,
        h.artifact,
        hunt_state_name(h.state),
        s.errors,
        s.rows,
        s.uploaded_bytes
    )
}

/// `hunt list`: newest first (as the API answers).
pub fn hunts(hs: &[api::HuntSummary], t: &Times) -> String {
    if hs.is_empty() {
        return "no hunts".into();
    }
    use Align::{Left, Right};
    let cols = [
        ("CREATED", Left),
        ("HUNT", Left),
        ("ARTIFACT", Left),
        ("STATE", Left),
        ("SCHEDULED", Right),
        ("COMPLETED", Right),
        ("ERRORS", Right),
        ("ROWS", Right),
        ("DESCRIPTION", Left),
    ];
    table(
        &cols,
        hs.iter().map(|h| {
            let s = h.stats.unwrap_or_default();
            vec![
                t.at(h.created_unix_ms),
                h.hunt_id.clone(),
                h.artifact.clone(),
                hunt_state_name(h.state).into(),
                s.scheduled.to_string(),
                s.completed.to_string(),
                s.errors.to_string(),
                s.rows.to_string(),
                p(&h.description).into_owned(),
            ]
        }),
    )
}

/// `flow list`: a client's flows, newest first.
pub fn flows(client: &str, fs: &[api::FlowSummary], t: &Times) -> String {
    if fs.is_empty() {
        return format!("client {client} has no flows");
    }
    use Align::{Left, Right};
    let cols = [
        ("CREATED", Left),
        ("FLOW", Left),
        ("ARTIFACT", Left),
        ("STATE", Left),
        ("ROWS", Right),
        ("BYTES", Right),
        ("HUNT", Left),
    ];
    table(
        &cols,
        fs.iter().map(|f| {
            vec![
                t.at(f.created_unix_ms),
                f.flow_id.clone(),
                f.artifact.clone(),
                state_name(f.state).into(),
                f.rows.to_string(),
                f.uploaded_bytes.to_string(),
                f.hunt_id.clone(),
            ]
        }),
    )
}

/// `flow uploads`.
pub fn uploads(flow: &str, ups: &[api::UploadInfo]) -> String {
    if ups.is_empty() {
        return format!("flow {flow} has no uploads (or has not completed yet)");
    }
    use Align::{Left, Right};
    let cols = [
        ("ID", Right),
        ("SIZE", Right),
        ("SHA-256", Left),
        ("NAME", Left),
    ];
    table(
        &cols,
        ups.iter().map(|u| {
            let sha = if u.error.is_empty() {
                u.sha256.clone()
            } else {
                format!("(failed: {})", p(&u.error))
            };
            vec![
                u.upload_id.to_string(),
                u.size.to_string(),
                sha,
                p(&u.name).into_owned(),
            ]
        }),
    )
}

/// `audit list`.
pub fn audit(entries: &[api::AuditEntry], t: &Times) -> String {
    if entries.is_empty() {
        return "the audit log is empty".into();
    }
    let cols = [
        ("TIME", Align::Left),
        ("USER", Align::Left),
        ("ACTION", Align::Left),
        ("TARGET", Align::Left),
        ("DETAIL", Align::Left),
    ];
    table(
        &cols,
        entries.iter().map(|e| {
            vec![
                t.at(e.time_unix_ms),
                p(&e.user).into_owned(),
                e.action.clone(),
                p(&e.target).into_owned(),
                p(&e.detail).into_owned(),
            ]
        }),
    )
}

/// `clients search`.
pub fn clients(r: &api::SearchResponse, query: &str, t: &Times) -> String {
    if r.clients.is_empty() {
        return format!("no client matches {}", p(&format!("{query:?}")));
    }
    let cols = [
        ("CLIENT", Align::Left),
        ("HOSTNAME", Align::Left),
        ("OS", Align::Left),
        ("STATE", Align::Left),
        ("LAST SEEN", Align::Left),
        ("NODE", Align::Left),
        ("LABELS", Align::Left),
    ];
    // Host facts come from the agent: shown escaped, never as terminal input.
    let mut out = table(
        &cols,
        r.clients.iter().map(|c| {
            vec![
                p(&c.client_id).into_owned(),
                p(&c.hostname).into_owned(),
                p(&c.os).into_owned(),
                if c.connected { "connected" } else { "offline" }.into(),
                t.at(c.last_seen_unix_ms),
                p(&c.node).into_owned(),
                p(&c.labels.join(",")).into_owned(),
            ]
        }),
    );
    if r.truncated {
        out.push_str("\n(more matched; narrow the query)");
    }
    out
}

/// A duration in milliseconds as whole seconds (`12s`), or minutes and seconds past a minute.
fn seconds(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// `cluster status`.
pub fn cluster(c: &api::ClusterStatus, t: &Times) -> String {
    let mut out = format!("master {}", c.master);
    for f in &c.volume_failures {
        out.push_str(&format!(
            "\nshared volume failing ({}) since {}: {}",
            f.store,
            t.at(f.since_unix_ms),
            f.error
        ));
    }
    if c.minions.is_empty() {
        out.push_str("\nno minion has replicated to this master");
        return out;
    }
    let cols = [
        ("MINION", Align::Left),
        ("REPLICATION", Align::Left),
        ("EPOCH", Align::Right),
        ("APPLIED", Align::Right),
        ("BACKLOG", Align::Right),
        ("LAG", Align::Right),
    ];
    let rows = c.minions.iter().map(|m| {
        let (backlog, lag) = match m.backlog_events {
            None => ("-".into(), "-".into()),
            Some(0) => ("0".into(), "0s".into()),
            Some(n) => (n.to_string(), seconds(m.lag_ms)),
        };
        vec![
            m.node.clone(),
            if m.connected { "connected" } else { "down" }.into(),
            m.epoch.to_string(),
            m.applied.to_string(),
            backlog,
            lag,
        ]
    });
    out.push('\n');
    out.push_str(&table(&cols, rows));
    out
}

/// `artifacts tables`: every endpoint table with its platforms, the columns a query must constrain,
/// and its columns.
pub fn tables(json: bool) -> String {
    let ts = crate::query::tables();
    if json {
        let v: Vec<serde_json::Value> = ts
            .iter()
            .map(|t| {
                let cols: Vec<serde_json::Value> = t
                    .columns
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "type": c.ty.sql(),
                            "like": c.pattern,
                            "description": c.description,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": t.name,
                    "description": t.description,
                    "platforms": t.platforms,
                    "required": t.required,
                    "columns": cols,
                })
            })
            .collect();
        return serde_json::to_string_pretty(&v).expect("JSON values serialise");
    }
    let mut out = Vec::new();
    for t in ts {
        let mut head = format!("{} ({}): {}", t.name, t.platforms.join(", "), t.description);
        if !t.required.is_empty() {
            head.push_str(&format!(
                "\n  a query must constrain {}",
                t.required.join(" or ")
            ));
        }
        let cols = [
            ("  COLUMN", Align::Left),
            ("TYPE", Align::Left),
            ("DESCRIPTION", Align::Left),
        ];
        let rows = t.columns.iter().map(|c| {
            let like = if c.pattern {
                " (takes LIKE patterns)"
            } else {
                ""
            };
            vec![
                format!("  {}", c.name),
                c.ty.sql().to_owned(),
                format!("{}{like}", c.description),
            ]
        });
        out.push(format!("{head}\n{}", table(&cols, rows)));
    }
    out.join("\n\n")
}

/// How a watch shows each change: one JSON object per line on stdout (`--json`); on a terminal a
/// progress line on stderr redrawn in place (a bar for a hunt: reported of scheduled); otherwise
/// one line per change on stderr.
pub struct Progress {
    json: bool,
    /// A count of done of all comes with each state (a hunt's reported of scheduled).
    counted: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// For a watch; `counted`: each state comes with a count of done of all, shown as a bar
    /// (else a spinner).
    pub fn new(json: bool, counted: bool) -> Progress {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let (bar, template) = if counted {
                (
                    indicatif::ProgressBar::new(0),
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
            } else {
                (
                    indicatif::ProgressBar::new_spinner(),
                    "{spinner} [{elapsed_precise}] {msg}",
                )
            };
            let style = indicatif::ProgressStyle::with_template(template)
                .expect("the template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        Progress { json, counted, bar }
    }

    /// Shows one state: `v` as JSON, else `text` with the count `done` of `of`.
    pub fn show(
        &mut self,
        v: &serde_json::Value,
        text: String,
        (done, of): (u64, u64),
    ) -> Result<(), String> {
        if self.json {
            let mut o = std::io::stdout().lock();
            return writeln!(o, "{v}")
                .and_then(|()| o.flush())
                .map_err(|e| format!("cannot write output: {e}"));
        }
        match &self.bar {
            Some(bar) => {
                bar.set_length(of);
                bar.set_position(done);
                bar.set_message(text);
            }
            None if self.counted => eprintln!("{text} ({done}/{of} reported)"),
            None => eprintln!("{text}"),
        }
        Ok(())
    }

    /// Leaves the last state on the terminal.
    pub fn end(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc_or_the_zone_of_the_instant() {
        // 2026-12-06T05:33:10.789Z: the milliseconds are dropped, not rounded.
        let ms = 1_796_535_190_789;
        assert_eq!(Times::utc().at(ms), "2026-12-06T05:33:10Z");
        assert_eq!(Times::fixed(1).at(ms), "2026-12-06T06:33:10+01:00");
        assert_eq!(Times::fixed(-5).at(ms), "2026-12-06T00:33:10-05:00");
        assert_eq!(Times::utc().at(0), "-");
        // Daylight saving is the instant's, not today's: Berlin is +01:00 in winter, +02:00 in
        // summer. (Skipped where the machine has no time zone database.)
        if let Ok(berlin) = jiff::tz::TimeZone::get("Europe/Berlin") {
            let t = Times { zone: Some(berlin) };
            assert_eq!(t.at(1_782_986_400_000), "2026-07-02T12:00:00+02:00");
            assert_eq!(t.at(ms), "2026-12-06T06:33:10+01:00");
        }
        // Beyond RFC 3339's four-digit year: the number, not a panic.
        assert!(
            Times::utc()
                .at(u64::MAX)
                .contains("ms after the Unix epoch")
        );
    }

    #[test]
    fn tables_have_a_header_aligned_columns_and_no_trailing_space() {
        let t = table(
            &[
                ("NAME", Align::Left),
                ("ROWS", Align::Right),
                ("NOTE", Align::Left),
            ],
            vec![
                vec!["a".into(), "5".into(), "".into()],
                vec!["longer".into(), "12345".into(), "東京".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME     ROWS  NOTE\n\
             a           5\n\
             longer  12345  東京"
        );
        assert_eq!(
            record([("state", "running".into()), ("uploaded bytes", "7".into())]),
            "state           running\nuploaded bytes  7"
        );
    }

    #[test]
    fn agent_text_in_a_table_cannot_forge_a_row() {
        let r = api::SearchResponse {
            clients: vec![api::ClientSummary {
                client_id: "C.1".into(),
                hostname: "pc\nC.2  forged\u{1b}[2J".into(),
                ..Default::default()
            }],
            truncated: false,
            total: 1,
        };
        let shown = clients(&r, "all", &Times::utc());
        assert_eq!(shown.lines().count(), 2, "{shown}");
        assert!(shown.contains("pc\\u{a}C.2  forged\\u{1b}[2J"), "{shown}");
    }
}
