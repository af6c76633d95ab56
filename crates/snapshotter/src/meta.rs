//! Snapshot metadata in redb: one ACID write transaction per mutation, so a
//! crash leaves either the old or the new state, never a mix. Directories
//! without metadata (from a crash between mkdir and commit, or after a
//! Remove) are swept by `Cleanup`.
//!
//! Tables:
//! - `snapshots`: `"<namespace>\0<key>"` → JSON [`Record`] (actives, views and
//!   committed names share one key space per namespace, as in containerd);
//! - `counters`: `"next_id"` → the next directory id.

use crate::error::Result;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// The kind of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a committed parent.
    View,
    /// Writable snapshot.
    Active,
    /// Immutable layer.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// A UTC timestamp with nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ts {
    /// Seconds since the Unix epoch.
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

impl Ts {
    /// The current time.
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ts {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

/// Disk usage of a snapshot's `fs` directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes allocated (st_blocks × 512, hard links counted once).
    pub size: i64,
    /// Distinct inodes.
    pub inodes: i64,
}

/// What is stored per snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Directory id: `<root>/snapshots/<id>`.
    pub id: u64,
    /// Active, view or committed.
    pub kind: Kind,
    /// The parent's name (a committed snapshot in the same namespace), or "".
    pub parent: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created: Ts,
    /// Last update time.
    pub updated: Ts,
    /// Usage recorded at Commit (committed snapshots).
    #[serde(default)]
    pub usage: Option<Usage>,
}

fn db_key(ns: &str, key: &str) -> String {
    format!("{ns}\0{key}")
}

/// The redb database.
pub struct Store {
    db: redb::Database,
}

/// Read access inside a transaction.
pub trait Reader {
    /// Looks a snapshot up.
    fn get(&self, ns: &str, key: &str) -> Result<Option<Record>>;
    /// All snapshots of a namespace, by key.
    fn list(&self, ns: &str) -> Result<Vec<(String, Record)>>;
    /// Every directory id referenced, in all namespaces.
    fn all_ids(&self) -> Result<std::collections::HashSet<u64>>;
    /// Every snapshot of every namespace: (namespace, key, record).
    fn all(&self) -> Result<Vec<(String, String, Record)>>;
}

macro_rules! impl_reader {
    ($t:ty) => {
        impl Reader for $t {
            fn get(&self, ns: &str, key: &str) -> Result<Option<Record>> {
                match self.snaps.get(db_key(ns, key).as_str())? {
                    Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
                    None => Ok(None),
                }
            }
            fn list(&self, ns: &str) -> Result<Vec<(String, Record)>> {
                let lo = format!("{ns}\0");
                let hi = format!("{ns}\x01");
                let mut out = Vec::new();
                for item in self.snaps.range(lo.as_str()..hi.as_str())? {
                    let (k, v) = item?;
                    let key = k.value()[lo.len()..].to_string();
                    out.push((key, serde_json::from_slice(v.value())?));
                }
                Ok(out)
            }
            fn all(&self) -> Result<Vec<(String, String, Record)>> {
                let mut out = Vec::new();
                for item in self.snaps.iter()? {
                    let (k, v) = item?;
                    let (ns, key) = k.value().split_once('\0').unwrap_or(("", k.value()));
                    out.push((
                        ns.to_string(),
                        key.to_string(),
                        serde_json::from_slice(v.value())?,
                    ));
                }
                Ok(out)
            }
            fn all_ids(&self) -> Result<std::collections::HashSet<u64>> {
                let mut out = std::collections::HashSet::new();
                for item in self.snaps.iter()? {
                    let (_, v) = item?;
                    let r: Record = serde_json::from_slice(v.value())?;
                    out.insert(r.id);
                }
                Ok(out)
            }
        }
    };
}

/// A read transaction.
pub struct ReadTx {
    snaps: redb::ReadOnlyTable<&'static str, &'static [u8]>,
}
impl_reader!(ReadTx);

/// A write transaction's tables.
pub struct WriteTx<'t> {
    snaps: redb::Table<'t, &'static str, &'static [u8]>,
    counters: redb::Table<'t, &'static str, u64>,
}
impl_reader!(WriteTx<'_>);

impl WriteTx<'_> {
    /// Inserts or replaces a snapshot.
    pub fn put(&mut self, ns: &str, key: &str, rec: &Record) -> Result<()> {
        let v = serde_json::to_vec(rec)?;
        self.snaps.insert(db_key(ns, key).as_str(), v.as_slice())?;
        Ok(())
    }
    /// Deletes a snapshot.
    pub fn delete(&mut self, ns: &str, key: &str) -> Result<()> {
        self.snaps.remove(db_key(ns, key).as_str())?;
        Ok(())
    }
    /// Allocates a directory id.
    pub fn next_id(&mut self) -> Result<u64> {
        let id = self
            .counters
            .get("next_id")?
            .map(|v| v.value())
            .unwrap_or(1);
        self.counters.insert("next_id", id + 1)?;
        Ok(id)
    }
}

impl Store {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Store { db })
    }

    /// Runs `f` in a read transaction.
    pub fn read<T>(&self, f: impl FnOnce(&ReadTx) -> Result<T>) -> Result<T> {
        let tx = self.db.begin_read()?;
        let r = ReadTx {
            snaps: tx.open_table(SNAPSHOTS)?,
        };
        f(&r)
    }

    /// Runs `f` in a write transaction, committed only if `f` succeeds.
    /// Write transactions are serialized, so `f` also runs under the
    /// store's writer lock.
    pub fn write<T>(&self, f: impl FnOnce(&mut WriteTx<'_>) -> Result<T>) -> Result<T> {
        let tx = self.db.begin_write()?;
        let out = {
            let mut w = WriteTx {
                snaps: tx.open_table(SNAPSHOTS)?,
                counters: tx.open_table(COUNTERS)?,
            };
            f(&mut w)?
        };
        tx.commit()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn rec(id: u64) -> Record {
        Record {
            id,
            kind: Kind::Active,
            parent: String::new(),
            labels: BTreeMap::new(),
            created: Ts::now(),
            updated: Ts::now(),
            usage: None,
        }
    }

    #[test]
    fn namespaces_are_separate_and_failed_writes_roll_back() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("m.db")).unwrap();
        s.write(|w| {
            let a = w.next_id()?;
            w.put("ns1", "a", &rec(a))?;
            let b = w.next_id()?;
            w.put("ns2", "a", &rec(b))?;
            w.put("ns10", "z", &rec(99))
        })
        .unwrap();
        let r: Result<()> = s.write(|w| {
            w.put("ns1", "b", &rec(7))?;
            Err(Error::InvalidArgument("abort".into()))
        });
        assert!(r.is_err());
        s.read(|r| {
            assert_eq!(r.get("ns1", "a")?.unwrap().id, 1);
            assert_eq!(r.get("ns2", "a")?.unwrap().id, 2);
            assert!(r.get("ns1", "b")?.is_none());
            assert_eq!(r.list("ns1")?.len(), 1);
            assert_eq!(r.all_ids()?.len(), 3);
            Ok(())
        })
        .unwrap();
        // Reopen: the counter survives.
        drop(s);
        let s = Store::open(&d.path().join("m.db")).unwrap();
        assert_eq!(s.write(|w| w.next_id()).unwrap(), 3);
    }
}
