//! The command line: parsing and the commands that need no running cluster.

pub mod analyst;
pub mod api_client;
pub mod bench;
pub mod demo;
pub mod events;
pub mod show;
pub mod user;

use crate::clock::{OsEntropy, SystemClock};
use crate::deploy::config::{self, ServerConfig};
use crate::deploy::pki;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use talon_core::artifacts::{self, ParamKind};

/// Talon: endpoint visibility across one master and many minion frontends.
#[derive(Debug, Parser)]
#[command(
    name = "talon",
    version,
    about = "Talon: endpoint visibility and incident response — the frontend server, the endpoint \
             agent and the analyst's command line",
    long_about = None
)]
pub struct Cli {
    /// The server or client config file.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The API client config file (from `talon config api-client`).
    #[arg(long, alias = "api_config", global = true, value_name = "FILE")]
    pub api_config: Option<PathBuf>,
    /// How log lines (on stderr) are written: text (coloured only on a terminal) or json (one
    /// object per line, for log shippers).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Show times in text output in this machine's time zone (RFC 3339 with its offset) instead
    /// of UTC. JSON output is unaffected (times there are milliseconds since the Unix epoch).
    #[arg(long, global = true)]
    pub local_time: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The form of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`).
    Json,
}

/// The form chosen on the command line, for [`init_logging`].
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The endpoint artifacts built into the client.
    Artifacts {
        /// What to do with them.
        #[command(subcommand)]
        command: ArtifactsCommand,
    },
    /// Client event monitoring: which event artifacts run where, and the events clients sent
    /// (docs/events.md). Needs --api-config.
    Events {
        /// What to do.
        #[command(subcommand)]
        command: events::EventsCommand,
    },
    /// The GUI's users (with --config server.config.yaml): add, list, remove, passwd.
    User {
        /// What to do.
        #[command(subcommand)]
        command: user::UserCommand,
    },
    /// Build installable packages of this deployment (with --config server.config.yaml).
    Package {
        /// What to build.
        #[command(subcommand)]
        command: PackageCommand,
    },
    /// Create and derive configuration files.
    Config {
        /// What to do with them.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run a frontend node with --config server.config.yaml: the master, or with --minion a minion.
    Frontend {
        /// This node's fast local disk: the master's datastore journal, a minion's replication outbox
        /// (not the shared volume). Default /var/lib/talon/<node name>.
        #[arg(long, alias = "local_dir", value_name = "DIR")]
        local_dir: Option<PathBuf>,
        /// Run as a minion (needs --node).
        #[arg(long, requires = "node")]
        minion: bool,
        /// The minion's node name, HOST-PORT as listed by `config frontend --add`.
        #[arg(long, value_name = "HOST-PORT", requires = "minion")]
        node: Option<String>,
        /// Serve this node's metrics on this port instead of `Monitoring.bind_port` (several nodes
        /// on one machine); 0: none.
        #[arg(long, value_name = "PORT")]
        monitoring_port: Option<u16>,
    },
    /// Run an endpoint agent (with --config client.config.yaml).
    Client {
        /// Where the agent keeps its key (created on first start).
        #[arg(long, value_name = "FILE")]
        writeback: Option<PathBuf>,
    },
    /// Run many virtual endpoint agents in one process (load tests), with --config client.config.yaml.
    #[command(alias = "pool_client")]
    PoolClient {
        /// How many clients.
        #[arg(long)]
        number: usize,
        /// The first client's key number: several pools share one key directory with disjoint
        /// ranges (`--first 0 --number 1000`, `--first 1000 --number 1000`).
        #[arg(long, default_value_t = 0)]
        first: usize,
        /// Where their keys are cached (a restart reuses them).
        #[arg(long, alias = "writeback_dir", value_name = "DIR")]
        writeback_dir: PathBuf,
        /// Clients started per second (0: all at once).
        #[arg(long, alias = "start_rate", default_value_t = 100.0)]
        start_rate: f64,
        /// Write the clients' service times (first send to acknowledgement: p50/p99/max, for data
        /// messages and final statuses) to this JSON file, replaced every second.
        #[arg(long, value_name = "FILE")]
        stats: Option<PathBuf>,
        /// The clients' host names are PREFIX-<key number>.
        #[arg(long, default_value = "pool", value_name = "PREFIX")]
        hostname_prefix: String,
    },
    /// Measure: start a deployment on loopback in a temporary directory and print its figures.
    Bench {
        /// connections: N clients on one frontend (memory per client, connect rate); hunt: a hunt over
        /// them (time to task all, to 95% and 100% complete, rows per second); storage-latency: a row
        /// hunt with the shared volume at 0 ms and 50 ms per operation (throughput, p50/p99 service
        /// time); replication: a minion's clients connect during a master outage (events per second
        /// applied after it, catch-up time).
        #[arg(value_enum)]
        scenario: crate::cli::bench::Scenario,
        /// Virtual clients (default: 10,000 for connections, hunt and events; 100,000 enrolled for
        /// gui; 50 runs for query; 1,000 otherwise).
        #[arg(long)]
        clients: Option<usize>,
        /// storage-latency: rows each client returns.
        #[arg(long, default_value_t = 3000)]
        rows: u64,
        /// storage-latency: the latency injected in the slow run (ms per volume operation).
        #[arg(long, default_value_t = 50)]
        latency_ms: u64,
        /// storage-latency: each client pauses this long after every 100 rows (an even load well
        /// under capacity, for service times); 0 sends as fast as possible (capacity).
        #[arg(long, default_value_t = 1000)]
        pause_ms: u64,
        /// replication: how long the master is down (seconds).
        #[arg(long, default_value_t = 60)]
        outage_s: u64,
        /// storage-latency: also run the workload with the shared volume in DIR (a network
        /// filesystem's mount point, e.g. NFS, EFS or sshfs), compared in the same run with the
        /// local disk and the latency model. gui: the shared volume is in DIR. A scratch directory
        /// is made in DIR and removed after.
        #[arg(long, value_name = "DIR")]
        volume: Option<PathBuf>,
        /// connections, hunt: run K minions beside the master and split the clients evenly over
        /// the K + 1 frontends (each share in its own load-generator process).
        #[arg(long, default_value_t = 0)]
        minions: usize,
        /// Clients started per second (0: all at once).
        #[arg(long, default_value_t = 2000.0)]
        start_rate: f64,
        /// events: events each client makes per second.
        #[arg(long, default_value_t = 10)]
        rate: u64,
        /// events: seconds each run is measured (after a 10 s warm-up).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Where the clients' keys are cached between runs (default: ~/.cache/talon/bench-keys).
        #[arg(long, value_name = "DIR")]
        keys: Option<PathBuf>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A whole deployment on loopback: a master, minions and virtual clients, and a hunt across them.
    Demo {
        /// Minion frontends beside the master (0: single server).
        #[arg(long, default_value_t = 2)]
        minions: usize,
        /// Virtual clients.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
    },
    /// Find clients.
    Clients {
        /// What to do.
        #[command(subcommand)]
        command: ClientsCommand,
    },
    /// Add or remove a client label.
    Label {
        /// What to do.
        #[command(subcommand)]
        command: LabelCommand,
    },
    /// Collect an artifact from one client.
    Collect {
        /// The client (C.xxxxxxxxxxxxxxxx).
        client_id: String,
        /// The artifact (see `talon artifacts list`).
        artifact: String,
        /// A parameter, `name=value`; repeat for several.
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        /// Wait for the flow to finish and print its summary.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run one SQL query over the endpoint tables on a client and print its rows (a flow of
    /// artifact Generic.Query; the tables: `talon artifacts tables`).
    Query {
        /// The client (C.xxxxxxxxxxxxxxxx).
        client_id: String,
        /// One SELECT, e.g. "SELECT pid, name FROM processes WHERE name LIKE 'ssh%'".
        query: String,
        /// How long to wait for the rows.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// Schedule it and print the flow, without waiting for the rows.
        #[arg(long)]
        no_wait: bool,
        /// Print the rows as JSON lines (one object per row) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hunts: one artifact on every matching client.
    Hunt {
        /// What to do.
        #[command(subcommand)]
        command: HuntCommand,
    },
    /// The master's view of its minions (with --api-config).
    Cluster {
        /// What to show.
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Inspect a flow.
    Flow {
        /// What to do.
        #[command(subcommand)]
        command: FlowCommand,
    },
    /// The master's audit log: every change and the API user who asked for it.
    Audit {
        /// What to do.
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// `talon audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Every entry, newest first: time, user, action, target, detail.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// `talon clients ...`
#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Search: all | host:X | label:X | ip:X | C.<id prefix>.
    Search {
        /// The query.
        query: String,
        /// Order: id (default), hostname, last_seen, os, node, last_ip or connected (ties by id).
        #[arg(long, default_value = "id")]
        sort: String,
        /// Reverse the order.
        #[arg(long)]
        descending: bool,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// `talon label ...`
#[derive(Debug, Subcommand)]
pub enum LabelCommand {
    /// Add a label to a client.
    Add {
        /// The client.
        client_id: String,
        /// The label.
        label: String,
        /// Print the client as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a label from a client.
    Remove {
        /// The client.
        client_id: String,
        /// The label.
        label: String,
        /// Print the client as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `talon cluster ...`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Each minion: replication stream up or not, outbox epoch, events applied by the master.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `talon hunt ...`
#[derive(Debug, Subcommand)]
pub enum HuntCommand {
    /// Start a hunt; prints its id (or the hunt as JSON).
    Create {
        /// The artifact (see `talon artifacts list`); or give --query instead.
        #[arg(required_unless_present = "query")]
        artifact: Option<String>,
        /// Hunt with one SQL query over the endpoint tables (artifact Generic.Query).
        #[arg(long, conflicts_with_all = ["artifact", "params"])]
        query: Option<String>,
        /// A parameter, `name=value`; repeat for several.
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        /// Only clients carrying this label; repeat: all of them.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Leave out clients carrying this label; repeat for several.
        #[arg(long = "exclude-label", alias = "exclude_label")]
        exclude_labels: Vec<String>,
        /// Only clients of this OS.
        #[arg(long, value_parser = ["linux", "windows", "darwin"])]
        os: Option<String>,
        /// Stop scheduling after this long: 90, 30s, 10m, 2h, 7d (default 7d).
        #[arg(long)]
        expires: Option<String>,
        /// At most this many clients.
        #[arg(long, alias = "client_limit")]
        client_limit: Option<u64>,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Print the hunt as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every hunt.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// One hunt with its exact statistics.
    Show {
        /// The hunt.
        hunt_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a hunt: its figures each time they change, until it is no longer running.
    Watch {
        /// The hunt.
        hunt_id: String,
        /// Print one JSON object per change.
        #[arg(long)]
        json: bool,
    },
    /// Stop scheduling new clients (scheduled ones still report).
    Stop {
        /// The hunt.
        hunt_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export every row the hunt collected.
    Results {
        /// The hunt.
        hunt_id: String,
        /// `jsonl` (one object per line, with client_id and flow_id) or `csv`.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
        /// CSV: write values exactly as the agents sent them. Without it, a value a spreadsheet
        /// would run as a formula (starting with = + - @, tab or carriage return) is prefixed with
        /// `'`, and control characters are escaped.
        #[arg(long)]
        raw: bool,
    },
}

/// A hunt as pretty JSON (`--json`) or a record.
fn hunt_out(h: &talon_proto::api::HuntSummary, json: bool, t: &show::Times) -> String {
    if json {
        serde_json::to_string_pretty(&crate::cli::api_client::hunt_json(h))
            .expect("JSON values serialise")
    } else {
        show::hunt(h, t)
    }
}

/// `talon flow ...`
#[derive(Debug, Subcommand)]
pub enum FlowCommand {
    /// A flow's state and totals.
    Show {
        /// The client.
        client_id: String,
        /// The flow.
        flow_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A flow's result rows, one JSON object per line.
    Results {
        /// The client.
        client_id: String,
        /// The flow.
        flow_id: String,
        /// Accepted for symmetry with `flow show`; rows are always JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// A client's flows, newest first: created, flow, artifact, state, rows, bytes, hunt.
    List {
        /// The client.
        client_id: String,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// The files a flow uploaded: id, size, SHA-256, name on the client.
    Uploads {
        /// The client.
        client_id: String,
        /// The flow.
        flow_id: String,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Download an uploaded file (checked against its recorded SHA-256).
    Download {
        /// The client.
        client_id: String,
        /// The flow.
        flow_id: String,
        /// The upload's id (see `flow uploads`).
        upload_id: u32,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a flow: one not started never runs; one running is told to stop and reports failed.
    Cancel {
        /// The client.
        client_id: String,
        /// The flow.
        flow_id: String,
        /// Why (shown in the flow's error and the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a flow: its state each time it changes, until it has finished.
    Watch {
        /// The client.
        client_id: String,
        /// The flow.
        flow_id: String,
        /// Print one JSON object per change.
        #[arg(long)]
        json: bool,
    },
}

/// `talon package ...`
#[derive(Debug, Subcommand)]
pub enum PackageCommand {
    /// Debian packages: one per server node (the master and each minion, named after the node),
    /// each with the talon binary, the server config and a systemd unit for that node; with
    /// --client, the agent's package instead.
    Deb {
        /// The directory to write the packages into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Write the agent's package (its unit runs `talon client` as root).
        #[arg(long)]
        client: bool,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `talon config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Create a deployment: CA, frontend certificate, server.config.yaml and client.config.yaml.
    Generate {
        /// The master's public name or IP (what clients and minions connect to).
        #[arg(long)]
        hostname: String,
        /// Port clients connect to.
        #[arg(long, alias = "frontend_port", default_value_t = 8000)]
        frontend_port: u16,
        /// Port of the API (and of the master for minions).
        #[arg(long, alias = "api_port", default_value_t = 8001)]
        api_port: u16,
        /// Port of the GUI.
        #[arg(long, alias = "gui_port", default_value_t = 8889)]
        gui_port: u16,
        /// Port of every node's Prometheus metrics (Monitoring.bind_port, on loopback); 0: none.
        #[arg(long, default_value_t = crate::metrics::DEFAULT_PORT)]
        monitoring_port: u16,
        /// The shared volume's mount point, the same path on every node.
        #[arg(long, default_value = config::DEFAULT_DATASTORE)]
        datastore: PathBuf,
        /// Where to write the two config files.
        #[arg(long, alias = "out_dir")]
        out_dir: PathBuf,
        /// Overwrite existing config files (their keys are lost).
        #[arg(long)]
        force: bool,
        /// The certificates' key type: ecdsa-p256 (every TLS stack, grpcio and OpenSSL included,
        /// accepts it) or ed25519.
        #[arg(long, default_value = "ecdsa-p256")]
        key_type: pki::KeyType,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Derive the multi-frontend config in place: add minions, and rewrite client.config.yaml beside it.
    Frontend {
        /// A minion's HOST:PORT; repeat for several.
        #[arg(long, required = true, value_name = "HOST:PORT")]
        add: Vec<String>,
        /// Print what changed as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the deployment CA in two steps (docs/security.md): without --finish a new CA starts
    /// signing and the old one stays trusted; with --finish the frontend certificate is reissued by
    /// the new CA and the old CA is no longer trusted. Rewrites client.config.yaml beside the config.
    RotateCa {
        /// The second step: drop the old CA.
        #[arg(long)]
        finish: bool,
        /// The new CA's key type (its frontend and API certificates take it): ecdsa-p256 (every
        /// TLS stack accepts it) or ed25519 (what deployments made before were given).
        #[arg(long, default_value = "ecdsa-p256", conflicts_with = "finish")]
        key_type: pki::KeyType,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Issue an API user's certificate and write its config.
    #[command(alias = "api_client")]
    ApiClient {
        /// The user's name.
        #[arg(long)]
        name: String,
        /// What the certificate may do: reader (views), investigator (also collects, hunts,
        /// cancels, labels) or administrator (also artifacts, client events, audit log).
        #[arg(long, value_enum, default_value_t = pki::Access::Administrator)]
        role: pki::Access,
        /// Where to write the API config.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `talon artifacts ...`
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// List every artifact with its parameters: with --api-config the master's repository
    /// (built-in and custom), without it the built-ins of this binary.
    List {
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a custom artifact from a YAML definition (docs/artifacts.md); the master prepares every
    /// query first and refuses it naming what is wrong and where.
    Add {
        /// The definition.
        #[arg(value_name = "FILE.yaml")]
        file: PathBuf,
        /// Replace a custom artifact of the same name.
        #[arg(long)]
        replace: bool,
        /// Print the stored artifact as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one artifact's definition (built-in or custom).
    Show {
        /// The artifact.
        name: String,
        /// Print its parameters and platforms as JSON, with the definition.
        #[arg(long)]
        json: bool,
    },
    /// Remove a custom artifact (flows and hunts already scheduled keep the definition they
    /// carry).
    Remove {
        /// The artifact.
        name: String,
        /// Print `{"removed": NAME}`.
        #[arg(long)]
        json: bool,
    },
    /// List the endpoint tables a query can read, with their columns.
    Tables {
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// What a command that streams its output reports when the reader went away (`| head`): not an
/// error worth a message.
const BROKEN_PIPE: &str = "output closed (broken pipe)";

/// Standard output for commands that stream it, line by line through a buffer.
struct Out(std::io::BufWriter<std::io::Stdout>);

impl Out {
    fn stdout() -> Out {
        Out(std::io::BufWriter::with_capacity(
            64 << 10,
            std::io::stdout(),
        ))
    }

    fn map(e: std::io::Error) -> String {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            BROKEN_PIPE.into()
        } else {
            format!("cannot write output: {e}")
        }
    }

    fn line(&mut self, s: &str) -> Result<(), String> {
        writeln!(self.0, "{s}").map_err(Out::map)
    }

    fn flush(&mut self) -> Result<(), String> {
        self.0.flush().map_err(Out::map)
    }
}

/// Runs the command line; errors go to stderr with a non-zero exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        // Streamed already (or nothing to say).
        Ok(text) if text.is_empty() => ExitCode::SUCCESS,
        Err(e) if e == BROKEN_PIPE => ExitCode::SUCCESS,
        Ok(text) => match writeln!(std::io::stdout().lock(), "{text}") {
            Ok(()) => ExitCode::SUCCESS,
            // A closed pipe (e.g. `| head`) is not an error worth a message.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("talon: cannot write output: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("talon: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long the process waits at exit for work still on the async runtime's blocking pool.
pub const EXIT_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs one command; returns what to print.
pub fn run(cli: Cli) -> Result<String, String> {
    let _ = LOG_FORMAT.set(cli.log_format);
    match cli.command {
        Command::Artifacts {
            command: ArtifactsCommand::List { json },
        } if cli.api_config.is_none() => {
            let list = crate::definitions::builtin_infos();
            Ok(if json {
                artifacts_json(&list)
            } else {
                format!(
                    "{}\n\n(the built-ins of this binary; with --api-config the master's \
                     repository, custom artifacts too)",
                    artifacts_table(&list)
                )
            })
        }
        Command::Artifacts {
            command: ArtifactsCommand::Tables { json },
        } => Ok(show::tables(json)),
        Command::Config { command } => run_config(cli.config.as_deref(), command),
        Command::Package { command } => run_package(need_config(cli.config.as_deref())?, command),
        Command::User { command } => user::run(need_config(cli.config.as_deref())?, command),
        command => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            let r = rt.block_on(run_async(
                cli.config,
                cli.api_config,
                cli.local_time,
                command,
            ));
            // Volume calls still running on the blocking pool (a flush the stop's bound cut
            // short) are abandoned as a crash would abandon them: the journal that holds their
            // writes is replayed at the next start (docs/operations.md, "Stopping").
            rt.shutdown_timeout(EXIT_WAIT_MAX);
            r
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a log file or journald gets plain text, so the only escape
    // sequences a reader could meet are ones an agent sent, and those are escaped.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match LOG_FORMAT.get().copied().unwrap_or(LogFormat::Text) {
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called (not when first
/// polled), so a signal that arrives early is not lost to the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    async move {
        let wait = |s: &mut Option<tokio::signal::unix::Signal>| {
            let s = s.take();
            async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            _ = wait(&mut int) => {}
            _ = wait(&mut term) => {}
        }
    }
}

/// Refuses an artifact request this side can already tell is wrong (unknown artifact or parameter,
/// a bad value, a query that does not prepare), before talking to the server.
/// A custom artifact is checked by the master, which holds it.
fn check_locally(
    artifact: &str,
    params: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<crate::query::Checked>, String> {
    let Some(b) = crate::definitions::builtin(artifact) else {
        return Ok(Vec::new());
    };
    let spec = &b.spec;
    let full = artifacts::validate(spec, params).map_err(|e| e.to_string())?;
    crate::query::check_artifact(spec, &full).map_err(|e| {
        let sql = spec
            .params
            .iter()
            .find(|p| p.kind == ParamKind::Sql)
            .and_then(|p| full.get(&p.name))
            .cloned()
            .unwrap_or_default();
        query_error(&sql, &e)
    })
}

/// A refused query as one line, and on a terminal the query's line with a caret at the error.
fn query_error(sql: &str, e: &crate::query::QueryError) -> String {
    use std::io::IsTerminal;
    match e.offset {
        Some(o) if std::io::stderr().is_terminal() => {
            format!("the query is refused: {e}\n{}", crate::query::caret(sql, o))
        }
        _ => format!("the query is refused: {e}"),
    }
}

/// An ad-hoc query, checked here first: the parameters it is sent with (as artifact
/// [`artifacts::QUERY_ARTIFACT`]) and its result's column names.
type AdHoc = (std::collections::BTreeMap<String, String>, Vec<String>);

fn query_artifact(query: String) -> Result<AdHoc, String> {
    let params = std::collections::BTreeMap::from([("query".to_owned(), query)]);
    let columns = check_locally(artifacts::QUERY_ARTIFACT, &params)?
        .into_iter()
        .next()
        .map(|c| c.columns)
        .unwrap_or_default();
    Ok((params, columns))
}

fn parse_params(params: &[String]) -> Result<std::collections::BTreeMap<String, String>, String> {
    params
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(format!("--param {p:?}: expected name=value")),
        })
        .collect()
}

async fn api(api_config: Option<&Path>) -> Result<crate::cli::api_client::Api, String> {
    let path = api_config.ok_or_else(|| {
        "this command needs --api-config api.config.yaml (see `talon config api-client`)"
            .to_string()
    })?;
    crate::cli::api_client::Api::connect(path).await
}

/// A flow as pretty JSON (`--json`) or one line of text.
fn flow_out(f: &talon_proto::api::FlowSummary, json: bool, t: &show::Times) -> String {
    if json {
        serde_json::to_string_pretty(&crate::cli::api_client::flow_json(f))
            .expect("JSON values serialise")
    } else {
        show::flow(f, t)
    }
}

async fn run_async(
    config: Option<PathBuf>,
    api_config: Option<PathBuf>,
    local_time: bool,
    command: Command,
) -> Result<String, String> {
    let times = || show::Times::new(local_time);
    use crate::cli::api_client::client_json;
    use std::sync::Arc;
    match command {
        Command::Frontend {
            local_dir,
            minion: _,
            node,
            monitoring_port,
        } => {
            init_logging("info");
            let path = need_config(config.as_deref())?;
            let mut cfg = ServerConfig::load(path).map_err(|e| e.to_string())?;
            if let Some(port) = monitoring_port {
                cfg.monitoring.bind_port = port;
            }
            // One descriptor per client connection, plus files and the volume's.
            let wanted = 2 * cfg.frontend.resources.expected_clients + 4096;
            match crate::env::raise_fd_limit(wanted) {
                Ok(n) if n < wanted => tracing::warn!(
                    limit = n,
                    wanted,
                    "the open-file limit ({n}) is below what Frontend.resources.expected_clients \
                     needs ({wanted}): clients beyond it are refused. Raise the hard limit to at \
                     least {wanted} (systemd: LimitNOFILE={wanted}; a shell: ulimit -Hn {wanted}; \
                     /etc/security/limits.conf: nofile) or lower expected_clients"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
            let name = node.clone().unwrap_or_else(|| cfg.master_node_name());
            let local_dir =
                local_dir.unwrap_or_else(|| PathBuf::from(format!("/var/lib/talon/{name}")));
            let env = crate::env::Env::real();
            let storage = crate::storage::NodeStorage::real(&cfg, &local_dir, &name)?;
            match node {
                Some(node) => {
                    crate::node::server::run_minion(
                        env,
                        cfg,
                        node,
                        storage,
                        |_| {},
                        shutdown_signal(),
                    )
                    .await?
                }
                None => {
                    crate::node::server::run_master(env, cfg, storage, |_| {}, shutdown_signal())
                        .await?
                }
            }
            Ok("frontend stopped".into())
        }
        Command::Client { writeback } => {
            init_logging("info");
            let path = need_config(config.as_deref())?;
            let cfg: config::ClientConfig = config::read_yaml(path).map_err(|e| e.to_string())?;
            let writeback =
                writeback.unwrap_or_else(|| path.with_file_name("talon.writeback.yaml"));
            let (identity, id) = crate::agent::load_or_create_identity(&writeback, &SystemClock)?;
            tracing::info!(client = %id, writeback = %writeback.display(), servers = ?cfg.client.server_urls, "talon client starting");
            let mut outbox = crate::agent::Outbox::default();
            outbox.events = crate::agent::events::Events::on_disk(
                &crate::agent::events::buffer_dir(&writeback),
                crate::agent::events::buffer_bytes(&cfg.client)?,
            )?;
            let agent = crate::agent::Agent {
                config: cfg,
                identity,
                id,
                clock: Arc::new(SystemClock),
                entropy: Arc::new(OsEntropy::default()),
                outbox,
                host: crate::query::Host::Real,
                inline_artifacts: false,
                net: crate::net::TokioNet::shared(),
            };
            tokio::select! {
                r = agent.run() => r.map(|_| String::new()),
                _ = shutdown_signal() => Ok("client stopped".into()),
            }
        }
        Command::PoolClient {
            number,
            first,
            writeback_dir,
            start_rate,
            stats,
            hostname_prefix,
        } => {
            init_logging("warn");
            let path = need_config(config.as_deref())?;
            let cfg: config::ClientConfig = config::read_yaml(path).map_err(|e| e.to_string())?;
            let wanted = number as u64 + 1024;
            let limit = crate::env::raise_fd_limit(wanted)?;
            if limit < wanted {
                return Err(format!(
                    "the open-file limit is {limit} but {number} clients need about {wanted}: raise \
                     it (ulimit -n) or run with fewer clients"
                ));
            }
            eprintln!(
                "starting {number} virtual clients ({start_rate}/s), keys in {}",
                writeback_dir.display()
            );
            let times = stats
                .as_ref()
                .map(|_| Arc::new(crate::agent::ServiceTimes::default()));
            let pool = crate::agent::spawn_pool(
                &cfg,
                &writeback_dir,
                first..first + number,
                start_rate,
                &hostname_prefix,
                crate::env::Env::real(),
                times.clone(),
            )?;
            if let (Some(path), Some(times)) = (stats, times) {
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        let text = times.to_json().to_string();
                        let p = path.clone();
                        let r = tokio::task::spawn_blocking(move || {
                            crate::fsutil::write_atomic(&p, text.as_bytes(), 0o644)
                        })
                        .await;
                        if let Ok(Err(e)) = r {
                            tracing::error!(file = %path.display(), error = %e, "cannot write service times");
                        }
                    }
                });
            }
            tokio::select! {
                _ = pool => Ok(String::new()),
                _ = shutdown_signal() => Ok("pool-client stopped".into()),
            }
        }
        Command::Bench {
            scenario,
            clients,
            rows,
            latency_ms,
            pause_ms,
            outage_s,
            volume,
            minions,
            start_rate,
            rate,
            seconds,
            keys,
            json,
        } => {
            init_logging("warn");
            let o = crate::cli::bench::BenchOptions {
                scenario,
                clients: clients.unwrap_or_else(|| scenario.default_clients()),
                start_rate,
                keys: keys.unwrap_or_else(crate::cli::bench::default_key_dir),
                rows,
                latency_ms,
                pause_ms,
                outage_s,
                volume,
                minions,
                rate,
                seconds,
            };
            let v = crate::cli::bench::run(&o).await?;
            Ok(if json {
                v.to_string()
            } else {
                crate::cli::bench::table(&v)
            })
        }
        Command::Demo { minions, clients } => {
            init_logging("warn");
            crate::cli::demo::run(minions, clients, shutdown_signal()).await
        }
        Command::Clients {
            command:
                ClientsCommand::Search {
                    query,
                    sort,
                    descending,
                    json,
                },
        } => {
            init_logging("warn");
            let r = api(api_config.as_deref())
                .await?
                .search_sorted(&query, &sort, descending)
                .await?;
            if json {
                let v: Vec<_> = r.clients.iter().map(client_json).collect();
                return Ok(serde_json::to_string_pretty(&v).expect("JSON"));
            }
            Ok(show::clients(&r, &query, &times()?))
        }
        Command::Label { command } => {
            init_logging("warn");
            let (client, label, remove, json) = match command {
                LabelCommand::Add {
                    client_id,
                    label,
                    json,
                } => (client_id, label, false, json),
                LabelCommand::Remove {
                    client_id,
                    label,
                    json,
                } => (client_id, label, true, json),
            };
            let c = api(api_config.as_deref())
                .await?
                .label(&client, &label, remove)
                .await?;
            Ok(if json {
                serde_json::to_string_pretty(&client_json(&c)).expect("JSON")
            } else {
                format!("{} labels: [{}]", c.client_id, c.labels.join(","))
            })
        }
        Command::Collect {
            client_id,
            artifact,
            params,
            wait,
            timeout_s,
            json,
        } => {
            init_logging("warn");
            let params = parse_params(&params)?;
            // Refuse bad input before talking to the server.
            check_locally(&artifact, &params)?;
            let mut a = api(api_config.as_deref()).await?;
            let mut f = a.collect(&client_id, &artifact, params).await?;
            if wait {
                f = a
                    .wait(
                        &client_id,
                        &f.flow_id,
                        std::time::Duration::from_secs(timeout_s),
                    )
                    .await?;
            }
            Ok(flow_out(&f, json, &times()?))
        }
        Command::Query {
            client_id,
            query,
            timeout_s,
            no_wait,
            json,
        } => {
            init_logging("warn");
            let t = times()?;
            let a = api(api_config.as_deref()).await?;
            let wait = (!no_wait).then(|| std::time::Duration::from_secs(timeout_s));
            crate::cli::analyst::query(a, &client_id, query, wait, json, &t).await
        }
        Command::Flow { command } => {
            init_logging("warn");
            let t = times()?;
            crate::cli::analyst::flow(api(api_config.as_deref()).await?, command, &t).await
        }
        Command::Artifacts { command } => {
            init_logging("warn");
            let mut a = api(api_config.as_deref()).await?;
            match command {
                ArtifactsCommand::List { json } => {
                    let list = a.artifacts().await?;
                    Ok(if json {
                        artifacts_json(&list)
                    } else {
                        artifacts_table(&list)
                    })
                }
                ArtifactsCommand::Add {
                    file,
                    replace,
                    json,
                } => {
                    let text = std::fs::read(&file)
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                    let text = String::from_utf8(text)
                        .map_err(|_| format!("{} is not UTF-8 text", file.display()))?;
                    // Refuse what this side can already tell is wrong, with a caret on a terminal.
                    let spec = crate::definitions::parse(&text).map_err(|e| {
                        format!("{}: the definition is refused: {e}", file.display())
                    })?;
                    if let Err(e) = crate::query::check_artifact(&spec, &Default::default()) {
                        let sql = spec
                            .sources
                            .iter()
                            .find(|s| e.source.as_deref() == Some(s.name.as_str()))
                            .or(spec.sources.first())
                            .map(|s| s.query.clone())
                            .unwrap_or_default();
                        return Err(format!("{}: {}", file.display(), query_error(&sql, &e)));
                    }
                    let info = a.add_artifact(text, replace).await?;
                    Ok(if json {
                        json_out(artifact_json(&info))
                    } else {
                        format!(
                            "artifact {} {} ({})",
                            info.name,
                            if replace { "stored" } else { "added" },
                            info.platforms.join(", ")
                        )
                    })
                }
                ArtifactsCommand::Show { name, json } => {
                    let info = a.artifact(&name).await?;
                    Ok(if json {
                        json_out(artifact_json(&info))
                    } else {
                        info.definition.trim_end().to_owned()
                    })
                }
                ArtifactsCommand::Remove { name, json } => {
                    a.remove_artifact(&name).await?;
                    Ok(if json {
                        json_out(serde_json::json!({ "removed": name }))
                    } else {
                        format!("artifact {name} removed")
                    })
                }
                ArtifactsCommand::Tables { json } => Ok(show::tables(json)),
            }
        }
        Command::Events { command } => {
            init_logging("warn");
            let t = times()?;
            let now = crate::clock::Clock::now(&crate::clock::SystemClock).as_ms();
            events::run(api(api_config.as_deref()).await?, command, &t, now).await
        }
        Command::Audit {
            command: AuditCommand::List { json },
        } => {
            init_logging("warn");
            let t = times()?;
            crate::cli::analyst::audit(api(api_config.as_deref()).await?, json, &t).await
        }
        Command::Cluster {
            command: ClusterCommand::Status { json },
        } => {
            init_logging("warn");
            let c = api(api_config.as_deref()).await?.cluster().await?;
            if json {
                let minions: Vec<_> = c
                    .minions
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "node": m.node,
                            "connected": m.connected,
                            "epoch": m.epoch,
                            "applied": m.applied,
                            "backlog_events": m.backlog_events,
                            "lag_ms": m.lag_ms,
                        })
                    })
                    .collect();
                let failures: Vec<_> = c
                    .volume_failures
                    .iter()
                    .map(|f| {
                        serde_json::json!({
                            "store": f.store,
                            "error": f.error,
                            "since_ms": f.since_unix_ms,
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "master": c.master,
                    "minions": minions,
                    "volume_failures": failures,
                });
                return Ok(serde_json::to_string_pretty(&v).expect("JSON"));
            }
            Ok(show::cluster(&c, &times()?))
        }
        Command::Hunt { command } => {
            init_logging("warn");
            use crate::cli::api_client::{Csv, hunt_json, parse_duration_s};
            let t = times()?;
            match command {
                HuntCommand::Create {
                    artifact,
                    query,
                    params,
                    labels,
                    exclude_labels,
                    os,
                    expires,
                    client_limit,
                    description,
                    json,
                } => {
                    let (artifact, params) = match query {
                        Some(q) => (artifacts::QUERY_ARTIFACT.to_owned(), query_artifact(q)?.0),
                        None => {
                            let artifact = artifact.unwrap_or_default();
                            let params = parse_params(&params)?;
                            check_locally(&artifact, &params)?;
                            (artifact, params)
                        }
                    };
                    let expires_in_s = expires
                        .as_deref()
                        .map(parse_duration_s)
                        .transpose()?
                        .unwrap_or(0);
                    let req = talon_proto::api::CreateHuntRequest {
                        artifact,
                        params: params.into_iter().collect(),
                        include_labels: labels,
                        exclude_labels,
                        os: os.unwrap_or_default(),
                        expires_in_s,
                        client_limit: client_limit.unwrap_or(0),
                        description,
                    };
                    let h = api(api_config.as_deref()).await?.create_hunt(req).await?;
                    Ok(if json {
                        serde_json::to_string_pretty(&hunt_json(&h)).expect("JSON")
                    } else {
                        h.hunt_id
                    })
                }
                HuntCommand::List { json } => {
                    let hs = api(api_config.as_deref()).await?.list_hunts().await?;
                    Ok(if json {
                        serde_json::to_string_pretty(&hs.iter().map(hunt_json).collect::<Vec<_>>())
                            .expect("JSON")
                    } else {
                        show::hunts(&hs, &t)
                    })
                }
                HuntCommand::Show { hunt_id, json } => {
                    let h = api(api_config.as_deref()).await?.hunt(&hunt_id).await?;
                    Ok(hunt_out(&h, json, &t))
                }
                HuntCommand::Watch { hunt_id, json } => {
                    let a = api(api_config.as_deref()).await?;
                    crate::cli::analyst::watch_hunt(a, &hunt_id, json, &t).await
                }
                HuntCommand::Stop { hunt_id, json } => {
                    let h = api(api_config.as_deref())
                        .await?
                        .stop_hunt(&hunt_id)
                        .await?;
                    Ok(hunt_out(&h, json, &t))
                }
                HuntCommand::Results {
                    hunt_id,
                    format,
                    raw,
                } => {
                    // Streamed: rows are written as their pages arrive, whatever the hunt's size.
                    let mut a = api(api_config.as_deref()).await?;
                    let mut out = Out::stdout();
                    if format == "csv" {
                        // The header is the union of every row's keys: a first pass learns them
                        // (memory: the key names), the second writes the rows.
                        let mut keys = std::collections::BTreeSet::new();
                        a.each_hunt_row(&hunt_id, |_, _, r| {
                            if let Some(o) = r.as_object() {
                                keys.extend(o.keys().cloned());
                            }
                            Ok(())
                        })
                        .await?;
                        let csv = Csv::new(keys, raw);
                        out.line(&csv.header())?;
                        let mut uncovered = 0u64;
                        a.each_hunt_row(&hunt_id, |c, f, r| {
                            let (line, covered) = csv.row(c, f, &r);
                            uncovered += u64::from(!covered);
                            out.line(&line)
                        })
                        .await?;
                        out.flush()?;
                        if uncovered > 0 {
                            eprintln!(
                                "talon: {uncovered} rows stored while exporting have columns the \
                                 header lacks (the hunt is still running); export again, or use \
                                 --format jsonl"
                            );
                        }
                    } else {
                        a.each_hunt_row(&hunt_id, |c, f, mut r| {
                            if let Some(o) = r.as_object_mut() {
                                o.insert("client_id".into(), c.into());
                                o.insert("flow_id".into(), f.into());
                            }
                            out.line(&r.to_string())
                        })
                        .await?;
                        out.flush()?;
                    }
                    Ok(String::new())
                }
            }
        }
        Command::Config { .. } | Command::User { .. } | Command::Package { .. } => {
            unreachable!("handled synchronously")
        }
    }
}

fn refuse_overwrite(path: &Path, force: bool) -> Result<(), String> {
    if path.exists() && !force {
        return Err(format!(
            "{} exists; pass --force to overwrite it (its keys will be lost)",
            path.display()
        ));
    }
    Ok(())
}

/// `talon package deb`: the packages of the deployment `config_path` describes.
fn run_package(config_path: &Path, command: PackageCommand) -> Result<String, String> {
    use crate::deploy::package;
    let PackageCommand::Deb { out, client, json } = command;
    // Read once: the packages carry this text as it is (comments and all).
    let text = std::fs::read_to_string(config_path)
        .map_err(|e| format!("{}: cannot read: {e}", config_path.display()))?;
    let cfg = ServerConfig::parse(&text).map_err(|message| {
        config::ConfigError {
            path: Some(config_path.to_owned()),
            message,
        }
        .to_string()
    })?;
    let binary = std::env::current_exe()
        .map_err(|e| format!("cannot find the running talon binary to package: {e}"))?;
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: cannot create: {e}", out.display()))?;
    let mut man_page = Vec::new();
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
        .render(&mut man_page)
        .map_err(|e| format!("the manual page: {e}"))?;
    let inputs = package::Inputs {
        man_page: &man_page,
        binary: &binary,
        version: env!("CARGO_PKG_VERSION"),
        arch: package::debian_arch()?,
        mtime: crate::clock::Clock::now(&SystemClock).as_ms() / 1000,
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this talon is a debug build: its packages are large and unstripped (Debian's \
             lintian refuses them); package from `cargo build --release`"
        );
    }
    eprintln!(
        "packaging {} ({} MB) into {}",
        binary.display(),
        std::fs::metadata(&binary).map_or(0, |m| m.len() >> 20),
        out.display()
    );
    let built = if client {
        vec![package::client_package(
            &cfg.client_config(),
            &inputs,
            &out,
        )?]
    } else {
        package::server_packages(&cfg, text.as_bytes(), &inputs, &out)?
    };
    if json {
        return Ok(json_out(serde_json::json!(built)));
    }
    let mut s = String::new();
    for b in &built {
        s.push_str(&format!(
            "{}  {} {} ({} KiB)\n",
            b.path.display(),
            b.role,
            b.node,
            b.bytes >> 10
        ));
    }
    s.push_str(if client {
        "install on each endpoint: dpkg -i <file> (the agent starts and enrols)\n"
    } else {
        "install each on its node's machine, with the shared volume mounted: dpkg -i <file>\n"
    });
    Ok(s)
}

fn need_config(config: Option<&Path>) -> Result<&Path, String> {
    config.ok_or_else(|| "this command needs --config server.config.yaml".to_string())
}

fn run_config(config_path: Option<&Path>, command: ConfigCommand) -> Result<String, String> {
    match command {
        ConfigCommand::Generate {
            hostname,
            frontend_port,
            api_port,
            gui_port,
            monitoring_port,
            datastore,
            out_dir,
            force,
            key_type,
            json,
        } => {
            let server = out_dir.join("server.config.yaml");
            let client = out_dir.join("client.config.yaml");
            refuse_overwrite(&server, force)?;
            refuse_overwrite(&client, force)?;
            std::fs::create_dir_all(&out_dir)
                .map_err(|e| format!("{}: cannot create: {e}", out_dir.display()))?;
            let opts = config::GenerateOptions {
                hostname,
                frontend_port,
                api_port,
                gui_port,
                monitoring_port,
                datastore,
                key_type,
            };
            let c = config::generate(&opts, &SystemClock, &OsEntropy::default())
                .map_err(|e| e.to_string())?;
            config::write_yaml(&server, &c).map_err(|e| e.to_string())?;
            config::write_yaml(&client, &c.client_config()).map_err(|e| e.to_string())?;
            if json {
                return Ok(json_out(serde_json::json!({
                    "server_config": server,
                    "client_config": client,
                    "key_type": key_type.to_string(),
                })));
            }
            Ok(format!(
                "wrote {} (keep it private: it holds the CA key) and {}",
                server.display(),
                client.display()
            ))
        }
        ConfigCommand::Frontend { add, json } => {
            let path = need_config(config_path)?;
            let mut c = ServerConfig::load(path).map_err(|e| e.to_string())?;
            let adds = add
                .iter()
                .map(|a| config::parse_host_port(a))
                .collect::<Result<Vec<_>, _>>()?;
            let change = config::add_frontends(&mut c, &adds, &SystemClock)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            config::write_yaml(path, &c).map_err(|e| e.to_string())?;
            let client = path.with_file_name("client.config.yaml");
            config::write_yaml(&client, &c.client_config()).map_err(|e| e.to_string())?;
            if json {
                return Ok(json_out(serde_json::json!({
                    "added": change.added,
                    "already_present": change.already_present,
                    "server_config": path,
                    "client_config": client,
                    "frontends": c.client.server_urls.len(),
                })));
            }
            let mut out = String::new();
            for n in &change.added {
                out.push_str(&format!("added minion {n} (its node name)\n"));
            }
            for n in &change.already_present {
                out.push_str(&format!("minion {n} was already configured\n"));
            }
            out.push_str(&format!(
                "rewrote {} and {} (clients now use {} frontends); reissued the frontend certificate",
                path.display(),
                client.display(),
                c.client.server_urls.len()
            ));
            Ok(out)
        }
        ConfigCommand::RotateCa {
            finish,
            key_type,
            json,
        } => {
            let path = need_config(config_path)?;
            let mut c = ServerConfig::load(path).map_err(|e| e.to_string())?;
            let step = if finish {
                config::CaRotation::Finish
            } else {
                config::CaRotation::Begin(key_type)
            };
            config::rotate_ca(&mut c, step, &SystemClock)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            config::write_yaml(path, &c).map_err(|e| e.to_string())?;
            let client = path.with_file_name("client.config.yaml");
            config::write_yaml(&client, &c.client_config()).map_err(|e| e.to_string())?;
            if json {
                return Ok(json_out(serde_json::json!({
                    "step": if finish { "finished" } else { "begun" },
                    "server_config": path,
                    "client_config": client,
                })));
            }
            Ok(if finish {
                format!(
                    "rotation finished: the frontend certificate is reissued by the new CA and the old \
                     CA is no longer trusted. Copy {} to every node and restart them, then give every \
                     agent {}; API users issued before the rotation began need new certificates \
                     (config api-client)",
                    path.display(),
                    client.display()
                )
            } else {
                format!(
                    "rotation begun: a new CA signs from now on; the old CA stays trusted. Copy {} to \
                     every node and restart them, give every agent {} (it trusts both CAs), issue API \
                     users new certificates (config api-client), then run `config rotate-ca --finish`",
                    path.display(),
                    client.display()
                )
            })
        }
        ConfigCommand::ApiClient {
            name,
            role,
            out,
            force,
            json,
        } => {
            let path = need_config(config_path)?;
            refuse_overwrite(&out, force)?;
            let c = ServerConfig::load(path).map_err(|e| e.to_string())?;
            let api = config::api_user(&c, &name, role, &SystemClock)?;
            config::write_yaml(&out, &api).map_err(|e| e.to_string())?;
            if json {
                return Ok(json_out(serde_json::json!({
                    "api_config": out,
                    "user": name,
                    "role": role,
                    "api_connection_string": api.api_connection_string,
                })));
            }
            Ok(format!(
                "wrote {} for API user {name:?}, role {role} (connects to {})",
                out.display(),
                api.api_connection_string
            ))
        }
    }
}

/// A JSON value as printed by `--json`.
fn json_out(v: serde_json::Value) -> String {
    serde_json::to_string_pretty(&v).expect("JSON values serialise")
}

/// Artifacts as a JSON array of `{name, description, builtin, platforms, params: [{name, kind,
/// default, description}]}`.
pub fn artifacts_json(list: &[talon_proto::api::ArtifactInfo]) -> String {
    let list: Vec<serde_json::Value> = list.iter().map(artifact_json).collect();
    serde_json::to_string_pretty(&list).expect("JSON values always serialise")
}

/// One artifact as JSON (see [`artifacts_json`]).
pub fn artifact_json(a: &talon_proto::api::ArtifactInfo) -> serde_json::Value {
    let params: Vec<serde_json::Value> = a
        .params
        .iter()
        .map(|p| {
            let mut v = serde_json::json!({
                "name": p.name,
                "kind": p.kind,
                "default": p.default,
                "description": p.description,
            });
            if p.kind == "int" {
                v["min"] = p.min.into();
                v["max"] = p.max.into();
            }
            v
        })
        .collect();
    let mut v = serde_json::json!({
        "name": a.name,
        "description": a.description,
        "builtin": a.builtin,
        "event": a.event,
        "platforms": a.platforms,
        "params": params,
    });
    if !a.definition.is_empty() {
        v["definition"] = a.definition.clone().into();
    }
    v
}

/// Artifacts as a readable list.
pub fn artifacts_table(list: &[talon_proto::api::ArtifactInfo]) -> String {
    let mut s = String::new();
    for a in list {
        let origin = match (a.builtin, a.event) {
            (true, false) => "built-in",
            (false, false) => "custom",
            (true, true) => "built-in event artifact",
            (false, true) => "custom event artifact",
        };
        s.push_str(&format!(
            "{}  ({origin}; {})\n    {}\n",
            a.name,
            a.platforms.join(", "),
            a.description
        ));
        for p in &a.params {
            let default = if p.default.is_empty() {
                "\"\""
            } else {
                &p.default
            };
            let kind = if p.kind == "int" {
                format!("int {}..={}", p.min, p.max)
            } else {
                p.kind.clone()
            };
            s.push_str(&format!(
                "    --param {}=<{kind}>  (default {default})  {}\n",
                p.name, p.description
            ));
        }
    }
    s.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lists_every_artifact_with_its_params() {
        let v: serde_json::Value =
            serde_json::from_str(&artifacts_json(&crate::definitions::builtin_infos())).unwrap();
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        for required in [
            "Generic.Client.Info",
            "Linux.Sys.Pslist",
            "Generic.Forensic.FileFinder",
            "Linux.Network.Netstat",
            "Linux.Sys.Users",
            "Generic.Test.Rows",
        ] {
            assert!(names.contains(&required), "{required} missing");
        }
        let rows = v
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "Generic.Test.Rows")
            .unwrap();
        let params: Vec<&str> = rows["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            params,
            vec!["count", "size", "pause_ms", "uploads", "upload_size"]
        );
    }

    #[test]
    fn table_shows_params_with_kinds_and_defaults() {
        let t = artifacts_table(&crate::definitions::builtin_infos());
        assert!(
            t.contains("--param count=<int 0..=10000000>  (default 10)"),
            "{t}"
        );
        assert!(t.contains("--param upload=<bool>  (default false)"), "{t}");
    }

    #[test]
    fn cli_parses_the_contract_spelling() {
        let cli = Cli::try_parse_from(["talon", "artifacts", "list", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Artifacts {
                command: ArtifactsCommand::List { json: true }
            }
        ));
        assert!(Cli::try_parse_from(["talon", "artifacts", "frobnicate"]).is_err());
    }
}
