//! One way to talk to either engine: the state's queries are written once (SQLite's `?N`
//! parameters; PostgreSQL gets `$N`), given [`Value`]s, and read back as [`Row`]s of values,
//! so that every method of [`crate::db::Db`] serves the embedded file and PostgreSQL alike.
//!
//! A row read from the state is input like any other: a value of the wrong type (a damaged
//! file, a hand-edited table) is an error naming the column, never a panic.

use anyhow::{Result, anyhow, bail};

/// A value given to, or read from, either engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    Bool(bool),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bytes(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The parameters of a query, each turned into a [`Value`].
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::sql::Value::from($v)),*][..] };
}
pub(crate) use params;

/// A row: its values by column, in the order the query names them.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value> {
        self.0.get(i).ok_or_else(|| anyhow!("the state database returned {} columns, not {}", self.0.len(), i + 1))
    }

    fn wrong(&self, i: usize, want: &str) -> anyhow::Error {
        anyhow!(
            "the state database holds a value that is not {want} in column {} of a row ({:?})",
            i + 1,
            self.0.get(i)
        )
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            Value::Bool(b) => Ok(Some(i64::from(*b))),
            _ => Err(self.wrong(i, "a number")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?.ok_or_else(|| self.wrong(i, "a number"))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            _ => Err(self.wrong(i, "text")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?.ok_or_else(|| self.wrong(i, "text"))
    }

    pub fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        match self.at(i)? {
            Value::Bytes(v) => Ok(v.clone()),
            _ => Err(self.wrong(i, "bytes")),
        }
    }

    pub fn bool(&self, i: usize) -> Result<bool> {
        match self.at(i)? {
            Value::Bool(b) => Ok(*b),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            _ => Err(self.wrong(i, "true or false")),
        }
    }
}

/// A connection, or a transaction, of either engine.
pub trait Conn {
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;
    /// Runs a statement; returns the rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64>;
}

/// A connection that counts the statements sent through it (each a round trip on PostgreSQL).
pub struct Counting<'a> {
    pub conn: &'a mut dyn Conn,
    pub count: &'a prometheus_client::metrics::counter::Counter,
}

impl Conn for Counting<'_> {
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        self.count.inc();
        self.conn.query(sql, params)
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        self.count.inc();
        self.conn.execute(sql, params)
    }
}

impl dyn Conn + '_ {
    /// The first row, if any.
    pub fn one(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    pub fn exists(&mut self, sql: &str, params: &[Value]) -> Result<bool> {
        Ok(!self.query(sql, params)?.is_empty())
    }

    /// A single number (a count).
    pub fn number(&mut self, sql: &str, params: &[Value]) -> Result<i64> {
        match self.one(sql, params)? {
            Some(r) => r.int(0),
            None => bail!("the state database returned no row for a count"),
        }
    }
}

// The embedded file.

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Bool(b) => ValueRef::Integer(i64::from(*b)),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

/// A SQLite connection (or transaction, which derefs to one).
pub struct Lite<'a>(pub &'a rusqlite::Connection);

impl Conn for Lite<'_> {
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let mut s = self.0.prepare_cached(sql)?;
        let n = s.column_count();
        let mut rows = s.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                use rusqlite::types::ValueRef;
                values.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Text(t) => Value::Text(
                        String::from_utf8(t.to_vec())
                            .map_err(|_| anyhow!("the state database holds text that is not UTF-8"))?,
                    ),
                    ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
                    ValueRef::Real(_) => bail!("the state database holds a real number where none belongs"),
                });
            }
            out.push(Row(values));
        }
        Ok(out)
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        Ok(self.0.prepare_cached(sql)?.execute(rusqlite::params_from_iter(params))? as u64)
    }
}

// PostgreSQL.

impl tokio_postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql_checked(ty, out),
            Value::Int(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql_checked(ty, out),
            Value::Int(v) => v.to_sql_checked(ty, out),
            Value::Bool(b) => b.to_sql_checked(ty, out),
            Value::Text(t) => t.to_sql_checked(ty, out),
            Value::Bytes(b) => b.to_sql_checked(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A row of PostgreSQL as [`Value`]s, by each column's type.
fn pg_row(r: &tokio_postgres::Row) -> Result<Row> {
    use tokio_postgres::types::Type;
    let mut values = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let t = column.type_();
        let v = if *t == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *t == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)?.map(|v| Value::Int(v.into()))
        } else if *t == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)?.map(|v| Value::Int(v.into()))
        } else if *t == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)?.map(Value::Bool)
        } else if [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(t) {
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else if *t == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Bytes)
        } else {
            bail!("column {} ({}) is of type {t}, which the state never holds", i + 1, column.name());
        };
        values.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

/// `sql` written for SQLite (`?N` parameters) as PostgreSQL takes it (`$N`).
pub fn dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// How long one statement may take on PostgreSQL before it counts as failed: a database that
/// stops answering (a partition, a dead host) never holds a server's threads for ever.
pub const PG_STATEMENT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `f` to its end from a thread that is not one of the runtime's (the blocking pool, or
/// a command's own thread), within [`PG_STATEMENT`].
pub fn wait<T>(
    handle: &tokio::runtime::Handle,
    shown: &str,
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    handle.block_on(async {
        match tokio::time::timeout(PG_STATEMENT, f).await {
            Ok(r) => r.map_err(|e| pg_error(shown, &e)),
            Err(_) => Err(anyhow!("PostgreSQL at {shown} did not answer within {} s", PG_STATEMENT.as_secs())),
        }
    })
}

/// A PostgreSQL error as an operator reads it: what the server said, and where.
pub fn pg_error(shown: &str, e: &tokio_postgres::Error) -> anyhow::Error {
    match e.as_db_error() {
        Some(db) => anyhow!("PostgreSQL at {shown}: {} ({})", db.message(), db.code().code()),
        None => anyhow!("PostgreSQL at {shown}: {e}"),
    }
}

/// A PostgreSQL connection or transaction, driven from a blocking thread.
pub struct PgConn<'a, C> {
    pub client: &'a C,
    pub handle: &'a tokio::runtime::Handle,
    pub shown: &'a str,
}

impl<C: deadpool_postgres::GenericClient + Sync> Conn for PgConn<'_, C> {
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let sql = dollars(sql);
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let rows = wait(self.handle, self.shown, async {
            let statement = self.client.prepare_cached(&sql).await?;
            self.client.query(&statement, &refs).await
        })?;
        rows.iter().map(pg_row).collect()
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let sql = dollars(sql);
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        wait(self.handle, self.shown, async {
            let statement = self.client.prepare_cached(&sql).await?;
            self.client.execute(&statement, &refs).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_of_the_wrong_type_is_an_error_naming_its_column_never_a_panic() {
        let r = Row(vec![Value::Text("x".into()), Value::Null, Value::Int(1), Value::Int(7)]);
        assert!(r.int(0).unwrap_err().to_string().contains("column 1"));
        assert_eq!(r.opt_int(1).unwrap(), None);
        assert!(r.int(1).is_err(), "NULL where a number must be");
        assert!(r.bool(2).unwrap());
        assert!(r.bool(3).is_err(), "7 is not a boolean");
        assert!(r.text(9).unwrap_err().to_string().contains("4 columns"));
        assert_eq!(dollars("a = ?1 AND b = ?12 OR c = '?'"), "a = $1 AND b = $12 OR c = '?'");
    }
}
