//! Several relay nodes on NATS JetStream (issue #10): the three seams
//! implemented over one NATS system, so that members of one group may sit
//! on different nodes.
//!
//! - [`log::NatsLog`] ([`crate::log::GroupLog`]): a stream of clips over
//!   the subjects `<prefix>.clips.<group>`, each clip one message with
//!   `Nats-Msg-Id` = its clip id and the group's sequence number in a
//!   `Ptt-Seq` header; numbers without gaps come from
//!   `Nats-Expected-Last-Subject-Sequence` with a retry on conflict. Live
//!   frames cross nodes on core NATS subjects `<prefix>.live.<group>`, one
//!   subscription per node and group.
//! - [`floor::NatsFloor`] ([`crate::floor::FloorArbiter`]): one key per
//!   group in the `<prefix>_floor` bucket, taken by compare-and-set with a
//!   lease; every node watches the bucket and announces the changes.
//! - [`store::NatsStore`] ([`crate::store::ClipStore`]): groups and
//!   members in `<prefix>_groups` (watched by each feed), cursors in
//!   `<prefix>_cursors`, channels' followers, invite codes and counts in
//!   `<prefix>_channels`.
//!
//! [`Nats`] is the connection and the handles they share. A failing NATS
//! (down, unreachable, a timeout) turns into [`StoreError::Backend`], which
//! reaches clients as `Internal`; the first failure and the recovery are
//! logged once each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::config::ClusterConfig;
use crate::store::{RetentionPolicy, StoreError};

pub mod floor;
pub mod log;
pub mod store;

pub use floor::NatsFloor;
pub use log::NatsLog;
pub use store::NatsStore;

/// Bytes a clip message carries besides its frames and waveform (metadata,
/// headers, per-frame lengths are counted separately).
const MESSAGE_OVERHEAD: usize = 1024;

/// One relay node's connection to NATS and the stream and buckets every
/// seam uses.
pub struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    groups: kv::Store,
    cursors: kv::Store,
    floor: kv::Store,
    /// `id.<group>.<clip id>` → seq, `seq.<group>.<seq>` → stream sequence.
    index: kv::Store,
    /// `<group>` → the group's last sequence number (no expiry).
    last: kv::Store,
    /// `<group>` → its deleted clips (JSON), kept as long as clips are.
    tombstones: kv::Store,
    /// Channels' followers, follower counts, invite codes and counts
    /// (`store/channels.rs`).
    channels: kv::Store,
    /// This process's id among the nodes (random).
    node: u64,
    prefix: String,
    max_payload: usize,
    healthy: AtomicBool,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("node", &format_args!("{:016x}", self.node))
            .field("prefix", &self.prefix)
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

impl Nats {
    /// Connects to the servers of `config`, and creates the stream and
    /// buckets if they do not exist (with `retention` as the stream's
    /// limits). Fails if no server answers.
    pub async fn connect(
        config: &ClusterConfig,
        retention: RetentionPolicy,
    ) -> Result<Arc<Nats>, StoreError> {
        let mut options = async_nats::ConnectOptions::new()
            .name("ptt-relay")
            .connection_timeout(config.request_timeout)
            .request_timeout(Some(config.request_timeout))
            .max_reconnects(None)
            // What may queue while the server is away (live frames are
            // published without waiting).
            .client_capacity(4096);
        if let Some(path) = &config.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| backend("reading the credentials file", e))?;
        }
        let client = options
            .connect(config.nats.as_slice())
            .await
            .map_err(|e| backend("connecting to NATS", e))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        let limit = |n: u64| if n == 0 { -1 } else { n as i64 };
        let stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: vec![format!("{}.clips.>", config.prefix)],
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                duplicate_window: config.duplicate_window,
                max_age: Duration::from_millis(retention.max_age_ms),
                max_messages_per_subject: limit(retention.max_clips_per_group),
                max_messages: -1,
                max_bytes: -1,
                max_message_size: -1,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .map_err(|e| backend("creating the clip stream", e))?;
        let bucket = |name: &str, max_age: Duration| Bucket {
            name: format!("{}_{name}", config.prefix),
            max_age,
            replicas: config.replicas,
        };
        let index_age = Duration::from_millis(retention.max_age_ms);
        let groups = key_value(&js, bucket("groups", Duration::ZERO)).await?;
        let cursors = key_value(&js, bucket("cursors", Duration::ZERO)).await?;
        let floor = key_value(&js, bucket("floor", Duration::ZERO)).await?;
        let index = key_value(&js, bucket("clips", index_age)).await?;
        let last = key_value(&js, bucket("last", Duration::ZERO)).await?;
        let tombstones = key_value(&js, bucket("tombstones", index_age)).await?;
        let channels = key_value(&js, bucket("channels", Duration::ZERO)).await?;
        let max_payload = client.server_info().max_payload;
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| StoreError::Backend("no system randomness for the node id".into()))?;
        Ok(Arc::new(Nats {
            client,
            js,
            stream,
            groups,
            cursors,
            floor,
            index,
            last,
            tombstones,
            channels,
            node: u64::from_be_bytes(id),
            prefix: config.prefix.clone(),
            max_payload,
            healthy: AtomicBool::new(true),
        }))
    }

    /// This node's id (random per process).
    pub fn node(&self) -> u64 {
        self.node
    }

    /// The largest clip, in bytes of frames, whose message fits the
    /// servers' `max_payload` with `max_frames` frames: the relay bounds
    /// clips rather than chunking them (see the README's Cluster section).
    pub fn max_clip_bytes(&self, max_frames: usize) -> usize {
        self.max_payload.saturating_sub(
            MESSAGE_OVERHEAD + max_frames * 3 + ptt_protocol::message::MAX_WAVEFORM_LEN,
        )
    }

    /// Whether this node is connected to a NATS server now (what `/readyz`
    /// asks of the cluster backend): false from the moment the connection
    /// is lost until the client has reconnected to one of the servers.
    pub fn reachable(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Closes the connection, sending what is queued first.
    pub async fn close(&self) {
        if let Err(e) = self.client.flush().await {
            tracing::debug!(error = %e, "flushing NATS at close");
        }
    }

    fn clip_subject(&self, group: &str) -> String {
        format!("{}.clips.{}", self.prefix, token(group))
    }

    fn live_subject(&self, group: &str) -> String {
        format!("{}.live.{}", self.prefix, token(group))
    }

    /// Records the outcome of an operation: logs the first failure after a
    /// success and the first success after a failure.
    fn track<T>(&self, what: &str, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("NATS answers again: clips are accepted");
                }
            }
            Err(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(
                        error = %e,
                        operation = what,
                        "NATS is unreachable or failing: new clips are refused with Internal \
                         until it answers again (the client reconnects by itself)"
                    );
                } else {
                    tracing::debug!(error = %e, operation = what, "NATS still failing");
                }
            }
        }
        result
    }
}

/// A group or user id as one subject token and key part: `[A-Za-z0-9_-]`
/// kept, every other byte as `=XX` (ids are `[A-Za-z0-9-_.@]`, and `.`
/// separates subject tokens; `=` never occurs in an id, so this is
/// one-to-one).
pub fn token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// A NATS failure as a store error.
fn backend(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("NATS: {what}: {error}"))
}

/// A key-value bucket to open or create.
struct Bucket {
    name: String,
    max_age: Duration,
    replicas: usize,
}

/// Opens a bucket, creating it if it does not exist. The bucket's stream is
/// made here as `create_key_value` would, but without its account query,
/// whose answer from NATS 2.9 the client cannot parse.
async fn key_value(js: &jetstream::Context, bucket: Bucket) -> Result<kv::Store, StoreError> {
    let config = stream::Config {
        name: format!("KV_{}", bucket.name),
        subjects: vec![format!("$KV.{}.>", bucket.name)],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_messages: -1,
        max_message_size: -1,
        max_age: bucket.max_age,
        storage: stream::StorageType::File,
        num_replicas: bucket.replicas,
        allow_rollup: true,
        deny_delete: true,
        // Reads go through the stream's leader, not "direct gets" that any
        // replica may answer: with replicas 3 a follower can lag behind a
        // write just acknowledged, and a group created, then read to add a
        // member, came back missing (`NoSuchGroup`, seen in cluster3). A
        // compare-and-set loop survives a stale revision, not a stale
        // absence; the leader costs a little read throughput.
        allow_direct: false,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| backend(&format!("creating bucket {}", bucket.name), e))?;
    js.get_key_value(&bucket.name)
        .await
        .map_err(|e| backend(&format!("opening bucket {}", bucket.name), e))
}

/// Reads a decimal number stored as a value.
fn parse_u64(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_subject_and_key_safe_and_distinct() {
        assert_eq!(token("team-1_a"), "team-1_a");
        assert_eq!(token("a.b@c"), "a=2Eb=40c");
        assert_ne!(token("a.b"), token("a_b"));
        assert!(token("x.y@z").bytes().all(|b| b != b'.' && b != b'@'));
    }
}
