//! Snapshot metadata in redb: one ACID write transaction per mutation, so a
//! crash leaves either the old or the new state, never a mix. Directories
//! without metadata (from a crash between mkdir and commit, or after a
//! Remove) are swept by `Cleanup`.
//!
//! Tables:
//! - `snapshots`: `"<namespace>\0<key>"` → JSON [`Record`] (actives, views and
//!   committed names share one key space per namespace, as in containerd);
//! - `counters`: `"next_id"` → the next directory id.

use crate::error::{Error, Result};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};
use zfile::sync::RwLockExt;

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

/// The redb database, reopened after an I/O error (see [`Store::write`]).
pub struct Store {
    path: PathBuf,
    /// Every operation holds the read lock for its whole transaction, so a
    /// reopen (write lock) never overlaps one: redb's file lock allows a
    /// single open `Database` per file.
    inner: RwLock<Open>,
}

/// The open database and its history of reopens.
struct Open {
    /// `None` once an I/O error closed it; the next operation reopens it.
    db: Option<redb::Database>,
    /// How many times the file was opened (the first open is 1).
    generation: u64,
    /// The transaction number ([`TXN`]) found by the last (re)open.
    txn_at_open: u64,
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

/// Key in `counters` of the number of committed write transactions: what
/// tells, after a commit reported an I/O error, whether it is durable.
const TXN: &str = "txn";

impl Store {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self> {
        let (db, txn_at_open) = Self::open_db(path)?;
        Ok(Store {
            path: path.to_path_buf(),
            inner: RwLock::new(Open {
                db: Some(db),
                generation: 1,
                txn_at_open,
            }),
        })
    }

    /// Opens the file (redb recovers it to its last committed transaction
    /// if it was not closed cleanly) and makes the tables; returns the
    /// database and its transaction number.
    fn open_db(path: &Path) -> Result<(redb::Database, u64)> {
        let db = redb::Database::create(path).map_err(|e| at(path, e.into()))?;
        let txn = (|| {
            // Read-only when the tables exist: a reopen on a full file
            // system then needs no space (for reads, at least).
            let read = (|| -> std::result::Result<u64, redb::Error> {
                let tx = db.begin_read()?;
                tx.open_table(SNAPSHOTS)?;
                let txn = tx.open_table(COUNTERS)?.get(TXN)?.map(|v| v.value());
                Ok(txn.unwrap_or(0))
            })();
            match read {
                Err(redb::Error::TableDoesNotExist(_)) => {}
                r => return Ok(r?),
            }
            let tx = db.begin_write()?;
            tx.open_table(SNAPSHOTS)?;
            let txn = tx
                .open_table(COUNTERS)?
                .get(TXN)?
                .map(|v| v.value())
                .unwrap_or(0);
            tx.commit()?;
            Ok(txn)
        })()
        .map_err(|e| at(path, e))?;
        Ok((db, txn))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the open database and its generation, reopening it
    /// first if an I/O error closed it. After an I/O error in `f`, closes
    /// the database: redb refuses every later operation on it ("Previous
    /// I/O error"), while a reopen recovers it to its last committed
    /// transaction.
    fn with_db<T>(&self, f: impl FnOnce(&redb::Database, u64) -> Result<T>) -> Result<T> {
        loop {
            let g = self.inner.read_locked();
            if let Some(db) = g.db.as_ref() {
                let generation = g.generation;
                let r = f(db, generation).map_err(|e| at(&self.path, e));
                if matches!(r, Err(Error::DbIo { .. })) {
                    drop(g);
                    self.close(generation);
                }
                return r;
            }
            drop(g);
            self.reopen()?;
        }
    }

    /// Drops the database of `generation` after an I/O error (once, after
    /// every transaction running on it ended; not a newer one).
    fn close(&self, generation: u64) {
        let mut g = self.inner.write_locked();
        if g.generation == generation && g.db.take().is_some() {
            tracing::warn!(path = %self.path.display(), "metadata store closed after an I/O error; the next operation reopens it");
        }
    }

    /// Opens the database again if it is closed.
    fn reopen(&self) -> Result<()> {
        let mut g = self.inner.write_locked();
        if g.db.is_none() {
            let (db, txn) = Self::open_db(&self.path)?;
            *g = Open {
                db: Some(db),
                generation: g.generation + 1,
                txn_at_open: txn,
            };
            tracing::info!(path = %self.path.display(), txn, "metadata store reopened");
        }
        Ok(())
    }

    /// Runs `f` in a read transaction.
    pub fn read<T>(&self, f: impl FnOnce(&ReadTx) -> Result<T>) -> Result<T> {
        self.with_db(|db, _| {
            let tx = db.begin_read()?;
            let r = ReadTx {
                snaps: tx.open_table(SNAPSHOTS)?,
            };
            f(&r)
        })
    }

    /// Runs `f` in a write transaction, committed only if `f` succeeds.
    /// Write transactions are serialized, so `f` also runs under the
    /// store's writer lock.
    ///
    /// An I/O error (e.g. ENOSPC) fails this call with [`Error::DbIo`]
    /// naming the file, and the transaction is not applied. When the
    /// commit itself reported the error, the store is reopened at once to
    /// find out: a commit that turns out durable (its transaction number
    /// is there) makes the call succeed after all. Only if it cannot be
    /// reopened (e.g. its recovery needs space there is not) is the
    /// outcome left to the next reopen. Earlier commits stay committed.
    pub fn write<T>(&self, f: impl FnOnce(&mut WriteTx<'_>) -> Result<T>) -> Result<T> {
        let (mut txn, mut generation) = (0, 0);
        let r = self.with_db(|db, gen| {
            generation = gen;
            let tx = db.begin_write()?;
            let out = {
                let mut w = WriteTx {
                    snaps: tx.open_table(SNAPSHOTS)?,
                    counters: tx.open_table(COUNTERS)?,
                };
                txn = w.counters.get(TXN)?.map(|v| v.value()).unwrap_or(0) + 1;
                w.counters.insert(TXN, txn)?;
                f(&mut w)?
            };
            match tx.commit() {
                Ok(()) => Ok(Ok(out)),
                Err(e) => match Error::from(e) {
                    // Applied or not: found out by the reopen below.
                    io @ Error::DbIo { .. } => Ok(Err((at(&self.path, io), out))),
                    e => Err(e),
                },
            }
        })?;
        match r {
            Ok(out) => Ok(out),
            Err((err, out)) if self.landed_after_all(generation, txn) => {
                tracing::warn!(path = %self.path.display(), error = %err, "a commit reported an I/O error but is durable");
                Ok(out)
            }
            Err((err, _)) => Err(err),
        }
    }

    /// After the commit of transaction `txn` on the database of
    /// `generation` reported an I/O error: reopens the store if nobody has
    /// yet, and tells whether the commit is durable. redb accepts no commit
    /// on a database after an I/O error, so the first reopen after it finds
    /// the number of the last durable transaction: `txn` or an earlier one.
    fn landed_after_all(&self, generation: u64, txn: u64) -> bool {
        let mut g = self.inner.write_locked();
        if g.generation == generation {
            g.db = None;
            match Self::open_db(&self.path) {
                Ok((db, t)) => {
                    *g = Open {
                        db: Some(db),
                        generation: generation + 1,
                        txn_at_open: t,
                    };
                    tracing::info!(path = %self.path.display(), txn = t, "metadata store reopened");
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "metadata store stays closed; the next operation reopens it");
                    return false;
                }
            }
        }
        g.generation == generation + 1 && g.txn_at_open == txn
    }
}

/// Names the store's file in an I/O error that does not yet.
fn at(path: &Path, e: Error) -> Error {
    match e {
        Error::DbIo { path: p, source } if p.as_os_str().is_empty() => Error::DbIo {
            path: path.to_path_buf(),
            source,
        },
        e => e,
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

    fn big(id: u64) -> Record {
        let mut r = rec(id);
        r.labels.insert("pad".into(), "x".repeat(256 << 10));
        r
    }

    /// The store's file system fills: the write that hits ENOSPC fails with
    /// `DbIo` naming the file, the next ones fail the same way (not with
    /// redb's "Previous I/O error"), reads keep working, and once space is
    /// freed writes succeed again on the same `Store`, with every commit
    /// that was acknowledged present and no other.
    #[test]
    fn full_disk_fails_one_write_and_recovers_once_freed() {
        let Some(fs) = fixtures::smallfs::SmallFs::new("meta full_disk", 32) else {
            return;
        };
        let path = fs.path().join("metadata.db");
        let s = Store::open(&path).unwrap();
        let put = |key: &str, r: Record| {
            s.write(|w| {
                let id = w.next_id()?;
                w.put("ns", key, &Record { id, ..r })?;
                Ok(id)
            })
        };
        for i in 0..3 {
            assert_eq!(put(&format!("k{i}"), rec(0)).unwrap(), i + 1);
        }
        fs.fill();
        let mut acked = vec!["k0".to_string(), "k1".into(), "k2".into()];
        let err = loop {
            let key = format!("k{}", acked.len());
            match put(&key, big(0)) {
                Ok(_) => acked.push(key),
                Err(e) => break e,
            }
            assert!(acked.len() < 200, "the store never ran out of space");
        };
        let msg = err.to_string();
        eprintln!("{} writes fit; then: {msg}", acked.len() - 3);
        assert!(err.is_no_space(), "{err:?}");
        assert!(
            matches!(&err, Error::DbIo { path: p, .. } if *p == path),
            "{err:?}"
        );
        assert!(
            msg.contains("metadata.db") && msg.contains("No space left on device"),
            "{msg}"
        );
        // Still full: the same clear error, not "Previous I/O error".
        for _ in 0..2 {
            let e = put("again", big(0)).unwrap_err();
            assert!(e.is_no_space(), "{e}");
        }
        let n = s.read(|r| r.list("ns")).unwrap().len();
        assert_eq!(n, acked.len(), "reads work on a full disk");
        fs.free();
        let id = put("after", rec(0)).unwrap();
        assert_eq!(
            id as usize,
            acked.len() + 1,
            "ids continue: no gap reused, no duplicate"
        );
        let keys: Vec<String> = s
            .read(|r| r.list("ns"))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut want = acked.clone();
        want.push("after".into());
        want.sort();
        assert_eq!(keys, want);
        let ids = s.read(|r| r.all_ids()).unwrap();
        assert_eq!(ids.len(), want.len(), "distinct ids");
        // And the file is sound for a fresh open.
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.read(|r| r.list("ns")).unwrap().len(), want.len());
    }
}
