//! Full-mode address bookkeeping: the [`LeaseStore`] trait the decision reads
//! and the server writes, and an in-memory implementation.
//!
//! The model: at most one entry per address and at most one binding
//! (offered or bound entry) per MAC. An entry whose `expires` is at or before
//! `now` no longer holds its address: the address is free for anyone, though
//! the entry may linger until [`LeaseStore::expire`] removes it (so a client
//! coming back soon after still finds "its" address with
//! [`LeaseStore::by_mac`]). Times are unix seconds.
//!
//! The decision ([`crate::dhcp::decide()`]) only reads a store; what it wants
//! changed comes back as a [`LeaseOp`], which the server applies with
//! [`apply`] while holding the same lock it decided under.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use anyhow::Result;

use crate::dhcp::client::MacAddr;

/// What an address is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Offered to a client (DHCPOFFER), held briefly for it.
    Offered,
    /// Leased to a client (DHCPACK).
    Bound,
    /// A client found the address in use (DHCPDECLINE): nobody gets it until
    /// the entry expires.
    Declined,
}

/// One address's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub addr: Ipv4Addr,
    /// The client it is offered or bound to; for a declined address, the
    /// client that declined it.
    pub mac: MacAddr,
    pub state: LeaseState,
    /// Unix seconds; the entry holds the address while `now < expires`.
    pub expires: i64,
}

impl Lease {
    /// Whether the entry still holds its address at `now`.
    pub fn is_live(&self, now: i64) -> bool {
        now < self.expires
    }
}

/// The lease store: small, synchronous, and easy to put on SQLite.
///
/// Reads take `&self`; writes `&mut self`. Errors are the backing store's
/// (I/O, database); the in-memory store never fails.
pub trait LeaseStore {
    /// The MAC's binding (an `Offered` or `Bound` entry, live or expired but
    /// not yet removed), if any. Declined entries are not bindings.
    fn by_mac(&self, mac: MacAddr) -> Result<Option<Lease>>;

    /// The entry of an address (any state, live or expired), if any.
    fn by_addr(&self, addr: Ipv4Addr) -> Result<Option<Lease>>;

    /// The lowest address in `first..=last` that has no live entry at `now`
    /// and for which `skip` is false (reserved addresses, the server's own).
    fn find_free(
        &self,
        first: Ipv4Addr,
        last: Ipv4Addr,
        now: i64,
        skip: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Result<Option<Ipv4Addr>>;

    /// Records that `addr` is offered to `mac` until `until`. Replaces the
    /// MAC's previous binding (on any address) and any entry of `addr`.
    fn offer(&mut self, mac: MacAddr, addr: Ipv4Addr, until: i64) -> Result<()>;

    /// Records that `addr` is leased to `mac` until `expires`. Replaces the
    /// MAC's previous binding (on any address) and any entry of `addr`.
    fn commit(&mut self, mac: MacAddr, addr: Ipv4Addr, expires: i64) -> Result<()>;

    /// Frees `addr` if it is offered or bound to `mac`; otherwise does nothing.
    fn release(&mut self, mac: MacAddr, addr: Ipv4Addr) -> Result<()>;

    /// Marks `addr` declined (by `mac`) until `until`: it replaces any entry
    /// of the address, and `mac` is left with no binding.
    fn decline(&mut self, mac: MacAddr, addr: Ipv4Addr, until: i64) -> Result<()>;

    /// Removes every entry that expired at or before `now`; returns how many.
    fn expire(&mut self, now: i64) -> Result<usize>;
}

/// A change to the lease store that a decision asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    Offer {
        mac: MacAddr,
        addr: Ipv4Addr,
        until: i64,
    },
    Commit {
        mac: MacAddr,
        addr: Ipv4Addr,
        expires: i64,
    },
    Release {
        mac: MacAddr,
        addr: Ipv4Addr,
    },
    Decline {
        mac: MacAddr,
        addr: Ipv4Addr,
        until: i64,
    },
}

/// Applies a decision's lease change to a store.
pub fn apply(store: &mut dyn LeaseStore, op: &LeaseOp) -> Result<()> {
    match *op {
        LeaseOp::Offer { mac, addr, until } => store.offer(mac, addr, until),
        LeaseOp::Commit { mac, addr, expires } => store.commit(mac, addr, expires),
        LeaseOp::Release { mac, addr } => store.release(mac, addr),
        LeaseOp::Decline { mac, addr, until } => store.decline(mac, addr, until),
    }
}

/// A lease store in memory (tests, servers that need no persistence, and the
/// read side of [`crate::leases::SqlLeaseStore`]). Lookups by MAC are a hash
/// lookup and [`LeaseStore::find_free`] walks only the entries below the
/// first free address, so a DISCOVER costs microseconds with thousands of
/// leases.
#[derive(Clone, Debug, Default)]
pub struct MemoryLeaseStore {
    by_addr: BTreeMap<Ipv4Addr, Lease>,
    /// The address of each MAC's binding (offered or bound, not declined).
    bindings: HashMap<MacAddr, Ipv4Addr>,
}

impl MemoryLeaseStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every entry, by address.
    pub fn entries(&self) -> impl Iterator<Item = &Lease> {
        self.by_addr.values()
    }

    /// Puts an entry as it is (loading a store from disk).
    pub fn insert(&mut self, lease: Lease) {
        self.remove(lease.addr);
        if lease.state != LeaseState::Declined {
            if let Some(old) = self.bindings.get(&lease.mac).copied() {
                self.remove(old);
            }
            self.bindings.insert(lease.mac, lease.addr);
        }
        self.by_addr.insert(lease.addr, lease);
    }

    fn remove(&mut self, addr: Ipv4Addr) {
        if let Some(old) = self.by_addr.remove(&addr) {
            if self.bindings.get(&old.mac) == Some(&addr) {
                self.bindings.remove(&old.mac);
            }
        }
    }

    fn binding_addr(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.bindings.get(&mac).copied()
    }

    fn put(&mut self, mac: MacAddr, addr: Ipv4Addr, state: LeaseState, expires: i64) {
        if let Some(old) = self.binding_addr(mac) {
            self.remove(old);
        }
        self.insert(Lease {
            addr,
            mac,
            state,
            expires,
        });
    }
}

impl LeaseStore for MemoryLeaseStore {
    fn by_mac(&self, mac: MacAddr) -> Result<Option<Lease>> {
        Ok(self
            .binding_addr(mac)
            .and_then(|a| self.by_addr.get(&a).cloned()))
    }

    fn by_addr(&self, addr: Ipv4Addr) -> Result<Option<Lease>> {
        Ok(self.by_addr.get(&addr).cloned())
    }

    fn find_free(
        &self,
        first: Ipv4Addr,
        last: Ipv4Addr,
        now: i64,
        skip: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Result<Option<Ipv4Addr>> {
        let (first, last) = (u32::from(first), u32::from(last));
        if first > last {
            return Ok(None);
        }
        // Walk the taken addresses in order; the first hole not skipped wins.
        let mut candidate = u64::from(first);
        let taken = self
            .by_addr
            .range(Ipv4Addr::from(first)..=Ipv4Addr::from(last))
            .filter(|(_, l)| l.is_live(now))
            .map(|(a, _)| u64::from(u32::from(*a)));
        for taken in taken {
            while candidate < taken {
                if !skip(Ipv4Addr::from(candidate as u32)) {
                    return Ok(Some(Ipv4Addr::from(candidate as u32)));
                }
                candidate += 1;
            }
            candidate = candidate.max(taken + 1);
        }
        while candidate <= u64::from(last) {
            if !skip(Ipv4Addr::from(candidate as u32)) {
                return Ok(Some(Ipv4Addr::from(candidate as u32)));
            }
            candidate += 1;
        }
        Ok(None)
    }

    fn offer(&mut self, mac: MacAddr, addr: Ipv4Addr, until: i64) -> Result<()> {
        self.put(mac, addr, LeaseState::Offered, until);
        Ok(())
    }

    fn commit(&mut self, mac: MacAddr, addr: Ipv4Addr, expires: i64) -> Result<()> {
        self.put(mac, addr, LeaseState::Bound, expires);
        Ok(())
    }

    fn release(&mut self, mac: MacAddr, addr: Ipv4Addr) -> Result<()> {
        if self
            .by_addr
            .get(&addr)
            .is_some_and(|l| l.mac == mac && l.state != LeaseState::Declined)
        {
            self.remove(addr);
        }
        Ok(())
    }

    fn decline(&mut self, mac: MacAddr, addr: Ipv4Addr, until: i64) -> Result<()> {
        self.put(mac, addr, LeaseState::Declined, until);
        Ok(())
    }

    fn expire(&mut self, now: i64) -> Result<usize> {
        let gone: Vec<Ipv4Addr> = self
            .by_addr
            .values()
            .filter(|l| !l.is_live(now))
            .map(|l| l.addr)
            .collect();
        for a in &gone {
            self.remove(*a);
        }
        Ok(gone.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn no_skip(_: Ipv4Addr) -> bool {
        false
    }

    #[test]
    fn offer_commit_release() {
        let mut s = MemoryLeaseStore::new();
        assert_eq!(
            s.find_free(ip(10), ip(12), 0, &no_skip).unwrap(),
            Some(ip(10))
        );
        s.offer(A, ip(10), 60).unwrap();
        assert_eq!(s.by_mac(A).unwrap().unwrap().state, LeaseState::Offered);
        assert_eq!(
            s.find_free(ip(10), ip(12), 0, &no_skip).unwrap(),
            Some(ip(11))
        );
        s.commit(A, ip(10), 3600).unwrap();
        let l = s.by_addr(ip(10)).unwrap().unwrap();
        assert_eq!((l.mac, l.state, l.expires), (A, LeaseState::Bound, 3600));
        // Someone else's release does nothing.
        s.release(B, ip(10)).unwrap();
        assert!(s.by_addr(ip(10)).unwrap().is_some());
        s.release(A, ip(10)).unwrap();
        assert_eq!(s.by_mac(A).unwrap(), None);
        assert_eq!(s.by_addr(ip(10)).unwrap(), None);
    }

    #[test]
    fn one_binding_per_mac() {
        let mut s = MemoryLeaseStore::new();
        s.offer(A, ip(10), 60).unwrap();
        s.commit(A, ip(11), 3600).unwrap();
        assert_eq!(s.by_addr(ip(10)).unwrap(), None);
        assert_eq!(s.by_mac(A).unwrap().unwrap().addr, ip(11));
        assert_eq!(s.entries().count(), 1);
    }

    #[test]
    fn find_free_takes_the_lowest_hole_that_is_not_skipped() {
        let mut s = MemoryLeaseStore::new();
        let mac = |i: u8| MacAddr([2, 0, 0, 0, 1, i]);
        for (i, until) in [(10, 100), (11, 100), (12, 50), (13, 100), (15, 100)] {
            s.commit(mac(i), ip(i), until).unwrap();
        }
        let find = |now, skip: &dyn Fn(Ipv4Addr) -> bool| s.find_free(ip(10), ip(16), now, skip);
        // .12 expired at 50.
        assert_eq!(find(60, &no_skip).unwrap(), Some(ip(12)));
        assert_eq!(find(40, &no_skip).unwrap(), Some(ip(14)));
        assert_eq!(find(60, &|a| a == ip(12)).unwrap(), Some(ip(14)));
        assert_eq!(find(40, &|a| a == ip(14)).unwrap(), Some(ip(16)));
        assert_eq!(find(40, &|a| a >= ip(14)).unwrap(), None);
        // Holes below the range and entries outside it do not matter.
        assert_eq!(s.find_free(ip(11), ip(11), 60, &no_skip).unwrap(), None);
        assert_eq!(
            s.find_free(ip(16), ip(20), 60, &no_skip).unwrap(),
            Some(ip(16))
        );
        assert_eq!(
            s.find_free(ip(9), ip(9), 60, &no_skip).unwrap(),
            Some(ip(9))
        );
        assert_eq!(s.find_free(ip(11), ip(10), 60, &no_skip).unwrap(), None);
        // The top of the address space does not overflow.
        let top = Ipv4Addr::new(255, 255, 255, 255);
        assert_eq!(s.find_free(top, top, 60, &no_skip).unwrap(), Some(top));
    }

    #[test]
    fn expired_entries_free_their_address_and_are_removed() {
        let mut s = MemoryLeaseStore::new();
        s.offer(A, ip(10), 60).unwrap();
        s.commit(B, ip(11), 100).unwrap();
        assert_eq!(s.find_free(ip(10), ip(11), 59, &no_skip).unwrap(), None);
        assert_eq!(
            s.find_free(ip(10), ip(11), 60, &no_skip).unwrap(),
            Some(ip(10))
        );
        // Still found by MAC until removed.
        assert!(s.by_mac(A).unwrap().is_some());
        assert_eq!(s.expire(60).unwrap(), 1);
        assert_eq!(s.by_mac(A).unwrap(), None);
        assert_eq!(s.expire(100).unwrap(), 1);
        assert_eq!(s.entries().count(), 0);
    }

    #[test]
    fn decline_keeps_the_address_out_and_unbinds_the_client() {
        let mut s = MemoryLeaseStore::new();
        s.offer(A, ip(10), 60).unwrap();
        s.decline(A, ip(10), 600).unwrap();
        assert_eq!(s.by_mac(A).unwrap(), None);
        assert_eq!(
            s.by_addr(ip(10)).unwrap().unwrap().state,
            LeaseState::Declined
        );
        assert_eq!(s.find_free(ip(10), ip(10), 599, &no_skip).unwrap(), None);
        // Release by the decliner does not free a declined address.
        s.release(A, ip(10)).unwrap();
        assert!(s.by_addr(ip(10)).unwrap().is_some());
        assert_eq!(
            s.find_free(ip(10), ip(10), 600, &no_skip).unwrap(),
            Some(ip(10))
        );
    }

    #[test]
    fn find_free_skips() {
        let s = MemoryLeaseStore::new();
        let skip = |a: Ipv4Addr| a == ip(10) || a == ip(11);
        assert_eq!(s.find_free(ip(10), ip(12), 0, &skip).unwrap(), Some(ip(12)));
        assert_eq!(s.find_free(ip(10), ip(11), 0, &skip).unwrap(), None);
    }

    #[test]
    fn apply_ops() {
        let mut s = MemoryLeaseStore::new();
        let ops = [
            LeaseOp::Offer {
                mac: A,
                addr: ip(10),
                until: 60,
            },
            LeaseOp::Commit {
                mac: A,
                addr: ip(10),
                expires: 3600,
            },
            LeaseOp::Release {
                mac: A,
                addr: ip(10),
            },
            LeaseOp::Decline {
                mac: B,
                addr: ip(12),
                until: 600,
            },
        ];
        for op in &ops {
            apply(&mut s, op).unwrap();
        }
        let all: Vec<_> = s.entries().cloned().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, LeaseState::Declined);
    }
}
