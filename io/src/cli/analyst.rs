//! The analyst's commands over a flow (`talon flow ...`), watching a hunt, and the audit log.

use super::show::{self, Progress, Times};
use super::{FlowCommand, Out, flow_out};
use crate::cli::api_client::{Api, audit_json, flow_json, hunt_json, upload_json};
use std::io::Write;
use std::path::Path;

/// Runs `talon flow ...`.
pub async fn flow(mut a: Api, command: FlowCommand, t: &Times) -> Result<String, String> {
    match command {
        FlowCommand::Show {
            client_id,
            flow_id,
            json,
        } => Ok(flow_out(&a.flow(&client_id, &flow_id).await?, json, t)),
        FlowCommand::Results {
            client_id, flow_id, ..
        } => {
            // Streamed: rows are written as their pages arrive, whatever the flow's size.
            let mut out = Out::stdout();
            a.each_flow_row(&client_id, &flow_id, |r| out.line(&r.to_string()))
                .await?;
            out.flush()?;
            Ok(String::new())
        }
        FlowCommand::List { client_id, json } => {
            let flows = a.list_flows(&client_id).await?;
            Ok(if json {
                let v: Vec<_> = flows.iter().map(flow_json).collect();
                serde_json::to_string_pretty(&v).expect("JSON values serialise")
            } else {
                show::flows(&client_id, &flows, t)
            })
        }
        FlowCommand::Uploads {
            client_id,
            flow_id,
            json,
        } => {
            let ups = a.list_uploads(&client_id, &flow_id).await?;
            Ok(if json {
                let v: Vec<_> = ups.iter().map(upload_json).collect();
                serde_json::to_string_pretty(&v).expect("JSON values serialise")
            } else {
                show::uploads(&flow_id, &ups)
            })
        }
        FlowCommand::Download {
            client_id,
            flow_id,
            upload_id,
            out,
            force,
            json,
        } => {
            let n = download(&mut a, &client_id, &flow_id, upload_id, &out, force).await?;
            Ok(if json {
                let v = serde_json::json!({"path": out, "bytes": n});
                serde_json::to_string_pretty(&v).expect("JSON values serialise")
            } else {
                format!("{n} bytes written to {}", out.display())
            })
        }
        FlowCommand::Cancel {
            client_id,
            flow_id,
            reason,
            json,
        } => {
            let r = a.cancel(&client_id, &flow_id, &reason).await?;
            if json {
                let v = serde_json::json!({
                    "client_id": client_id,
                    "flow_id": flow_id,
                    "before_start": r.before_start,
                    "told": r.told,
                });
                return Ok(serde_json::to_string_pretty(&v).expect("JSON values serialise"));
            }
            Ok(if r.before_start {
                format!("flow {flow_id} cancelled before it started: it will not run")
            } else if r.told {
                format!("flow {flow_id}: its client was told to stop it (see `flow watch`)")
            } else {
                format!("flow {flow_id}: cancel recorded; its client is not connected")
            })
        }
        FlowCommand::Watch {
            client_id,
            flow_id,
            json,
        } => {
            let mut line = Progress::new(json, false);
            let f = a
                .watch_flow(&client_id, &flow_id, |f| {
                    line.show(&flow_json(f), show::flow_line(f), (0, 0))
                })
                .await?;
            line.end();
            Ok(if json {
                String::new()
            } else {
                flow_out(&f, false, t)
            })
        }
    }
}

/// `talon query`: the query checked here, collected as `Generic.Query`, and unless `wait` is none
/// its rows printed once the flow finished: a table in the query's column order, or JSON lines.
pub async fn query(
    mut a: Api,
    client: &str,
    sql: String,
    wait: Option<std::time::Duration>,
    json: bool,
    t: &Times,
) -> Result<String, String> {
    let (params, columns) = super::query_artifact(sql)?;
    let columns =
        crate::query::unique_names(&columns.iter().map(String::as_str).collect::<Vec<_>>());
    let f = a
        .collect(client, talon_core::artifacts::QUERY_ARTIFACT, params)
        .await?;
    let Some(timeout) = wait else {
        return Ok(flow_out(&f, json, t));
    };
    let f = a.wait(client, &f.flow_id, timeout).await?;
    if !f.error.is_empty() {
        return Err(format!(
            "flow {} on {client}: {}",
            f.flow_id,
            crate::text::printable(&f.error)
        ));
    }
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut out = Out::stdout();
    a.each_flow_row(client, &f.flow_id, |r| {
        if json {
            out.line(&r.to_string())
        } else {
            rows.push(r);
            Ok(())
        }
    })
    .await?;
    out.flush()?;
    if json {
        return Ok(String::new());
    }
    let cell = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => crate::text::printable(s).into_owned(),
        Some(v) => v.to_string(),
    };
    let cols: Vec<(&str, show::Align)> = columns
        .iter()
        .map(|c| {
            let numeric = rows
                .iter()
                .all(|r| r.get(c).is_none_or(|v| v.is_number() || v.is_null()));
            (
                c.as_str(),
                if numeric && !rows.is_empty() {
                    show::Align::Right
                } else {
                    show::Align::Left
                },
            )
        })
        .collect();
    let n = rows.len();
    let table = show::table(
        &cols,
        rows.iter()
            .map(|r| columns.iter().map(|c| cell(r.get(c))).collect()),
    );
    eprintln!("{n} rows (flow {})", f.flow_id);
    Ok(table)
}

/// `talon hunt watch`: the hunt's figures as they change, until it is no longer running.
pub async fn watch_hunt(
    mut a: Api,
    hunt_id: &str,
    json: bool,
    t: &Times,
) -> Result<String, String> {
    let mut line = Progress::new(json, true);
    let h = a
        .watch_hunt(hunt_id, |h| {
            let s = h.stats.unwrap_or_default();
            line.show(
                &hunt_json(h),
                show::hunt_line(h),
                (s.completed + s.errors, s.scheduled),
            )
        })
        .await?;
    line.end();
    Ok(if json {
        String::new()
    } else {
        show::hunt(&h, t)
    })
}

/// `talon audit list`.
pub async fn audit(mut a: Api, json: bool, t: &Times) -> Result<String, String> {
    let entries = a.audit().await?;
    Ok(if json {
        let v: Vec<_> = entries.iter().map(audit_json).collect();
        serde_json::to_string_pretty(&v).expect("JSON values serialise")
    } else {
        show::audit(&entries, t)
    })
}

/// Downloads an upload into `out` through a scratch file beside it, renamed into place once every
/// byte arrived and the master found them to match the recorded SHA-256.
async fn download(
    a: &mut Api,
    client: &str,
    flow: &str,
    upload_id: u32,
    out: &Path,
    force: bool,
) -> Result<u64, String> {
    if out.exists() && !force {
        return Err(format!(
            "{} exists; pass --force to overwrite it",
            out.display()
        ));
    }
    let scratch = out.with_extension("talon-partial");
    let mut file = std::fs::File::create(&scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let got = a
        .download(client, flow, upload_id, |bytes| {
            file.write_all(bytes)
                .map_err(|e| format!("cannot write {}: {e}", scratch.display()))
        })
        .await;
    let n = match got.and_then(|n| {
        file.sync_all()
            .map_err(|e| format!("cannot write {}: {e}", scratch.display()))?;
        Ok(n)
    }) {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&scratch);
            return Err(e);
        }
    };
    std::fs::rename(&scratch, out)
        .map_err(|e| format!("cannot move {} into place: {e}", scratch.display()))?;
    Ok(n)
}
