//! Whose machine a query reads: this one, or — for the virtual agents of `pool-client` and the
//! simulator, many in one process — this one through a cache the pool shares, so a query hunt
//! across a thousand virtual agents reads `/proc` about once a second, not a thousand times, and
//! each virtual agent still shows its own host name (docs/artifacts.md, "Virtual agents").

use super::table::{TableError, Value};
use crate::clock::Clock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How long a shared scan's rows are served again (ms).
pub const TABLE_CACHE_MS: u64 = 1000;
/// Scans kept at once; beyond, the expired and then the oldest are dropped.
pub const TABLE_CACHE_ENTRIES: usize = 64;
/// Largest scan kept (rows); a larger one is made for each query that asks.
pub const TABLE_CACHE_ROWS_MAX: usize = 20_000;

/// Columns that show the host's name, given a virtual agent's own.
pub const HOSTNAME_COLUMNS: &[(&str, &str)] = &[
    ("system_info", "hostname"),
    ("system_info", "computer_name"),
    ("system_info", "local_hostname"),
];

/// Whose machine a query reads.
#[derive(Clone, Default)]
pub enum Host {
    /// This machine, read at each scan.
    #[default]
    Real,
    /// A virtual agent: this machine's tables through a cache its pool shares, its own host name
    /// in [`HOSTNAME_COLUMNS`].
    Virtual {
        /// Its host name.
        hostname: Arc<str>,
        /// The pool's scans.
        cache: Arc<TableCache>,
    },
}

impl Host {
    /// A virtual agent's own host name (none for the real machine).
    pub fn hostname(&self) -> Option<&str> {
        match self {
            Host::Real => None,
            Host::Virtual { hostname, .. } => Some(hostname),
        }
    }
}

/// Rows of a scan, shared.
pub type Scan = Arc<Vec<Vec<Value>>>;

/// Table scans a pool of virtual agents shares: the rows of one (table, constraints) scan are
/// served for [`TABLE_CACHE_MS`]; at most [`TABLE_CACHE_ENTRIES`] scans of at most
/// [`TABLE_CACHE_ROWS_MAX`] rows each are kept.
pub struct TableCache {
    clock: Arc<dyn Clock>,
    scans: Mutex<HashMap<String, (u64, Scan)>>,
}

impl TableCache {
    /// An empty cache timed by `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Arc<TableCache> {
        Arc::new(TableCache {
            clock,
            scans: Mutex::new(HashMap::new()),
        })
    }

    /// The rows of scan `key`, made by `make` unless a fresh copy is kept. The lock is held while
    /// making them: a pool that asks at once waits for one scan instead of making its own.
    pub fn scan(
        &self,
        key: String,
        make: impl FnOnce() -> Result<Vec<Vec<Value>>, TableError>,
    ) -> Result<Scan, TableError> {
        let mut scans = self.scans.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.monotonic().0;
        if let Some((at, rows)) = scans.get(&key)
            && now.saturating_sub(*at) < TABLE_CACHE_MS
        {
            return Ok(rows.clone());
        }
        let rows = Arc::new(make()?);
        if rows.len() <= TABLE_CACHE_ROWS_MAX {
            if scans.len() >= TABLE_CACHE_ENTRIES && !scans.contains_key(&key) {
                scans.retain(|_, (at, _)| now.saturating_sub(*at) < TABLE_CACHE_MS);
                if scans.len() >= TABLE_CACHE_ENTRIES
                    && let Some(oldest) = scans.iter().min_by_key(|(_, (at, _))| *at)
                {
                    let oldest = oldest.0.clone();
                    scans.remove(&oldest);
                }
            }
            scans.insert(key, (now, rows.clone()));
        }
        Ok(rows)
    }

    /// Scans kept now.
    pub fn len(&self) -> usize {
        self.scans.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True if none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use talon_core::{Monotonic, Timestamp};

    struct Manual(AtomicU64);
    impl Clock for Manual {
        fn now(&self) -> Timestamp {
            Timestamp(self.0.load(Ordering::SeqCst))
        }
        fn monotonic(&self) -> Monotonic {
            Monotonic(self.0.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn a_scan_is_shared_until_it_expires_and_the_cache_is_bounded() {
        let clock = Arc::new(Manual(AtomicU64::new(0)));
        let cache = TableCache::new(clock.clone());
        let made = std::cell::Cell::new(0);
        let scan = |key: &str, rows: usize| {
            cache
                .scan(key.into(), || {
                    made.set(made.get() + 1);
                    Ok(vec![vec![Value::Int(1)]; rows])
                })
                .unwrap()
                .len()
        };
        assert_eq!(scan("processes", 3), 3);
        assert_eq!(scan("processes", 3), 3);
        assert_eq!(made.get(), 1, "served again within TABLE_CACHE_MS");
        clock.0.store(TABLE_CACHE_MS, Ordering::SeqCst);
        scan("processes", 3);
        assert_eq!(made.get(), 2, "made again once expired");
        // Too large to keep: made each time.
        scan("file", TABLE_CACHE_ROWS_MAX + 1);
        scan("file", TABLE_CACHE_ROWS_MAX + 1);
        assert_eq!(made.get(), 4);
        // At most TABLE_CACHE_ENTRIES scans; the oldest goes first.
        for i in 0..TABLE_CACHE_ENTRIES + 5 {
            clock.0.fetch_add(1, Ordering::SeqCst);
            scan(&format!("k{i}"), 1);
        }
        assert_eq!(cache.len(), TABLE_CACHE_ENTRIES);
        let before = made.get();
        scan(&format!("k{}", TABLE_CACHE_ENTRIES + 4), 1);
        assert_eq!(made.get(), before, "the newest is kept");
        scan("k0", 1);
        assert_eq!(made.get(), before + 1, "the oldest was dropped");
    }
}
