//! Event tables (docs/events.md, "Event tables"): tables whose rows are things that happened — a
//! process started, a test event was made — rather than the state of the machine now. Only an
//! event artifact's query reads one, and it reads one *batch* at a time: the agent's event source
//! for the table collects what happened (`crate::agent::events`), then runs the artifact's query
//! with the table holding that batch ([`super::Engine::set_batch`]). Any other query sees an event
//! table refused by [`super::check_artifact`].

use super::table::{Constraints, Rows, TableDef, TableError, Type, col};

const LINUX: &[&str] = &["linux"];
const ALL: &[&str] = &["linux", "windows", "darwin"];

fn not_here(_: &Constraints, _: &mut Rows<'_>) -> Result<(), TableError> {
    Err(TableError(
        "an event table is read only by an event artifact's query (type: event), one batch of \
         events at a time"
            .into(),
    ))
}

/// `process_events`: the columns of one process start.
pub const PROCESS_EVENTS: TableDef = TableDef {
    name: "process_events",
    description: "Processes started (event table: found by a scan of /proc each second, so a \
                  process that ends within a second of starting may be missed).",
    platforms: LINUX,
    columns: &[
        col("pid", Type::Bigint, "Process id."),
        col("parent", Type::Bigint, "Parent process id."),
        col("name", Type::Text, "The process's name (comm)."),
        col("path", Type::Text, "Path to the executable."),
        col("cmdline", Type::Text, "Complete argument string."),
        col("cwd", Type::Text, "Working directory."),
        col("uid", Type::Bigint, "Real user id."),
        col("gid", Type::Bigint, "Real group id."),
        col("euid", Type::Bigint, "Effective user id."),
        col("egid", Type::Bigint, "Effective group id."),
        col(
            "time",
            Type::Bigint,
            "When it started, seconds since the Unix epoch.",
        ),
    ],
    required: &[],
    generate: not_here,
};

/// `talon_test_events`: synthetic events at a set rate, for load tests.
pub const TEST_EVENTS: TableDef = TableDef {
    name: "talon_test_events",
    description: "Synthetic events made at the rate the artifact's parameter `rate` names (per \
                  second, default 10), for load tests (event table).",
    platforms: ALL,
    columns: &[
        col(
            "time",
            Type::Bigint,
            "When it was made, seconds since the Unix epoch.",
        ),
        col(
            "time_ms",
            Type::Bigint,
            "When it was made, ms since the Unix epoch.",
        ),
        col(
            "n",
            Type::Bigint,
            "Its number: 0, 1, 2, ... since the source started.",
        ),
        col(
            "payload",
            Type::Text,
            "Filler text of the size `payload_bytes` names (default 0).",
        ),
    ],
    required: &[],
    generate: not_here,
};

/// `file_events`: changes to files under the paths an artifact names (inotify).
pub const FILE_EVENTS: TableDef = TableDef {
    name: "file_events",
    description: "Files created, modified, deleted and moved under the paths the artifact's \
                  parameter `paths` names (comma-separated absolute paths; a directory's entries \
                  are watched, and with `recursive` true its subdirectories') (event table: \
                  inotify).",
    platforms: LINUX,
    columns: &[
        col("target_path", Type::Text, "The file changed."),
        col(
            "action",
            Type::Text,
            "CREATED, UPDATED (written and closed, or modified), DELETED, MOVED_FROM, MOVED_TO, \
             ATTRIBUTES_MODIFIED, or OVERFLOW (the kernel's queue overflowed: changes were lost, \
             target_path empty).",
        ),
        col("is_dir", Type::Integer, "1 if it is a directory."),
        col(
            "transaction_id",
            Type::Bigint,
            "Pairs a MOVED_FROM with its MOVED_TO (0 otherwise).",
        ),
        col(
            "size",
            Type::Bigint,
            "Its size when the change was read (-1 if gone).",
        ),
        col(
            "time",
            Type::Bigint,
            "When the change was read, seconds since the Unix epoch.",
        ),
    ],
    required: &[],
    generate: not_here,
};

/// `socket_events`: sockets that appeared.
pub const SOCKET_EVENTS: TableDef = TableDef {
    name: "socket_events",
    description: "TCP sockets that started listening or were connected, and UDP sockets bound \
                  (event table: found by comparing /proc/net each second, so a connection that \
                  lives less than a second may be missed).",
    platforms: LINUX,
    columns: &[
        col(
            "action",
            Type::Text,
            "listen, accept (established on a listening port), connect (established otherwise) \
             or bind (UDP).",
        ),
        col(
            "pid",
            Type::Integer,
            "Owning process (-1 if not visible to the agent).",
        ),
        col("path", Type::Text, "The owning process's executable."),
        col(
            "fd",
            Type::Bigint,
            "File descriptor in the process (-1 if unknown).",
        ),
        col("family", Type::Integer, "2 (IPv4) or 10 (IPv6)."),
        col("protocol", Type::Integer, "6 (TCP) or 17 (UDP)."),
        col("local_address", Type::Text, "Local address."),
        col("remote_address", Type::Text, "Remote address."),
        col("local_port", Type::Integer, "Local port."),
        col("remote_port", Type::Integer, "Remote port."),
        col("socket", Type::Bigint, "Socket inode."),
        col("uid", Type::Bigint, "The socket's owner."),
        col(
            "time",
            Type::Bigint,
            "When it was found, seconds since the Unix epoch.",
        ),
    ],
    required: &[],
    generate: not_here,
};

/// Every event table.
pub const TABLES: &[TableDef] = &[FILE_EVENTS, PROCESS_EVENTS, SOCKET_EVENTS, TEST_EVENTS];

/// True if `name` is an event table.
pub fn is_event_table(name: &str) -> bool {
    TABLES.iter().any(|t| t.name == name)
}
