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
}
