//! `talon events`: the client event table (which event artifacts run where) and the events
//! clients sent (docs/events.md).

use super::api_client::Api;
use super::show::Times;
use clap::Subcommand;
use talon_proto::api;

/// `talon events ...`.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Run an event artifact on every client, or on the clients with a label (replaces the
    /// entry for that label and artifact). Connected clients start it within seconds.
    Set {
        /// The event artifact (`talon artifacts list` shows each one's type).
        artifact: String,
        /// Only clients with this label (default: every client).
        #[arg(long)]
        label: Option<String>,
        /// A parameter, `name=value`; repeat for several.
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        /// Print the entry as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop running an event artifact on every client (or on the clients with a label).
    Unset {
        /// The event artifact.
        artifact: String,
        /// The entry for this label (default: the entry for every client).
        #[arg(long)]
        label: Option<String>,
        /// Print `{"unset": ARTIFACT, "label": LABEL}`.
        #[arg(long)]
        json: bool,
    },
    /// The client event table.
    List {
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// A client's events of one event artifact, oldest first: one line per event, its time and
    /// its row.
    Show {
        /// The client.
        client: String,
        /// The event artifact.
        artifact: String,
        /// From: RFC 3339 (`2026-12-06T10:00:00Z`), a UTC day (`2026-12-06`), or a time ago
        /// (`30s`, `10m`, `2h`, `1d`). Default: the start of today (UTC).
        #[arg(long)]
        since: Option<String>,
        /// Until (as --since). Default: now.
        #[arg(long, conflicts_with = "follow")]
        until: Option<String>,
        /// Keep going: print events as they are stored, until interrupted.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line: the row with `_time_ms`, `_stream`, `_seq` and `_dropped`.
        #[arg(long)]
        json: bool,
    },
    /// Events of one event artifact across clients, by day, then client: one line per event,
    /// its time, its client and its row.
    Search {
        /// The event artifact.
        artifact: String,
        /// From (required): RFC 3339, a UTC day, or a time ago (`30s`, `10m`, `2h`, `1d`).
        #[arg(long)]
        since: String,
        /// Until (as --since). Default: now.
        #[arg(long)]
        until: Option<String>,
        /// Only clients with this label.
        #[arg(long)]
        label: Option<String>,
        /// Only rows whose column, as text, equals the value: `COLUMN=VALUE`; repeat for
        /// several (all must hold).
        #[arg(long = "where", value_name = "COLUMN=VALUE")]
        wheres: Vec<String>,
        /// Rows at most (default 10,000; at most 1,000,000).
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON object per line: the row with `_client`, `_time_ms`, `_stream`, `_seq` and
        /// `_dropped`.
        #[arg(long)]
        json: bool,
    },
}

/// The lines of a page of stored events: per row, its batch's time (and with `client`, the
/// client) and the row; with `json`, the row with `_time_ms`, `_stream`, `_seq` and `_dropped`
/// (and `_client`).
fn event_lines(
    page: &api::EventPage,
    json: bool,
    client: bool,
    times: &Times,
) -> Result<Vec<String>, String> {
    page.rows
        .iter()
        .map(|row| {
            let mut v: serde_json::Value = serde_json::from_slice(row)
                .map_err(|e| format!("a stored event is not JSON: {e}"))?;
            if !json {
                let at = times.at(page.time_ms);
                return Ok(if client {
                    format!("{at}  {}  {v}", page.client_id)
                } else {
                    format!("{at}  {v}")
                });
            }
            if let Some(o) = v.as_object_mut() {
                if client {
                    o.insert("_client".into(), page.client_id.clone().into());
                }
                o.insert("_time_ms".into(), page.time_ms.into());
                o.insert("_stream".into(), page.stream.into());
                o.insert("_seq".into(), page.seq.into());
                o.insert("_dropped".into(), page.dropped.into());
            }
            Ok(v.to_string())
        })
        .collect()
}

/// A time given on the command line, in ms since the Unix epoch.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "{s:?} is not a time: give RFC 3339 (2026-12-06T10:00:00Z), a UTC day (2026-12-06) \
             or a time ago (30s, 10m, 2h, 1d)"
        )
    };
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c))
        && let Ok(n) = s[..s.len() - 1].parse::<u64>()
    {
        let ms = match unit {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            _ => 86_400_000,
        };
        return Ok(now_ms.saturating_sub(n.saturating_mul(ms)));
    }
    if talon_core::events::valid_day(s) {
        let t: jiff::Timestamp = format!("{s}T00:00:00Z").parse().map_err(|_| bad())?;
        return u64::try_from(t.as_millisecond()).map_err(|_| bad());
    }
    let t: jiff::Timestamp = s.parse().map_err(|_| bad())?;
    u64::try_from(t.as_millisecond()).map_err(|_| bad())
}

/// Runs `talon events ...`; answers what to print (`show` prints as it goes).
pub async fn run(
    mut a: Api,
    command: EventsCommand,
    times: &Times,
    now_ms: u64,
) -> Result<String, String> {
    match command {
        EventsCommand::Set {
            artifact,
            label,
            params,
            json,
        } => {
            let params = super::parse_params(&params)?;
            let e = a
                .set_client_event(api::SetClientEventRequest {
                    artifact,
                    label: label.unwrap_or_default(),
                    params: params.into_iter().collect(),
                    remove: false,
                })
                .await?;
            Ok(if json {
                super::json_out(entry_json(&e))
            } else {
                format!("{} set for {}", e.artifact, whose(&e.label))
            })
        }
        EventsCommand::Unset {
            artifact,
            label,
            json,
        } => {
            let label = label.unwrap_or_default();
            a.set_client_event(api::SetClientEventRequest {
                artifact: artifact.clone(),
                label: label.clone(),
                params: Default::default(),
                remove: true,
            })
            .await?;
            Ok(if json {
                super::json_out(serde_json::json!({ "unset": artifact, "label": label }))
            } else {
                format!("{artifact} unset for {}", whose(&label))
            })
        }
        EventsCommand::List { json } => {
            let entries = a.client_events().await?;
            if json {
                let v: Vec<_> = entries.iter().map(entry_json).collect();
                return Ok(super::json_out(serde_json::Value::Array(v)));
            }
            if entries.is_empty() {
                return Ok("the client event table is empty (`talon events set ARTIFACT`)".into());
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    let mut p: Vec<String> =
                        e.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    p.sort();
                    vec![
                        e.artifact.clone(),
                        whose(&e.label),
                        p.join(" "),
                        e.set_by.clone(),
                        times.at(e.set_ms),
                    ]
                })
                .collect();
            use super::show::Align::Left;
            Ok(super::show::table(
                &[
                    ("ARTIFACT", Left),
                    ("CLIENTS", Left),
                    ("PARAMS", Left),
                    ("SET BY", Left),
                    ("SET AT", Left),
                ],
                rows,
            ))
        }
        EventsCommand::Show {
            client,
            artifact,
            since,
            until,
            follow,
            json,
        } => {
            let since_ms = since.map(|s| parse_time(&s, now_ms)).transpose()?;
            let until_ms = until.map(|s| parse_time(&s, now_ms)).transpose()?;
            let req = api::GetEventsRequest {
                client_id: client,
                artifact,
                since_ms: since_ms.unwrap_or(0),
                until_ms: until_ms.unwrap_or(0),
                follow,
            };
            let mut out = super::Out::stdout();
            let mut dropped: std::collections::BTreeMap<u64, u64> = Default::default();
            let mut events = 0u64;
            let r = a
                .each_event_page(req, |page| {
                    let before = dropped.entry(page.stream).or_insert(0);
                    if page.dropped > *before {
                        eprintln!(
                            "talon: the agent dropped {} events of this stream before {} (its \
                             buffer was full)",
                            page.dropped - *before,
                            times.at(page.time_ms)
                        );
                        *before = page.dropped;
                    }
                    for line in event_lines(&page, json, false, times)? {
                        events += 1;
                        out.line(&line)?;
                    }
                    if follow {
                        out.flush()?;
                    }
                    Ok(())
                })
                .await;
            out.flush()?;
            r?;
            Ok(if json || events > 0 {
                String::new()
            } else {
                "no events stored in that time".into()
            })
        }
        EventsCommand::Search {
            artifact,
            since,
            until,
            label,
            wheres,
            limit,
            json,
        } => {
            let since_ms = parse_time(&since, now_ms)?;
            let until_ms = until.map(|s| parse_time(&s, now_ms)).transpose()?;
            for w in &wheres {
                if !w.contains('=') {
                    return Err(format!("--where {w:?}: expected COLUMN=VALUE"));
                }
            }
            let limit = limit.unwrap_or(crate::node::events::SEARCH_ROWS_DEFAULT);
            let req = api::SearchEventsRequest {
                artifact,
                since_ms,
                until_ms: until_ms.unwrap_or(0),
                label: label.unwrap_or_default(),
                r#where: wheres,
                limit,
            };
            let mut out = super::Out::stdout();
            let mut events = 0u64;
            let r = a
                .each_search_page(req, |page| {
                    for line in event_lines(&page, json, true, times)? {
                        events += 1;
                        out.line(&line)?;
                    }
                    Ok(())
                })
                .await;
            out.flush()?;
            r?;
            if events >= limit {
                eprintln!(
                    "talon: stopped at --limit {limit} events (give a larger --limit for more)"
                );
            }
            Ok(if json || events > 0 {
                String::new()
            } else {
                "no events match".into()
            })
        }
    }
}

fn whose(label: &str) -> String {
    if label.is_empty() {
        "every client".into()
    } else {
        format!("label {label}")
    }
}

fn entry_json(e: &api::ClientEventEntry) -> serde_json::Value {
    serde_json::json!({
        "artifact": e.artifact,
        "label": e.label,
        "params": e.params,
        "set_by": e.set_by,
        "set_ms": e.set_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_days_or_times_ago() {
        let now = 1_765_000_000_000;
        assert_eq!(parse_time("10m", now), Ok(now - 600_000));
        assert_eq!(parse_time("2d", now), Ok(now - 172_800_000));
        assert_eq!(parse_time("1970-01-02", now), Ok(86_400_000));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z", now), Ok(1_500));
        for bad in ["yesterday", "10x", "2026-13-01", ""] {
            let e = parse_time(bad, now).unwrap_err();
            assert!(e.contains("is not a time"), "{e}");
        }
    }
}
