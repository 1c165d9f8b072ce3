//! The endpoint tables as SQLite virtual tables (eponymous-only: they exist in every connection
//! without `CREATE VIRTUAL TABLE`). One module type serves every table; the table it is comes
//! with its registration.
//!
//! This is the only code in Talon that is `unsafe`: rusqlite's virtual-table traits are unsafe to
//! implement because SQLite casts between its C structs and ours. Their contract, kept here: each
//! implementing struct is `#[repr(C)]` and begins with the SQLite base struct
//! (`sqlite3_vtab` / `sqlite3_vtab_cursor`). Nothing else here is unsafe.
#![allow(unsafe_code)]

use super::cache::{HOSTNAME_COLUMNS, Host, Scan};
use super::table::{Constraints, Op, Rows, TableDef, Value};
use rusqlite::types::Value as SqlValue;
use rusqlite::vtab::{
    Context, Filters, IndexConstraintOp, IndexInfo, Module, VTab, VTabConfig, VTabConnection,
    VTabCursor, sqlite3_vtab, sqlite3_vtab_cursor,
};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ffi::{CStr, CString, c_int};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

/// What a table's registration carries.
pub struct Aux {
    /// The table.
    pub def: &'static TableDef,
    /// Tables that refused a query plan for lack of a required constraint (to name them when no
    /// plan is left).
    pub refused: Arc<Mutex<BTreeSet<&'static str>>>,
    /// Whose machine it reads.
    pub host: Host,
    /// For an event table: the batch it holds (docs/events.md).
    pub batch: Option<super::Batch>,
}

/// The module every table is registered with.
pub const MODULE: Module<'static, Tab> = Module::eponymous_only_module();

/// A table in one connection.
#[repr(C)]
pub struct Tab {
    /// SQLite's part: must be first (the trait's safety contract).
    base: sqlite3_vtab,
    def: &'static TableDef,
    refused: Arc<Mutex<BTreeSet<&'static str>>>,
    host: Host,
    batch: Option<super::Batch>,
}

fn module_error(e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ModuleError(e.to_string())
}

// SAFETY: `Tab` is `#[repr(C)]` and begins with `sqlite3_vtab`.
unsafe impl<'vtab> VTab<'vtab> for Tab {
    type Aux = Aux;
    type Cursor = Cursor<'vtab>;

    fn connect(
        db: &mut VTabConnection,
        aux: Option<&Aux>,
        _module_name: &[u8],
        _database_name: &[u8],
        _table_name: &[u8],
        _args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Tab)> {
        let aux = aux.ok_or_else(|| module_error("a table registered without its definition"))?;
        // Not usable from triggers or views (which a query cannot create anyway).
        db.config(VTabConfig::DirectOnly)?;
        let schema = CString::new(aux.def.schema()).map_err(module_error)?;
        Ok((
            Cow::Owned(schema),
            Tab {
                base: sqlite3_vtab::default(),
                def: aux.def,
                refused: aux.refused.clone(),
                host: aux.host.clone(),
                batch: aux.batch.clone(),
            },
        ))
    }

    /// Passes every usable `=` (and `IN`) constraint, and `LIKE` on pattern columns, to the table
    /// (SQLite checks them all again on the rows made); refuses the plan when none is on a
    /// required column, so SQLite looks for a join order that provides one.
    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        let def = self.def;
        let mut passed: Vec<(usize, usize, Op)> = Vec::new();
        for (i, c) in info.constraints().enumerate() {
            let Ok(col) = usize::try_from(c.column()) else {
                continue; // The rowid.
            };
            if !c.is_usable() || col >= def.columns.len() {
                continue;
            }
            let op = match c.operator() {
                IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_EQ => Op::Eq,
                IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_LIKE if def.columns[col].pattern => {
                    Op::Like
                }
                _ => continue,
            };
            passed.push((i, col, op));
        }
        let required_met =
            def.required.is_empty() || passed.iter().any(|(_, col, _)| def.is_required(*col));
        if !required_met {
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(def.name);
            return Ok(false);
        }
        let mut idx = String::new();
        for (n, (i, col, op)) in passed.iter().enumerate() {
            let mut usage = info.constraint_usage(*i);
            usage.set_argv_index(c_int::try_from(n + 1).map_err(module_error)?);
            // Not omitted: SQLite tests the constraint again (LIKE's exact semantics included).
            usage.set_omit(false);
            idx.push(if *op == Op::Like { 'l' } else { 'e' });
            idx.push_str(&col.to_string());
            idx.push(',');
        }
        info.set_idx_str(&idx);
        // Fewer rows with more constraints; a whole-table scan is the dearest.
        let cost = if passed.is_empty() {
            1e6
        } else {
            100.0 / passed.len() as f64
        };
        info.set_estimated_cost(cost);
        Ok(true)
    }

    fn open(&'vtab mut self) -> rusqlite::Result<Cursor<'vtab>> {
        let (hostname, host_columns) = match &self.host {
            Host::Real => (None, Vec::new()),
            Host::Virtual { hostname, .. } => {
                let cols = HOSTNAME_COLUMNS
                    .iter()
                    .filter(|(t, _)| *t == self.def.name)
                    .filter_map(|(_, c)| self.def.column(c))
                    .collect();
                (Some(hostname.clone()), cols)
            }
        };
        Ok(Cursor {
            base: sqlite3_vtab_cursor::default(),
            def: self.def,
            host: self.host.clone(),
            batch: self.batch.clone(),
            rows: Arc::new(Vec::new()),
            at: 0,
            hostname,
            host_columns,
            phantom: PhantomData,
        })
    }
}

/// A scan of a table: the rows one `filter` made.
#[repr(C)]
pub struct Cursor<'vtab> {
    /// SQLite's part: must be first (the trait's safety contract).
    base: sqlite3_vtab_cursor,
    def: &'static TableDef,
    host: Host,
    batch: Option<super::Batch>,
    rows: Scan,
    at: usize,
    /// A virtual agent's host name, shown in `host_columns`.
    hostname: Option<Arc<str>>,
    host_columns: Vec<usize>,
    phantom: PhantomData<&'vtab Tab>,
}

fn value(v: SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => Value::Int(i),
        SqlValue::Real(r) => Value::Real(r),
        SqlValue::Text(t) => Value::Text(t),
        SqlValue::Blob(b) => Value::Text(String::from_utf8_lossy(&b).into_owned()),
    }
}

// SAFETY: `Cursor` is `#[repr(C)]` and begins with `sqlite3_vtab_cursor`.
unsafe impl VTabCursor for Cursor<'_> {
    fn filter(
        &mut self,
        _idx_num: c_int,
        idx_str: Option<&str>,
        args: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        let mut c = Constraints::default();
        let specs = idx_str
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty());
        for (n, spec) in specs.enumerate() {
            let op = if spec.starts_with('l') {
                Op::Like
            } else {
                Op::Eq
            };
            let col: usize = spec[1..].parse().map_err(module_error)?;
            c.all.push((col, op, value(args.get::<SqlValue>(n)?)));
        }
        self.at = 0;
        let def = self.def;
        if let Some(batch) = &self.batch {
            // An event table: the batch it holds, if it is this table's (SQLite checks the
            // constraints on its rows).
            let held = batch.lock().unwrap_or_else(|p| p.into_inner());
            self.rows = match &*held {
                Some((table, rows)) if *table == def.name => rows.clone(),
                _ => Arc::new(Vec::new()),
            };
            return Ok(());
        }
        let make = || {
            let mut out = Vec::new();
            let mut rows = Rows::new(def.name, def.columns.len(), &mut out);
            (def.generate)(&c, &mut rows).map(|()| out)
        };
        self.rows = match &self.host {
            Host::Real => make().map(Arc::new),
            Host::Virtual { cache, .. } => {
                let key = format!(
                    "{}\u{0}{}\u{0}{:?}",
                    def.name,
                    idx_str.unwrap_or_default(),
                    c.all
                );
                cache.scan(key, make)
            }
        }
        .map_err(|e| module_error(e.0))?;
        Ok(())
    }

    fn next(&mut self) -> rusqlite::Result<()> {
        self.at += 1;
        Ok(())
    }

    fn eof(&self) -> bool {
        self.at >= self.rows.len()
    }

    fn column(&self, ctx: &mut Context, i: c_int) -> rusqlite::Result<()> {
        let i = usize::try_from(i).map_err(module_error)?;
        if let Some(h) = &self.hostname
            && self.host_columns.contains(&i)
        {
            return ctx.set_result(&**h);
        }
        match self.rows.get(self.at).and_then(|r| r.get(i)) {
            None | Some(Value::Null) => ctx.set_result(rusqlite::types::Null),
            Some(Value::Int(v)) => ctx.set_result(v),
            Some(Value::Real(v)) => ctx.set_result(v),
            Some(Value::Text(v)) => ctx.set_result(v),
        }
    }

    fn rowid(&self) -> rusqlite::Result<i64> {
        i64::try_from(self.at).map_err(module_error)
    }
}
