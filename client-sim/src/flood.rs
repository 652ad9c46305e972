//! A hostile client beside the normal load, to measure what it costs the
//! others: `--flood handshakes` opens QUIC connections as fast as the rate
//! allows, completes each handshake, never says Hello and drops it, from
//! one extra UDP socket on 127.0.0.2. Bounded in rate, in connections in flight and in
//! time (it stops when the normal run ends).

use std::net::SocketAddr;
use std::time::Duration;

use ptt_client::{ClientConfig, Trust};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// The kinds of flooding client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloodKind {
    /// New QUIC handshakes that never authenticate.
    Handshakes,
}

/// What the flood did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodStats {
    /// Handshakes attempted.
    pub attempted: u64,
    /// Handshakes the relay completed.
    pub completed: u64,
}

/// Most handshakes of the flood in flight at once.
const IN_FLIGHT: usize = 64;

/// Floods `addr` with `rate` handshakes a second until `stop` fires.
pub async fn handshakes(
    addr: SocketAddr,
    fingerprint: [u8; 32],
    rate: u32,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<FloodStats> {
    let config = ClientConfig::new(addr, "localhost", Trust::Fingerprint(fingerprint), "");
    // Another loopback address than the normal clients' (127.0.0.1), as a
    // hostile client elsewhere would have: per-address limits tell them
    // apart.
    let mut endpoint = quinn::Endpoint::client("127.0.0.2:0".parse()?)?;
    endpoint.set_default_client_config(ptt_client::quinn_config(&config)?);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut in_flight = JoinSet::new();
    let mut stats = FloodStats::default();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(done) = in_flight.join_next() => {
                if matches!(done, Ok(true)) {
                    stats.completed += 1;
                }
            }
            _ = tick.tick(), if in_flight.len() < IN_FLIGHT => {
                stats.attempted += 1;
                let connecting = endpoint.connect(addr, "localhost")?;
                in_flight.spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
                        Ok(Ok(conn)) => {
                            conn.close(0u32.into(), b"");
                            true
                        }
                        _ => false,
                    }
                });
            }
        }
    }
    in_flight.abort_all();
    while in_flight.join_next().await.is_some() {}
    endpoint.close(0u32.into(), b"");
    Ok(stats)
}
