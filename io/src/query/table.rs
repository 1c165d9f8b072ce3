//! What an endpoint table is: its osquery name and columns, the platforms it exists on, which
//! columns a query must constrain, and the function that makes its rows from the constraints the
//! query gave (docs/artifacts.md, "Tables").

use std::fmt;

/// A column's SQL type, as osquery declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    /// Text.
    Text,
    /// A 32-bit integer.
    Integer,
    /// A 64-bit integer.
    Bigint,
    /// A floating-point number.
    Double,
}

impl Type {
    /// The type as declared to SQLite and shown in the docs.
    pub fn sql(self) -> &'static str {
        match self {
            Type::Text => "TEXT",
            Type::Integer => "INTEGER",
            Type::Bigint => "BIGINT",
            Type::Double => "DOUBLE",
        }
    }
}

/// One column.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    /// Its name (osquery's).
    pub name: &'static str,
    /// Its type.
    pub ty: Type,
    /// A `LIKE` constraint on it is passed to the table (a pattern the table expands itself, as
    /// `file.path LIKE '/etc/%'`); otherwise only `=` and `IN` are.
    pub pattern: bool,
    /// One line for docs/artifacts.md and `talon tables`.
    pub description: &'static str,
}

/// Shorthand for a column table.
pub const fn col(name: &'static str, ty: Type, description: &'static str) -> Column {
    Column {
        name,
        ty,
        pattern: false,
        description,
    }
}

/// A column that takes `LIKE` patterns.
pub const fn pattern_col(name: &'static str, description: &'static str) -> Column {
    Column {
        name,
        ty: Type::Text,
        pattern: true,
        description,
    }
}

/// A value in a row or a constraint.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Real(f64),
    /// Text.
    Text(String),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(v.into())
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Real(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(v.into())
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Int(v) => write!(f, "{v}"),
            Value::Real(v) => write!(f, "{v}"),
            Value::Text(v) => f.write_str(v),
        }
    }
}

/// How a constraint compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `=` (and each value of `IN`).
    Eq,
    /// `LIKE` (only on [`Column::pattern`] columns).
    Like,
}

/// The constraints a query put on a table, as far as the table is told of them. SQLite checks
/// every constraint again on the rows a table makes, so a table may use them only to make fewer
/// rows (to read one process, or expand one pattern) and may ignore any it cannot use.
#[derive(Clone, Debug, Default)]
pub struct Constraints {
    /// `(column index, op, value)`.
    pub all: Vec<(usize, Op, Value)>,
}

impl Constraints {
    /// The text values a column is compared with by `op`.
    pub fn text(&self, column: usize, op: Op) -> Vec<String> {
        self.all
            .iter()
            .filter(|(c, o, _)| *c == column && *o == op)
            .filter_map(|(_, _, v)| match v {
                Value::Text(s) => Some(s.clone()),
                Value::Int(i) => Some(i.to_string()),
                _ => None,
            })
            .collect()
    }

    /// The integer values a column must equal (text that is a number counts).
    pub fn ints(&self, column: usize) -> Vec<i64> {
        self.all
            .iter()
            .filter(|(c, o, _)| *c == column && *o == Op::Eq)
            .filter_map(|(_, _, v)| match v {
                Value::Int(i) => Some(*i),
                Value::Text(s) => s.trim().parse().ok(),
                _ => None,
            })
            .collect()
    }

    /// True if some constraint on `column` was given.
    pub fn has(&self, column: usize) -> bool {
        self.all.iter().any(|(c, _, _)| *c == column)
    }
}

/// A table made more rows than one scan may ([`SCAN_ROWS_MAX`]), or could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct TableError(pub String);

/// Most rows one scan of a table makes (one `filter`: a whole table, or what one constraint
/// value selects); beyond it the query fails, naming the table, rather than hold them all.
pub const SCAN_ROWS_MAX: usize = 100_000;

/// Where a table's rows go; refuses beyond [`SCAN_ROWS_MAX`].
pub struct Rows<'a> {
    table: &'static str,
    width: usize,
    out: &'a mut Vec<Vec<Value>>,
}

impl<'a> Rows<'a> {
    /// Rows of `table` (of `width` columns) into `out`.
    pub fn new(table: &'static str, width: usize, out: &'a mut Vec<Vec<Value>>) -> Rows<'a> {
        Rows { table, width, out }
    }

    /// Adds one row: its values in column order (missing ones are NULL, extra ones a bug).
    pub fn push(&mut self, mut row: Vec<Value>) -> Result<(), TableError> {
        debug_assert!(
            row.len() <= self.width,
            "{}: a row of {}",
            self.table,
            row.len()
        );
        if self.out.len() >= SCAN_ROWS_MAX {
            return Err(TableError(format!(
                "table {} made more than {SCAN_ROWS_MAX} rows for one scan; narrow the query's \
                 WHERE clause",
                self.table
            )));
        }
        row.resize(self.width, Value::Null);
        self.out.push(row);
        Ok(())
    }
}

/// Makes a table's rows for the constraints given.
pub type Generate = fn(&Constraints, &mut Rows<'_>) -> Result<(), TableError>;

/// One endpoint table.
#[derive(Clone, Copy)]
pub struct TableDef {
    /// Its name (osquery's).
    pub name: &'static str,
    /// One line for the docs.
    pub description: &'static str,
    /// The platforms it exists on (`linux`, `windows`, `darwin`).
    pub platforms: &'static [&'static str],
    /// Its columns.
    pub columns: &'static [Column],
    /// Columns of which a query must constrain at least one (`=`, `IN`, or `LIKE` where the column
    /// takes patterns): the table cannot be listed whole (`file`: the whole filesystem).
    pub required: &'static [&'static str],
    /// Makes its rows.
    pub generate: Generate,
}

impl fmt::Debug for TableDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableDef")
            .field("name", &self.name)
            .finish()
    }
}

impl TableDef {
    /// The index of a column.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// True if column `i` is one of [`TableDef::required`].
    pub fn is_required(&self, i: usize) -> bool {
        self.required.contains(&self.columns[i].name)
    }

    /// The `CREATE TABLE` statement SQLite is given for it.
    pub fn schema(&self) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("\"{}\" {}", c.name, c.ty.sql()))
            .collect();
        format!("CREATE TABLE x({})", cols.join(", "))
    }

    /// What a query without a constraint on the required columns is told.
    pub fn needs(&self) -> String {
        let cols: Vec<String> = self
            .required
            .iter()
            .map(|r| {
                let takes_like = self.column(r).is_some_and(|i| self.columns[i].pattern);
                if takes_like {
                    format!("{r} (=, IN or LIKE)")
                } else {
                    format!("{r} (= or IN)")
                }
            })
            .collect();
        format!(
            "table {} needs a constraint in the WHERE clause (or a join) on {}",
            self.name,
            cols.join(" or ")
        )
    }
}
