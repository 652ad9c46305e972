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

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ptt_protocol::media::PacketHeader;
use quinn::udp::{BATCH_SIZE, RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::media::{PathCore, canonical};
use crate::shared::lock;

/// A path's key on a shared socket: the relay's media address and the
/// connection id it gave (two relays may give the same id).
pub(crate) type PathKey = (SocketAddr, u64);

/// Largest datagram train one receive buffer holds: the kernel may join
/// datagrams of one sender into one buffer (UDP GRO), up to 64 KiB.
const BUFFER_LEN: usize = 64 * 1024;

/// A UDP socket shared by the media paths of many clients in one process:
/// give the same `Arc` to each client's
/// [`ClientConfig::media_socket`](crate::ClientConfig::media_socket). Its
/// reader task ends when the last `Arc` is dropped.
///
/// Clients with a [`MediaLink`](crate::MediaLink) keep a socket of their
/// own (the simulated network sits between one client's socket and its
/// decryption).
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

/// The reader: a batch of datagrams per wake-up, each opened and routed by
/// its path on this task (a path's routing never waits: see
/// `MediaInbox::deliver_live`).
async fn read(shared: Arc<Shared>) {
    let mut buffers = vec![vec![0u8; BUFFER_LEN]; BATCH_SIZE];
    let mut metas = vec![RecvMeta::default(); BATCH_SIZE];
    let socket = &shared.socket;
    loop {
        if socket.readable().await.is_err() {
            return;
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
                if let Some(core) = paths.get(&(from, header.conn_id)) {
                    core.receive(datagram);
                }
            }
        }
    }
}
