//! The fleet's broker as several replicas: the guests' list of them, the replica stopped
//! halfway through the second boots (placed where a guest booting after the stop starts, so
//! that guest must pass over it), and what the stop showed.

use super::{Kbs, Replica, ReplicaRun};
use guest_agent::client::{Broker, ClientError, fetch_within};
use guest_agent::unlock::first_broker;
use snp::device::GuestDevice;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(crate) struct Replicas<'a> {
    others: &'a [Replica],
    /// What every guest lists, in this order.
    pub brokers: Vec<Broker>,
    /// The replica to stop: its index in `others` and its place in `brokers`.
    doomed: Option<(usize, usize)>,
    /// The VM before whose second boot it is stopped.
    stop_at: usize,
    /// Once stopped (and seen refusing a guest): its address and its releases until then.
    stopped: Option<(SocketAddr, u64)>,
}

impl<'a> Replicas<'a> {
    /// The list of `first` and `others` for a fleet of `vms`.
    pub fn new(first: &Broker, others: &'a [Replica], vms: usize) -> Replicas<'a> {
        let stop_at = vms / 2;
        let mut brokers: Vec<Broker> = std::iter::once(first.clone())
            .chain(others.iter().map(|r| r.broker.clone()))
            .collect();
        let mut doomed = None;
        if !others.is_empty() {
            // The VM booting first after the stop starts at place `k`, which must hold a replica
            // other than the first (the later scenes use that one).
            let k = first_broker(&format!("vm-{stop_at}"), brokers.len());
            if k == 0 {
                brokers.swap(0, 1);
            }
            let addr = brokers[k].addr;
            doomed = others
                .iter()
                .position(|r| r.broker.addr == addr)
                .map(|o| (o, k));
        }
        Replicas {
            others,
            brokers,
            doomed,
            stop_at,
            stopped: None,
        }
    }

    /// Before VM `i`'s boot number `boot`: stops the replica when it is due, and checks that it
    /// is stopped (a guest's handshake to it fails).
    pub async fn before_boot(&mut self, boot: usize, i: usize, guest: &impl GuestDevice) {
        let Some((o, _)) = self.doomed else {
            return;
        };
        if boot != 2 || i != self.stop_at {
            return;
        }
        let r = &self.others[o];
        let before = r.kbs.metrics.releases.load(Ordering::Relaxed);
        r.endpoint.close(0u32.into(), b"replica stopped");
        let probe = fetch_within(&r.broker, "vm-probe", guest, None, Duration::from_secs(2)).await;
        if matches!(probe, Err(ClientError::Connect(_))) {
            self.stopped = Some((r.broker.addr, before));
        }
    }

    /// The replicas still serving, after the first.
    pub fn running(&self) -> impl Iterator<Item = &Broker> {
        let stopped = self.stopped.map(|(a, _)| a);
        self.others
            .iter()
            .map(|r| &r.broker)
            .filter(move |b| Some(b.addr) != stopped)
    }

    /// What the stop showed once every boot is done; `None` with one replica.
    pub fn outcome(&self, first: &Kbs, vms: usize) -> Option<ReplicaRun> {
        let (o, k) = self.doomed?;
        let releases = std::iter::once(first)
            .chain(self.others.iter().map(|r| &*r.kbs))
            .map(|b| b.metrics.releases.load(Ordering::Relaxed))
            .collect();
        // Guests that started at the stopped replica after the stop, and were released anyway.
        let failed_over = match self.stopped {
            Some(_) => (self.stop_at..vms)
                .filter(|i| first_broker(&format!("vm-{i}"), self.brokers.len()) == k)
                .count(),
            None => 0,
        };
        let now = self.others[o].kbs.metrics.releases.load(Ordering::Relaxed);
        Some(ReplicaRun {
            stopped: self.stopped.map(|(a, _)| a),
            failed_over,
            released_after_stop: self.stopped.map_or(0, |(_, b)| now.saturating_sub(b)),
            releases,
        })
    }
}
