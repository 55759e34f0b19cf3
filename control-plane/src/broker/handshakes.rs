//! Bounded handshakes (issue 23): a connection holds a slot from accept until its CONNECT
//! is admitted (or it is refused, or its handshake times out). At most `max_total` slots
//! are held at once, and at most `max_per_ip` by one peer address, so a flood of silent
//! TCP connections from one address fills its own quota and is closed on accept, while a
//! real device (from any other address, or within the quota) handshakes at once. A slot
//! is cheap (a task waiting on a socket), so the bounds are about descriptors and memory,
//! and the timeout (`front::HANDSHAKE_TIMEOUT`) frees them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections between accept and admitted CONNECT, fleet-wide: a fleet of 10,000
/// reconnecting at once handshakes in a few waves of this size.
pub const MAX_PENDING: usize = 4096;
/// The same, per peer address: a NAT'd site of a thousand devices reconnecting at once
/// fits; one host's flood does not take every slot.
pub const MAX_PENDING_PER_IP: usize = 1024;

#[derive(Debug)]
pub struct Handshakes {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A held slot, released on drop.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Handshakes>,
    ip: IpAddr,
}

impl Default for Handshakes {
    fn default() -> Self {
        Self::new(MAX_PENDING, MAX_PENDING_PER_IP)
    }
}

impl Handshakes {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total,
            max_per_ip,
            state: Mutex::new(State::default()),
        }
    }

    /// A slot for a connection from `ip`, or `None` when the fleet-wide or the address's
    /// bound is reached (the caller closes the connection).
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mine = s.per_ip.get(&ip).copied().unwrap_or(0);
        if s.total >= self.max_total || mine >= self.max_per_ip {
            return None;
        }
        s.total += 1;
        s.per_ip.insert(ip, mine + 1);
        Some(Slot {
            owner: self.clone(),
            ip,
        })
    }

    /// Slots held now.
    pub fn pending(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.owner.state.lock().unwrap_or_else(|e| e.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                s.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_fills_its_quota_others_still_enter_and_drops_free_slots() {
        let h = Arc::new(Handshakes::new(5, 3));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<Slot> = (0..3).map(|_| h.enter(a).unwrap()).collect();
        assert!(h.enter(a).is_none(), "a's quota is full");
        let b1 = h.enter(b).unwrap();
        let b2 = h.enter(b).unwrap();
        assert_eq!(h.pending(), 5);
        assert!(h.enter(b).is_none(), "the fleet-wide bound is reached");
        drop(b2);
        assert!(h.enter(b).is_some(), "a dropped slot is free again");
        drop(held);
        drop(b1);
        assert_eq!(h.pending(), 0);
        assert!(
            h.state.lock().unwrap().per_ip.is_empty(),
            "no address is remembered"
        );
    }
}
