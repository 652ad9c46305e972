//! [`MediaSocket`]: one UDP socket for the media paths (PROTOCOL.md,
//! section 14) of many clients in one process, read in batches.
//!
//! A phone runs one client and one media socket; a process that runs
//! hundreds (a load generator such as client-sim, a gateway bridging
//! another network) would otherwise pay, for every received frame, a
//! socket wake-up, a task wake-up and a `recvfrom` system call per client.
//! Here one task reads datagrams for all of them, up to
//! [`quinn::udp::BATCH_SIZE`] per `recvmmsg` (through `quinn-udp`, as
//! quinn's own endpoint does), and hands each to the path named by its
//! clear header's connection id and its source address.
//!
//! The relay allows it as it is: it keys a media peer by connection id and
//! learns each peer's address from its Binds, so many peers may share one
//! address (§14.2).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ptt_protocol::media::PacketHeader;
use quinn::udp::{BATCH_SIZE, RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::media::{PathCore, canonical, sleep_until_opt};
use crate::shared::lock;

/// A path's key on a shared socket: the relay's media address and the
/// connection id it gave (two relays may give the same id).
pub(crate) type PathKey = (SocketAddr, u64);

/// Largest datagram train one receive buffer holds: the kernel may join
/// datagrams of one sender into one buffer (UDP GRO), up to 64 KiB.
const BUFFER_LEN: usize = 64 * 1024;
/// Most datagrams the clients' [`MediaLink`](crate::MediaLink)s may hold
/// back at once on one socket; more are dropped.
const DELAYED_MAX: usize = 65_536;

/// A UDP socket shared by the media paths of many clients in one process:
/// give the same `Arc` to each client's
/// [`ClientConfig::media_socket`](crate::ClientConfig::media_socket). Its
/// reader task ends when the last `Arc` is dropped.
///
/// A client's [`MediaLink`](crate::MediaLink) (a simulated network) still
/// applies to its own datagrams: the reader drops or holds each received
/// one as that client's link says, and the client's Binds and uplink
/// packets pass its link before they leave.
pub struct MediaSocket {
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
}

struct Shared {
    socket: Arc<UdpSocket>,
    state: UdpSocketState,
    paths: Mutex<HashMap<PathKey, Arc<PathCore>>>,
}

impl std::fmt::Debug for MediaSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaSocket")
            .field("local_addr", &self.shared.socket.local_addr().ok())
            .field("paths", &lock(&self.shared.paths).len())
            .finish()
    }
}

impl MediaSocket {
    /// Shares `socket` (bound, of the relay's address family; its receive
    /// buffer sized for the fan-out it will take) and starts its reader.
    /// Must be called inside a tokio runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Arc<MediaSocket>> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let shared = Arc::new(Shared {
            socket,
            state,
            paths: Mutex::new(HashMap::new()),
        });
        let reader = tokio::spawn(read(shared.clone()));
        Ok(Arc::new(MediaSocket { shared, reader }))
    }

    /// Binds a socket to `addr` (port 0: any) and shares it.
    pub async fn bind(addr: SocketAddr) -> io::Result<Arc<MediaSocket>> {
        let socket = UdpSocket::bind(addr).await?.into_std()?;
        MediaSocket::new(socket)
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.socket.local_addr()
    }

    /// How many media paths receive on this socket now.
    pub fn paths(&self) -> usize {
        lock(&self.shared.paths).len()
    }

    /// `relay` as this socket sends to it: an IPv4 address as IPv4-mapped
    /// IPv6 from an IPv6 socket, and the other way round.
    pub(crate) fn reach(&self, relay: SocketAddr) -> SocketAddr {
        match (self.local_addr(), relay) {
            (Ok(SocketAddr::V6(_)), SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            (Ok(SocketAddr::V6(_)), v6) => v6,
            _ => canonical(relay),
        }
    }

    /// The socket, for the paths' Binds and uplink packets.
    pub(crate) fn socket(&self) -> Arc<UdpSocket> {
        self.shared.socket.clone()
    }

    /// Datagrams from `key.0` naming connection `key.1` go to `core`.
    pub(crate) fn join(&self, key: PathKey, core: Arc<PathCore>) {
        lock(&self.shared.paths).insert(key, core);
    }

    /// `core` receives no more; a later path under the same key (a relay
    /// that restarted and gave the id again) keeps its place.
    pub(crate) fn leave(&self, key: PathKey, core: &Arc<PathCore>) {
        let mut paths = lock(&self.shared.paths);
        if paths.get(&key).is_some_and(|c| Arc::ptr_eq(c, core)) {
            paths.remove(&key);
        }
    }
}

impl Drop for MediaSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Datagrams held back by their clients' links: the earliest due first.
type Delayed = BinaryHeap<Reverse<(Instant, u64, PathKey, Vec<u8>)>>;

/// The reader: a batch of datagrams per wake-up, each opened and routed by
/// its path on this task (a path's routing never waits: see
/// `MediaInbox::deliver_live`), or held while its client's link delays it.
async fn read(shared: Arc<Shared>) {
    let mut buffers = vec![vec![0u8; BUFFER_LEN]; BATCH_SIZE];
    let mut metas = vec![RecvMeta::default(); BATCH_SIZE];
    let mut delayed = Delayed::new();
    // Breaks ties between datagrams due at the same instant: arrival order.
    let mut arrivals = 0u64;
    let socket = &shared.socket;
    loop {
        let due = delayed.peek().map(|Reverse((at, ..))| *at);
        tokio::select! {
            ready = socket.readable() => {
                if ready.is_err() {
                    return;
                }
            }
            () = sleep_until_opt(due.map(Into::into)) => {
                release(&shared, &mut delayed, Instant::now());
                continue;
            }
        }
        let mut slices: Vec<IoSliceMut<'_>> =
            buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let received = socket.try_io(Interest::READABLE, || {
            shared
                .state
                .recv(socket.as_ref().into(), &mut slices, &mut metas)
        });
        drop(slices);
        let count = match received {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // ICMP errors reported on the socket and the like: the
                // next datagrams still come.
                tracing::trace!(error = %e, "media socket receive");
                continue;
            }
        };
        let now = Instant::now();
        // The paths' table is locked once per batch (only joins and
        // leaves contend for it), and a path is used where it lies.
        let paths = lock(&shared.paths);
        for (meta, buffer) in metas.iter().zip(buffers.iter_mut()).take(count) {
            let from = canonical(meta.addr);
            let stride = meta.stride.max(1);
            for datagram in buffer[..meta.len].chunks_mut(stride) {
                let Ok(header) = PacketHeader::decode(datagram) else {
                    continue;
                };
                let key = (from, header.conn_id);
                let Some(core) = paths.get(&key) else {
                    continue;
                };
                match core.pass_received(now) {
                    Some(None) => {
                        core.receive(datagram);
                    }
                    Some(Some(due)) if delayed.len() < DELAYED_MAX => {
                        arrivals += 1;
                        delayed.push(Reverse((due, arrivals, key, datagram.to_vec())));
                    }
                    // Lost on the simulated network, or more held than
                    // allowed.
                    _ => {}
                }
            }
        }
    }
}

/// Opens the held datagrams due by `now`, for the paths still here.
fn release(shared: &Shared, delayed: &mut Delayed, now: Instant) {
    let paths = lock(&shared.paths);
    while let Some(Reverse((at, ..))) = delayed.peek()
        && *at <= now
    {
        let Some(Reverse((_, _, key, mut datagram))) = delayed.pop() else {
            break;
        };
        if let Some(core) = paths.get(&key) {
            core.receive(&mut datagram);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_relay_is_reached_in_the_sockets_address_family() {
        let relay: SocketAddr = "127.0.0.1:4434".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4434".parse().unwrap();
        let v4 = MediaSocket::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(v4.reach(relay), relay);
        assert_eq!(v4.reach(mapped), relay);
        assert_eq!(canonical(mapped), relay);
        // A dual-stack socket sends to an IPv4 relay by its mapped address
        // (skipped where the machine has no IPv6).
        if let Ok(v6) = MediaSocket::bind("[::]:0".parse().unwrap()).await {
            assert_eq!(v6.reach(relay), mapped);
            assert_eq!(v6.reach(mapped), mapped);
        }
        assert_eq!(v4.paths(), 0);
    }
}
