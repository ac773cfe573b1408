//! The server's state in SQLite: machines, leases and boot stages.
//!
//! WAL journal with `synchronous=NORMAL`: a committed transaction survives the
//! process being killed (kill -9) at any point; after a power loss the last
//! transactions before it may be lost, never half-applied. Every change is one
//! transaction. The schema is versioned with `PRAGMA user_version`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection};
use serde::Serialize;

use crate::config::Role;
use crate::join::{Member, Token};

/// Schema migrations, applied in order; index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE machines (
    mac        TEXT PRIMARY KEY,   -- lower-case aa:bb:cc:dd:ee:ff
    address    TEXT,               -- last known IPv4 address
    image      TEXT,
    role       TEXT,
    hostname   TEXT,
    first_seen INTEGER NOT NULL,   -- unix seconds
    last_seen  INTEGER NOT NULL
);
CREATE TABLE leases (
    address    TEXT PRIMARY KEY,
    mac        TEXT NOT NULL,
    expires    INTEGER NOT NULL,   -- unix seconds
    state      TEXT NOT NULL CHECK (state IN ('offered', 'bound', 'declined'))
);
CREATE INDEX leases_by_mac ON leases (mac);
CREATE TABLE stages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    mac        TEXT NOT NULL,
    stage      TEXT NOT NULL,
    at_ms      INTEGER NOT NULL    -- unix milliseconds
);
CREATE INDEX stages_by_mac ON stages (mac, id);
"#,
    r#"
-- What DHCP requests said about a machine besides its MAC.
ALTER TABLE machines ADD COLUMN serial TEXT;  -- Raspberry Pi serial, 8 hex digits
ALTER TABLE machines ADD COLUMN uuid TEXT;    -- SMBIOS UUID
ALTER TABLE machines ADD COLUMN kind TEXT;    -- the boot client kind last seen (pxe-bios, rpi4, ...)
CREATE INDEX machines_by_serial ON machines (serial);
"#,
    r#"
-- The cluster: its join token (made once), and the machines that joined.
CREATE TABLE cluster (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL
);
CREATE TABLE members (
    mac        TEXT PRIMARY KEY,
    hostname   TEXT NOT NULL UNIQUE,
    role       TEXT NOT NULL CHECK (role IN ('server', 'agent')),
    init       INTEGER NOT NULL CHECK (init IN (0, 1)),  -- starts the cluster
    fixed      INTEGER NOT NULL CHECK (fixed IN (0, 1)), -- role from the inventory
    secret     TEXT,               -- sha256 of the node's secret; NULL: trust the next one
    address    TEXT,               -- where its last node-config request came from
    joined     INTEGER NOT NULL,   -- unix seconds
    persistent INTEGER NOT NULL DEFAULT 1 CHECK (persistent IN (0, 1)), -- keeps its secret on disk
    netbooted  INTEGER NOT NULL DEFAULT 0 CHECK (netbooted IN (0, 1))   -- network-booted since its last config
);
CREATE UNIQUE INDEX one_init ON members (init) WHERE init = 1;
"#,
];

/// One boot stage a machine reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StageEvent {
    pub stage: String,
    /// Unix time in milliseconds.
    pub at_ms: i64,
}

/// A machine as `/api/machines` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MachineRecord {
    pub mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub address: Option<String>,
    pub image: Option<String>,
    pub role: Option<String>,
    pub hostname: Option<String>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub stages: Vec<StageEvent>,
}

/// What a node-config request came to.
#[derive(Debug)]
pub enum JoinOutcome {
    /// The machine is this member; `members` is every member after the
    /// change (for the API address). `reenrolled`: a diskless member's new
    /// secret was taken after a network boot.
    Member {
        member: Member,
        members: Vec<Member>,
        reenrolled: bool,
    },
    /// The machine has a secret on record and the request's differs.
    WrongSecret,
}

/// Equal strings, in time that does not depend on where they differ (the
/// stored secret hashes are compared with what a request sent). Hand-written:
/// three lines, not worth a dependency.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The state store. Cheap to share behind an `Arc`; calls are short and
/// serialised by a mutex.
pub struct State {
    conn: Mutex<Connection>,
    /// The exclusive lock on `<state>.lock`, held while the store is open.
    _lock: Option<std::fs::File>,
}

/// Normalises a MAC address to lower-case, colon-separated hex; errors name it.
pub fn normalize_mac(mac: &str) -> Result<String> {
    let hex: String = mac.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let separators_ok = mac
        .chars()
        .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '-' | '.'));
    if hex.len() != 12 || !separators_ok {
        bail!("{mac:?} is not a MAC address");
    }
    let hex = hex.to_ascii_lowercase();
    Ok((0..6)
        .map(|i| &hex[2 * i..2 * i + 2])
        .collect::<Vec<_>>()
        .join(":"))
}

impl State {
    /// Opens (creating if needed) the store at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<State> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // One kiln serve per state file: the lease store keeps an in-memory
        // copy that another writer would make stale. The lock goes with the
        // process (kill -9 included).
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                anyhow::anyhow!(
                    "the state store {} is in use by another kiln serve (locked: {})",
                    path.display(),
                    lock_path.display()
                )
            },
        )?;
        restrict_to_owner(path)?;
        let conn = Connection::open(path)
            .with_context(|| format!("opening the state store {}", path.display()))?;
        let mut state = Self::init(conn)
            .with_context(|| format!("preparing the state store {}", path.display()))?;
        state._lock = Some(lock);
        Ok(state)
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<State> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<State> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let version = usize::try_from(version).context("negative schema version")?;
        if version > MIGRATIONS.len() {
            bail!(
                "the store has schema version {version}, newer than this kiln knows ({}); use a newer kiln",
                MIGRATIONS.len()
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)
                .with_context(|| format!("applying schema migration {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(State {
            conn: Mutex::new(conn),
            _lock: None,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the
        // transaction rolls back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a machine was seen (creating it on first sight), with
    /// what is known about it now; `None` fields keep their stored value.
    pub fn touch_machine(
        &self,
        mac: &str,
        address: Option<Ipv4Addr>,
        image: Option<&str>,
        role: Option<&str>,
        hostname: Option<&str>,
        now: i64,
    ) -> Result<()> {
        let mac = normalize_mac(mac)?;
        self.conn()
            .execute(
                "INSERT INTO machines (mac, address, image, role, hostname, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                 ON CONFLICT (mac) DO UPDATE SET
                    address = COALESCE(?2, address), image = COALESCE(?3, image),
                    role = COALESCE(?4, role), hostname = COALESCE(?5, hostname), last_seen = ?6",
                params![
                    mac,
                    address.map(|a| a.to_string()),
                    image,
                    role,
                    hostname,
                    now
                ],
            )
            .with_context(|| format!("recording machine {mac}"))?;
        Ok(())
    }

    /// Records what a boot request said about a machine: its client kind and,
    /// if it sent them, its serial and UUID (`None` keeps the stored value).
    pub fn record_identity(
        &self,
        mac: &str,
        kind: &str,
        serial: Option<&str>,
        uuid: Option<&str>,
        now: i64,
    ) -> Result<()> {
        let mac = normalize_mac(mac)?;
        self.conn()
            .execute(
                "INSERT INTO machines (mac, kind, serial, uuid, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (mac) DO UPDATE SET kind = ?2, serial = COALESCE(?3, serial),
                    uuid = COALESCE(?4, uuid), last_seen = ?5",
                params![mac, kind, serial, uuid, now],
            )
            .with_context(|| format!("recording machine {mac}"))?;
        Ok(())
    }

    /// The serial and UUID recorded for a MAC.
    pub fn identity(&self, mac: &str) -> Result<(Option<String>, Option<String>)> {
        use rusqlite::OptionalExtension;
        let mac = normalize_mac(mac)?;
        Ok(self
            .conn()
            .query_row(
                "SELECT serial, uuid FROM machines WHERE mac = ?1",
                [&mac],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((None, None)))
    }

    /// The MAC last seen with a Raspberry Pi serial.
    pub fn mac_of_serial(&self, serial: &str) -> Result<Option<String>> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn()
            .query_row(
                "SELECT mac FROM machines WHERE serial = ?1 ORDER BY last_seen DESC LIMIT 1",
                [serial],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Appends a boot stage for a machine (creating the machine if new).
    pub fn record_stage(&self, mac: &str, stage: &str, at_ms: i64) -> Result<()> {
        let mac = normalize_mac(mac)?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO machines (mac, first_seen, last_seen) VALUES (?1, ?2, ?2)
             ON CONFLICT (mac) DO UPDATE SET last_seen = ?2",
            params![mac, at_ms / 1000],
        )?;
        tx.execute(
            "INSERT INTO stages (mac, stage, at_ms) VALUES (?1, ?2, ?3)",
            params![mac, stage, at_ms],
        )?;
        tx.commit()
            .with_context(|| format!("recording stage {stage} of {mac}"))?;
        Ok(())
    }

    /// Every machine with its stages in the order they were reported.
    pub fn machines(&self) -> Result<Vec<MachineRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT m.mac, m.serial, m.uuid, m.kind,
                    COALESCE(m.address, (SELECT l.address FROM leases l
                                         WHERE l.mac = m.mac AND l.state = 'bound'
                                         ORDER BY l.expires DESC LIMIT 1)),
                    m.image, m.role, m.hostname, m.first_seen, m.last_seen
             FROM machines m ORDER BY m.mac",
        )?;
        let mut machines = stmt
            .query_map([], |r| {
                Ok(MachineRecord {
                    mac: r.get(0)?,
                    serial: r.get(1)?,
                    uuid: r.get(2)?,
                    kind: r.get(3)?,
                    address: r.get(4)?,
                    image: r.get(5)?,
                    role: r.get(6)?,
                    hostname: r.get(7)?,
                    first_seen: r.get(8)?,
                    last_seen: r.get(9)?,
                    stages: Vec::new(),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut stages =
            conn.prepare("SELECT stage, at_ms FROM stages WHERE mac = ?1 ORDER BY id")?;
        for m in &mut machines {
            m.stages = stages
                .query_map([&m.mac], |r| {
                    Ok(StageEvent {
                        stage: r.get(0)?,
                        at_ms: r.get(1)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
        }
        Ok(machines)
    }

    /// The cluster's join token, made (from the OS CSPRNG) and stored the
    /// first time it is asked for.
    pub fn cluster_token(&self) -> Result<Token> {
        use rusqlite::OptionalExtension;
        self.transaction(|tx| {
            let stored: Option<String> = tx
                .query_row("SELECT value FROM cluster WHERE key = 'token'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            if let Some(t) = stored {
                return Ok(Token::from_stored(t));
            }
            let t = Token::generate()?;
            tx.execute(
                "INSERT INTO cluster (key, value) VALUES ('token', ?1)",
                [t.expose()],
            )?;
            Ok(t)
        })
        .context("reading the cluster token")
    }

    /// Every member of the cluster.
    pub fn members(&self) -> Result<Vec<Member>> {
        self.read(load_members)
    }

    /// A node-config request from `mac` with a secret whose sha256 is
    /// `secret_sha256`, from `address`: checks the secret (trust on first
    /// use: the first one is kept), decides what the machine is with
    /// `assign` (given the members so far), and records it, all in one
    /// transaction.
    ///
    /// `persistent` says whether the node keeps its secret on disk. A member
    /// that said it does not (diskless: its secret is gone at every reboot)
    /// may send a new secret once after each network boot of its MAC
    /// ([`State::mark_netboot`]); a member that keeps its secret never may.
    pub fn join(
        &self,
        mac: &str,
        secret_sha256: &str,
        persistent: bool,
        address: Option<Ipv4Addr>,
        now: i64,
        assign: impl FnOnce(&[Member]) -> Member,
    ) -> Result<JoinOutcome> {
        use rusqlite::OptionalExtension;
        let mac = normalize_mac(mac)?;
        self.transaction(|tx| {
            let stored: Option<(Option<String>, bool, bool)> = tx
                .query_row(
                    "SELECT secret, persistent, netbooted FROM members WHERE mac = ?1",
                    [&mac],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let mut reenrolled = false;
            if let Some((Some(s), was_persistent, netbooted)) = &stored {
                if !constant_time_eq(s, secret_sha256) {
                    if *was_persistent || !*netbooted {
                        return Ok(JoinOutcome::WrongSecret);
                    }
                    tx.execute("UPDATE members SET secret = NULL WHERE mac = ?1", [&mac])?;
                    reenrolled = true;
                }
            }
            let mut members = load_members(tx)?;
            let mut member = assign(&members);
            member.address = address.or(member.address);
            if member.init {
                // Another member may have held init before an inventory change.
                tx.execute("UPDATE members SET init = 0 WHERE mac != ?1", [&mac])?;
            }
            tx.execute(
                "INSERT INTO members (mac, hostname, role, init, fixed, secret, address, joined,
                                      persistent, netbooted)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0)
                 ON CONFLICT (mac) DO UPDATE SET hostname = ?2, role = ?3, init = ?4,
                    fixed = ?5, secret = COALESCE(secret, ?6), address = ?7,
                    persistent = ?9, netbooted = 0",
                params![
                    mac,
                    member.hostname,
                    member.role.as_str(),
                    member.init,
                    member.fixed,
                    secret_sha256,
                    member.address.map(|a| a.to_string()),
                    now,
                    persistent
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    anyhow::anyhow!(
                        "{mac} would be named {}, which another member already is",
                        member.hostname
                    )
                }
                e => e.into(),
            })?;
            tx.execute(
                "INSERT INTO machines (mac, role, hostname, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (mac) DO UPDATE SET role = ?2, hostname = ?3, last_seen = ?4",
                params![mac, member.role.as_str(), member.hostname, now],
            )?;
            if member.init {
                for m in &mut members {
                    m.init = false;
                }
            }
            members.retain(|m| m.mac != mac);
            members.push(member.clone());
            Ok(JoinOutcome::Member {
                member,
                members,
                reenrolled,
            })
        })
        .with_context(|| format!("recording the cluster member {mac}"))
    }

    /// Records that a machine is network-booting (its iPXE script or its
    /// Raspberry Pi cmdline.txt was served): if it is a diskless member, its
    /// next node-config request may bring a new secret.
    pub fn mark_netboot(&self, mac: &str) -> Result<()> {
        let mac = normalize_mac(mac)?;
        self.conn()
            .execute("UPDATE members SET netbooted = 1 WHERE mac = ?1", [&mac])
            .with_context(|| format!("recording the network boot of {mac}"))?;
        Ok(())
    }

    /// Forgets a member's secret: its next node-config request is trusted
    /// again (a node whose data disk was replaced). It keeps its name and role.
    pub fn forget_secret(&self, mac: &str) -> Result<bool> {
        let mac = normalize_mac(mac)?;
        let n = self
            .conn()
            .execute("UPDATE members SET secret = NULL WHERE mac = ?1", [&mac])
            .with_context(|| format!("forgetting the secret of {mac}"))?;
        Ok(n == 1)
    }

    /// Runs `f` on the connection inside one transaction, committed when `f`
    /// returns Ok (the lease store's way in).
    pub(crate) fn transaction<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let out = f(&tx)?;
        tx.commit().context("committing to the state store")?;
        Ok(out)
    }

    /// Runs `f` on the connection (reads).
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        f(&self.conn())
    }
}

/// Every member, in the order they joined.
fn load_members(c: &Connection) -> Result<Vec<Member>> {
    let mut stmt = c.prepare(
        "SELECT mac, hostname, role, init, fixed, address FROM members ORDER BY joined, rowid",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, bool>(3)?,
            r.get::<_, bool>(4)?,
            r.get::<_, Option<String>>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (mac, hostname, role, init, fixed, address) = row?;
        out.push(Member {
            role: if role == "agent" {
                Role::Agent
            } else {
                Role::Server
            },
            address: address.and_then(|a| a.parse().ok()),
            mac,
            hostname,
            init,
            fixed,
        });
    }
    Ok(out)
}

/// The store holds the cluster token: only its owner may read it. Creates the
/// file 0600, or takes group and other access away from an existing one
/// (SQLite gives its -wal and -shm files the database file's mode).
fn restrict_to_owner(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the state store {}", path.display()))?;
    let mode = file
        .metadata()
        .with_context(|| format!("reading the mode of {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "the state store holds the cluster token: taking group and other access away (mode {:o} -> 600)",
            mode & 0o777
        );
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} readable by its owner only", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_normalise_and_bad_ones_are_named() {
        assert_eq!(
            normalize_mac("52-54-00-AB-CD-EF").unwrap(),
            "52:54:00:ab:cd:ef"
        );
        assert_eq!(
            normalize_mac("5254.00ab.cdef").unwrap(),
            "52:54:00:ab:cd:ef"
        );
        let e = normalize_mac("52:54:00:zz:00:00").unwrap_err().to_string();
        assert!(e.contains("52:54:00:zz:00:00"), "{e}");
        assert!(normalize_mac("52:54:00:00:00").is_err());
    }

    #[test]
    fn stages_come_back_in_order_with_the_machine() {
        let s = State::in_memory().unwrap();
        s.touch_machine(
            "52:54:00:00:00:01",
            Some("10.0.0.5".parse().unwrap()),
            Some("pxe"),
            None,
            None,
            100,
        )
        .unwrap();
        for (i, stage) in ["initramfs", "network", "rootfs"].iter().enumerate() {
            s.record_stage("52:54:00:00:00:01", stage, 100_000 + i as i64)
                .unwrap();
        }
        s.record_stage("52:54:00:00:00:02", "initramfs", 5).unwrap();
        let m = s.machines().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].address.as_deref(), Some("10.0.0.5"));
        assert_eq!(m[0].image.as_deref(), Some("pxe"));
        let names: Vec<_> = m[0].stages.iter().map(|e| e.stage.as_str()).collect();
        assert_eq!(names, ["initramfs", "network", "rootfs"]);
        // touch keeps what it is not told
        s.touch_machine("52:54:00:00:00:01", None, None, Some("server"), None, 200)
            .unwrap();
        let m = s.machines().unwrap();
        assert_eq!(
            (m[0].image.as_deref(), m[0].role.as_deref(), m[0].last_seen),
            (Some("pxe"), Some("server"), 200)
        );
    }

    #[test]
    fn a_second_opener_of_the_same_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        let first = State::open(&path).unwrap();
        let e = format!("{:#}", State::open(&path).err().unwrap());
        assert!(e.contains("is in use by another kiln serve"), "{e}");
        drop(first);
        State::open(&path).unwrap();
    }

    #[test]
    fn the_store_survives_reopening_and_refuses_a_newer_schema() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        {
            let s = State::open(&path).unwrap();
            s.record_stage("52:54:00:00:00:01", "initramfs", 1).unwrap();
        }
        let s = State::open(&path).unwrap();
        assert_eq!(s.machines().unwrap()[0].stages.len(), 1);
        drop(s);
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = format!("{:#}", State::open(&path).err().unwrap());
        assert!(e.contains("schema version 99"), "{e}");
    }

    fn join_as(
        s: &State,
        cluster: &crate::config::Cluster,
        mac: &str,
        secret: &str,
    ) -> JoinOutcome {
        let secret = kiln_builder::sha256_hex(secret.as_bytes());
        s.join(
            mac,
            &secret,
            true,
            Some(Ipv4Addr::new(10, 0, 0, 9)),
            7,
            |members| crate::join::assign(cluster, &[], members, mac, None),
        )
        .unwrap()
    }

    fn member(o: JoinOutcome) -> Member {
        match o {
            JoinOutcome::Member { member, .. } => member,
            JoinOutcome::WrongSecret => panic!("refused"),
        }
    }

    #[test]
    fn token_members_and_secrets_survive_a_server_restart() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        let cluster = crate::config::Cluster {
            control_planes: 3,
            ..Default::default()
        };
        let macs = [
            "52:54:00:00:00:01",
            "52:54:00:00:00:02",
            "52:54:00:00:00:03",
            "52:54:00:00:00:04",
        ];
        let (token, first) = {
            let s = State::open(&path).unwrap();
            let t = s.cluster_token().unwrap();
            assert_eq!(s.cluster_token().unwrap(), t, "made once");
            let first: Vec<Member> = macs
                .iter()
                .map(|m| member(join_as(&s, &cluster, m, m)))
                .collect();
            (t, first)
        };
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the store holds the token");
        assert_eq!(
            first.iter().map(|m| (m.role, m.init)).collect::<Vec<_>>(),
            [
                (Role::Server, true),
                (Role::Server, false),
                (Role::Server, false),
                (Role::Agent, false)
            ]
        );
        // Restarted: the same token; machines rebooting in another order keep
        // their names and roles; a wrong secret is refused and changes nothing.
        let s = State::open(&path).unwrap();
        assert_eq!(s.cluster_token().unwrap(), token);
        assert!(matches!(
            join_as(&s, &cluster, macs[0], "someone else"),
            JoinOutcome::WrongSecret
        ));
        for (i, m) in macs.iter().enumerate().rev() {
            assert_eq!(member(join_as(&s, &cluster, m, m)), first[i]);
        }
        assert_eq!(s.members().unwrap().iter().filter(|m| m.init).count(), 1);
        let listed = s.machines().unwrap();
        assert_eq!(listed[3].role.as_deref(), Some("agent"));
        assert_eq!(listed[0].hostname.as_deref(), Some("kiln-server-1"));
    }

    #[test]
    fn a_loose_state_file_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = State::open(&path).unwrap();
        s.cluster_token().unwrap();
        for p in [path.clone(), path.with_extension("db-wal")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{}", p.display());
        }
    }

    #[test]
    fn a_diskless_member_enrols_a_new_secret_only_after_a_network_boot() {
        let s = State::in_memory().unwrap();
        let cluster = crate::config::Cluster::default();
        let mac = "52:54:00:00:00:01";
        let ask = |secret: &str, persistent: bool| {
            let sha = kiln_builder::sha256_hex(secret.as_bytes());
            s.join(mac, &sha, persistent, None, 1, |m| {
                crate::join::assign(&cluster, &[], m, mac, None)
            })
            .unwrap()
        };
        let fresh = |o: JoinOutcome| {
            matches!(
                o,
                JoinOutcome::Member {
                    reenrolled: false,
                    ..
                }
            )
        };
        let refused = |o: JoinOutcome| matches!(o, JoinOutcome::WrongSecret);
        assert!(fresh(ask("one", false)));
        // Not network-booted since: a new secret is refused.
        assert!(refused(ask("two", false)));
        s.mark_netboot(mac).unwrap();
        let JoinOutcome::Member {
            member, reenrolled, ..
        } = ask("two", false)
        else {
            panic!("refused after a network boot");
        };
        assert!(reenrolled && member.init);
        // Once per boot; the new secret is the one now.
        assert!(refused(ask("three", false)));
        assert!(fresh(ask("two", true)));
        // Now it keeps its secret on disk: a network boot opens nothing.
        s.mark_netboot(mac).unwrap();
        assert!(refused(ask("four", false)));
    }
}
