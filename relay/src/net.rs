//! The UDP socket under QUIC.
//!
//! A relay fans one talker's frame out to hundreds of members at once and
//! takes their acknowledgements in the same burst, every 20 ms. The
//! kernel's default socket buffer (about 208 KiB) holds only a few hundred
//! such datagrams, and a datagram dropped there costs QUIC a loss-recovery
//! timeout, hundreds of milliseconds of latency. So the socket asks for
//! large buffers, and says so when the kernel grants less.

use std::io;
use std::net::{SocketAddr, UdpSocket};

/// The socket buffer size asked for, each way.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a UDP socket with [`SOCKET_BUFFER`]-sized buffers (or the most
/// the kernel allows, `net.core.rmem_max`/`wmem_max`, with a warning).
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    let sock = socket2::SockRef::from(&socket);
    // Failing to grow the buffers is not fatal: the relay works, with more
    // loss under bursts; the warning below tells the operator.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let granted = sock.recv_buffer_size().unwrap_or(0);
    // Linux reports twice the size set (it counts its bookkeeping).
    if granted < SOCKET_BUFFER {
        tracing::warn!(
            granted,
            wanted = SOCKET_BUFFER,
            "UDP receive buffer is small; large groups may lose packets under bursts \
             (raise it with: sysctl -w net.core.rmem_max={SOCKET_BUFFER} net.core.wmem_max={SOCKET_BUFFER})"
        );
    }
    Ok(socket)
}

/// Most datagrams handed to the kernel in one [`send_batch`] system call.
pub const SEND_BATCH: usize = 64;

/// Datagrams to send together: their bytes back to back, each with its
/// destination. Built once per frame for every member of a fan-out, then
/// sent with [`send_batch`].
#[derive(Debug, Default)]
pub struct Batch {
    /// The datagrams' bytes, one after the other.
    pub bytes: Vec<u8>,
    /// Each datagram's end in `bytes` and its destination.
    pub datagrams: Vec<(usize, SocketAddr)>,
}

impl Batch {
    /// Records the bytes appended to `bytes` since the last datagram as one
    /// datagram to `to`.
    pub fn push(&mut self, to: SocketAddr) {
        self.datagrams.push((self.bytes.len(), to));
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// Whether no datagram waits.
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Forgets every datagram (keeps the memory).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.datagrams.clear();
    }

    /// Each datagram's bytes and destination.
    fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        let mut start = 0;
        self.datagrams.iter().map(move |&(end, to)| {
            let d = &self.bytes[start..end];
            start = end;
            (d, to)
        })
    }
}

/// Sends every datagram of `batch` from `socket` without waiting, with one
/// `sendmmsg` system call per [`SEND_BATCH`] datagrams on Linux (one
/// `sendto` each elsewhere); returns how many datagrams and bytes the
/// kernel took. A datagram the socket cannot take at once is dropped, as
/// UDP may drop it anyway: the media path's receivers recover lost frames
/// from the store (PROTOCOL.md §14.4).
///
/// Why: on the live path one `sendto` per member was 38 % of the relay's
/// CPU (issue #15's profile), a system call per 20 ms frame per member.
pub fn send_batch(socket: &tokio::net::UdpSocket, batch: &Batch) -> (u64, u64) {
    let (mut sent, mut bytes) = (0u64, 0u64);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let all: Vec<(&[u8], SocketAddr)> = batch.iter().collect();
        for chunk in all.chunks(SEND_BATCH) {
            match sendmmsg(socket, chunk) {
                Ok(n) => {
                    sent += n as u64;
                    bytes += chunk[..n].iter().map(|(d, _)| d.len() as u64).sum::<u64>();
                    if n < chunk.len() {
                        // The socket's buffer is full: the rest would fail too.
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    for (d, to) in batch.iter() {
        if socket.try_send_to(d, to).is_ok() {
            sent += 1;
            bytes += d.len() as u64;
        }
    }
    (sent, bytes)
}

/// One `sendmmsg` of `datagrams` (at most [`SEND_BATCH`]) through tokio's
/// readiness (a socket not writable answers `WouldBlock` without a system
/// call, as `try_send_to` does); how many the kernel took.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn sendmmsg(
    socket: &tokio::net::UdpSocket,
    datagrams: &[(&[u8], SocketAddr)],
) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage};
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;

    let slices: Vec<[IoSlice<'_>; 1]> = datagrams.iter().map(|(d, _)| [IoSlice::new(d)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> = datagrams
        .iter()
        .map(|(_, to)| Some(SockaddrStorage::from(*to)))
        .collect();
    socket.try_io(tokio::io::Interest::WRITABLE, || {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slices.len(), None);
        let results = nix::sys::socket::sendmmsg(
            socket.as_raw_fd(),
            &mut headers,
            &slices,
            &addrs,
            [],
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(results.count())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_on_loopback_with_a_buffer() {
        let socket = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(socket.local_addr().unwrap().port() > 0);
        let size = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        assert!(size > 0);
    }

    /// A batch larger than one system call's worth, to three receivers:
    /// every datagram arrives once, whole, at its own destination.
    #[tokio::test]
    async fn a_batch_reaches_every_destination_whole() {
        let from = tokio::net::UdpSocket::from_std({
            let s = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .unwrap();
        let to: Vec<UdpSocket> = (0..3)
            .map(|_| udp_socket("127.0.0.1:0".parse().unwrap()).unwrap())
            .collect();
        let mut batch = Batch::default();
        let n = SEND_BATCH * 2 + 5;
        for i in 0..n {
            batch.bytes.extend_from_slice(&(i as u32).to_be_bytes());
            batch.bytes.extend(std::iter::repeat_n(i as u8, i % 40));
            batch.push(to[i % 3].local_addr().unwrap());
        }
        // The socket is writable from the start only once tokio has seen it.
        from.writable().await.unwrap();
        let (sent, bytes) = send_batch(&from, &batch);
        assert_eq!(sent, n as u64);
        assert_eq!(bytes, batch.bytes.len() as u64);
        let mut got = Vec::new();
        for (r, socket) in to.iter().enumerate() {
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 64];
            for _ in (0..n).filter(|i| i % 3 == r) {
                let len = socket.recv(&mut buf).unwrap();
                let i = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                assert_eq!(i % 3, r, "datagram {i} at the wrong receiver");
                assert_eq!(&buf[4..len], &vec![i as u8; i % 40][..]);
                got.push(i);
            }
        }
        got.sort();
        assert_eq!(got, (0..n).collect::<Vec<_>>());
    }
}
