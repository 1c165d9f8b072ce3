//! The analyst's commands over a flow (`talon flow ...`), watching a hunt, and the audit log.

use super::{FlowCommand, Out, flow_out, hunt_text};
use crate::cli::api_client::{
    Api, audit_json, flow_json, hunt_json, rfc3339, state_name, upload_json,
};
use crate::text::printable as p;
use std::io::{IsTerminal, Write};
use std::path::Path;
use talon_proto::api;

/// Runs `talon flow ...`.
pub async fn flow(mut a: Api, command: FlowCommand) -> Result<String, String> {
    match command {
        FlowCommand::Show {
            client_id,
            flow_id,
            json,
        } => Ok(flow_out(&a.flow(&client_id, &flow_id).await?, json)),
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
            Ok(flows_out(&client_id, &flows, json))
        }
        FlowCommand::Uploads {
            client_id,
            flow_id,
            json,
        } => {
            let ups = a.list_uploads(&client_id, &flow_id).await?;
            Ok(uploads_out(&flow_id, &ups, json))
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
            let mut line = Progress::new(json);
            let f = a
                .watch_flow(&client_id, &flow_id, |f| {
                    line.show(&flow_json(f), &flow_progress(f))
                })
                .await?;
            line.end();
            Ok(if json {
                String::new()
            } else {
                flow_out(&f, false)
            })
        }
    }
}

/// `talon hunt watch`: the hunt's figures as they change, until it is no longer running.
pub async fn watch_hunt(mut a: Api, hunt_id: &str, json: bool) -> Result<String, String> {
    let mut line = Progress::new(json);
    let h = a
        .watch_hunt(hunt_id, |h| line.show(&hunt_json(h), &hunt_text(h)))
        .await?;
    line.end();
    Ok(if json { String::new() } else { hunt_text(&h) })
}

/// `talon audit list`.
pub async fn audit(mut a: Api, json: bool) -> Result<String, String> {
    let entries = a.audit().await?;
    if json {
        let v: Vec<_> = entries.iter().map(audit_json).collect();
        return Ok(serde_json::to_string_pretty(&v).expect("JSON values serialise"));
    }
    if entries.is_empty() {
        return Ok("the audit log is empty".into());
    }
    let mut out = vec![format!(
        "{:<20}  {:<16} {:<12} {:<18} DETAIL",
        "TIME (UTC)", "USER", "ACTION", "TARGET"
    )];
    out.extend(entries.iter().map(|e| {
        format!(
            "{:<20}  {:<16} {:<12} {:<18} {}",
            rfc3339(e.time_unix_ms),
            p(&e.user),
            e.action,
            e.target,
            p(&e.detail)
        )
    }));
    Ok(out.join("\n"))
}

fn flows_out(client: &str, flows: &[api::FlowSummary], json: bool) -> String {
    if json {
        let v: Vec<_> = flows.iter().map(flow_json).collect();
        return serde_json::to_string_pretty(&v).expect("JSON values serialise");
    }
    if flows.is_empty() {
        return format!("client {client} has no flows");
    }
    let mut out = vec![format!(
        "{:<20}  {:<18} {:<32} {:<9} {:>8} {:>12}  HUNT",
        "CREATED (UTC)", "FLOW", "ARTIFACT", "STATE", "ROWS", "BYTES"
    )];
    out.extend(flows.iter().map(|f| {
        format!(
            "{:<20}  {:<18} {:<32} {:<9} {:>8} {:>12}  {}",
            rfc3339(f.created_unix_ms),
            f.flow_id,
            f.artifact,
            state_name(f.state),
            f.rows,
            f.uploaded_bytes,
            f.hunt_id
        )
    }));
    out.join("\n")
}

fn uploads_out(flow: &str, ups: &[api::UploadInfo], json: bool) -> String {
    if json {
        let v: Vec<_> = ups.iter().map(upload_json).collect();
        return serde_json::to_string_pretty(&v).expect("JSON values serialise");
    }
    if ups.is_empty() {
        return format!("flow {flow} has no uploads (or has not completed yet)");
    }
    let mut out = vec![format!(
        "{:>4} {:>12}  {:<64}  NAME",
        "ID", "SIZE", "SHA-256"
    )];
    out.extend(ups.iter().map(|u| {
        let sha = if u.error.is_empty() {
            u.sha256.clone()
        } else {
            format!("(failed: {})", p(&u.error))
        };
        format!(
            "{:>4} {:>12}  {:<64}  {}",
            u.upload_id,
            u.size,
            sha,
            p(&u.name)
        )
    }));
    out.join("\n")
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

fn flow_progress(f: &api::FlowSummary) -> String {
    format!(
        "flow {} {}: {} rows={} uploaded_bytes={}",
        f.flow_id,
        f.artifact,
        state_name(f.state),
        f.rows,
        f.uploaded_bytes
    )
}

/// How a watch shows each change: one JSON object per line (`--json`), a line rewritten in place
/// on a terminal, or one line per change otherwise.
struct Progress {
    json: bool,
    live: bool,
    shown: bool,
}

impl Progress {
    fn new(json: bool) -> Progress {
        let live = !json && std::io::stderr().is_terminal();
        Progress {
            json,
            live,
            shown: false,
        }
    }

    fn show(&mut self, v: &serde_json::Value, text: &str) -> Result<(), String> {
        self.shown = true;
        if self.json {
            let mut o = std::io::stdout().lock();
            return writeln!(o, "{v}")
                .and_then(|()| o.flush())
                .map_err(|e| format!("cannot write output: {e}"));
        }
        if self.live {
            // Erase the line and write the new state over it.
            eprint!("\r\x1b[2K{text}");
        } else {
            eprintln!("{text}");
        }
        Ok(())
    }

    fn end(&self) {
        if self.live && self.shown {
            eprintln!();
        }
    }
}
