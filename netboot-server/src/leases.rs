//! The DHCP lease store on SQLite (the `leases` table of the state store), so
//! leases survive restarts and kill -9. Same semantics as
//! [`crate::dhcp::lease::MemoryLeaseStore`]; the tests run both through the
//! same cases.
//!
//! Write-through: every change is committed to SQLite first and then applied
//! to an in-memory copy, which answers every read; a DISCOVER costs one small
//! transaction and no table scan. The copy is right because this process is
//! the only writer of the leases table: [`State::open`] locks the state file
//! against a second `kiln serve`.

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection};

use crate::dhcp::client::MacAddr;
use crate::dhcp::lease::{Lease, LeaseState, LeaseStore, MemoryLeaseStore};
use crate::state::State;

/// Leases kept in the state store.
pub struct SqlLeaseStore {
    state: Arc<State>,
    mem: MemoryLeaseStore,
}

impl SqlLeaseStore {
    /// The store over `state`, with every lease of its table loaded.
    pub fn new(state: Arc<State>) -> Result<Self> {
        let leases = state
            .read(|c| {
                let mut stmt = c.prepare("SELECT address, mac, expires, state FROM leases")?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
                rows.map(|r| {
                    let (a, m, e, s) = r?;
                    row_to_lease(a, m, e, s)
                })
                .collect::<Result<Vec<Lease>>>()
            })
            .context("loading the DHCP leases")?;
        let mut mem = MemoryLeaseStore::new();
        for l in leases {
            mem.insert(l);
        }
        Ok(SqlLeaseStore { state, mem })
    }
}

fn state_str(s: LeaseState) -> &'static str {
    match s {
        LeaseState::Offered => "offered",
        LeaseState::Bound => "bound",
        LeaseState::Declined => "declined",
    }
}

fn row_to_lease(addr: String, mac: String, expires: i64, state: String) -> Result<Lease> {
    Ok(Lease {
        addr: addr
            .parse()
            .with_context(|| format!("bad address {addr:?} in the lease table"))?,
        mac: mac
            .parse()
            .map_err(|e| anyhow::anyhow!("bad MAC {mac:?} in the lease table: {e}"))?,
        expires,
        state: match state.as_str() {
            "offered" => LeaseState::Offered,
            "bound" => LeaseState::Bound,
            "declined" => LeaseState::Declined,
            other => bail!("unknown lease state {other:?} in the lease table"),
        },
    })
}

/// Replaces the MAC's binding and the address's entry with a new entry.
fn put(
    tx: &Connection,
    mac: MacAddr,
    addr: Ipv4Addr,
    state: LeaseState,
    expires: i64,
) -> Result<()> {
    let mac = mac.to_string();
    tx.execute(
        "DELETE FROM leases WHERE mac = ?1 AND state != 'declined'",
        [&mac],
    )?;
    tx.execute(
        "INSERT INTO leases (address, mac, expires, state) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (address) DO UPDATE SET mac = ?2, expires = ?3, state = ?4",
        params![addr.to_string(), mac, expires, state_str(state)],
    )?;
    Ok(())
}

impl LeaseStore for SqlLeaseStore {
    fn by_mac(&self, mac: MacAddr) -> Result<Option<Lease>> {
        self.mem.by_mac(mac)
    }

    fn by_addr(&self, addr: Ipv4Addr) -> Result<Option<Lease>> {
        self.mem.by_addr(addr)
    }

    fn find_free(
        &self,
        first: Ipv4Addr,
        last: Ipv4Addr,
        now: i64,
        skip: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Result<Option<Ipv4Addr>> {
        self.mem.find_free(first, last, now, skip)
    }

    fn offer(&mut self, mac: MacAddr, addr: Ipv4Addr, until: i64) -> Result<()> {
        self.state
            .transaction(|tx| put(tx, mac, addr, LeaseState::Offered, until))?;
        self.mem.offer(mac, addr, until)
    }

    fn commit(&mut self, mac: MacAddr, addr: Ipv4Addr, expires: i64) -> Result<()> {
        self.state
            .transaction(|tx| put(tx, mac, addr, LeaseState::Bound, expires))?;
        self.mem.commit(mac, addr, expires)
    }

    fn release(&mut self, mac: MacAddr, addr: Ipv4Addr) -> Result<()> {
        self.state.transaction(|tx| {
            tx.execute(
                "DELETE FROM leases WHERE address = ?1 AND mac = ?2 AND state != 'declined'",
                params![addr.to_string(), mac.to_string()],
            )?;
            Ok(())
        })?;
        self.mem.release(mac, addr)
    }

    fn decline(&mut self, mac: MacAddr, addr: Ipv4Addr, until: i64) -> Result<()> {
        self.state
            .transaction(|tx| put(tx, mac, addr, LeaseState::Declined, until))?;
        self.mem.decline(mac, addr, until)
    }

    fn expire(&mut self, now: i64) -> Result<usize> {
        self.state
            .transaction(|tx| Ok(tx.execute("DELETE FROM leases WHERE expires <= ?1", [now])?))?;
        self.mem.expire(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::lease::MemoryLeaseStore;

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    /// The same sequence on both stores gives the same answers.
    fn exercise(store: &mut dyn LeaseStore) -> Vec<String> {
        let mut log = Vec::new();
        let none = |_: Ipv4Addr| false;
        let mut note = |s: &dyn LeaseStore, what: &str| {
            log.push(format!(
                "{what}: A={:?} B={:?} free@5={:?} free@500={:?}",
                s.by_mac(A).unwrap(),
                s.by_mac(B).unwrap(),
                s.find_free(ip(10), ip(12), 5, &none).unwrap(),
                s.find_free(ip(10), ip(12), 500, &none).unwrap(),
            ))
        };
        store.offer(A, ip(10), 100).unwrap();
        note(store, "offer A");
        store.commit(A, ip(11), 200).unwrap();
        note(store, "A moves to .11");
        store.decline(B, ip(10), 300).unwrap();
        note(store, "B declines .10");
        store.release(B, ip(11)).unwrap();
        note(store, "B cannot release A's address");
        store.release(A, ip(11)).unwrap();
        note(store, "A releases");
        store.commit(B, ip(12), 50).unwrap();
        let gone = store.expire(60).unwrap();
        note(store, &format!("expired {gone}"));
        log
    }

    #[test]
    fn sql_store_behaves_like_the_memory_store() {
        let mut mem = MemoryLeaseStore::new();
        let state = Arc::new(State::in_memory().unwrap());
        let mut sql = SqlLeaseStore::new(state.clone()).unwrap();
        assert_eq!(exercise(&mut sql), exercise(&mut mem));
        // What is on disk is what the reads saw: a store loaded afresh from
        // the table holds the same entries.
        let loaded = SqlLeaseStore::new(state).unwrap();
        let entries = |m: &MemoryLeaseStore| m.entries().cloned().collect::<Vec<_>>();
        assert_eq!(entries(&loaded.mem), entries(&mem));
        assert!(!entries(&mem).is_empty());
    }

    #[test]
    fn leases_survive_reopening() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        SqlLeaseStore::new(Arc::new(State::open(&path).unwrap()))
            .unwrap()
            .commit(A, ip(20), 1000)
            .unwrap();
        let again = SqlLeaseStore::new(Arc::new(State::open(&path).unwrap())).unwrap();
        assert_eq!(again.by_mac(A).unwrap().unwrap().addr, ip(20));
    }
}
