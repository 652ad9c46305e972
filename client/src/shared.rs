//! State shared by the client handles, the connection task, the clip
//! reader tasks and the talks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ptt_protocol::message::encode_frame;
use ptt_protocol::{ClipHeader, ClipId, ClipMessage, ControlMessage, Welcome};
use tokio::sync::{mpsc, oneshot};

use crate::config::ClientConfig;
use crate::dedup::DedupCache;
use crate::error::ClientError;
use crate::event::Event;

/// Locks a mutex, ignoring poisoning (a panicking task leaves consistent
/// data behind: every critical section here is a few assignments).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One of our clips, as durable in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClip {
    /// The group.
    pub group: String,
    /// Our clip id.
    pub clip_id: ClipId,
    /// Its sequence number in the group.
    pub seq: u64,
}

/// Counters of what the client did, for tests and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Clips received whole (each once).
    pub clips_received: u64,
    /// Frames received (duplicates excluded).
    pub frames_received: u64,
    /// Completed clips delivered again and dropped.
    pub duplicates_dropped: u64,
    /// Received clips that stopped before their end.
    pub clips_aborted: u64,
    /// Our clips confirmed stored.
    pub clips_stored: u64,
    /// Our clips sent again on a new connection after a reconnect, whole
    /// or (mid-clip) from their first frame.
    pub clips_resent: u64,
    /// Successful reconnections.
    pub reconnects: u64,
    /// `LiveRead` datagrams handed to QUIC: reports of how far live clips
    /// were read, after each header and every second of audio (PROTOCOL.md,
    /// section 9.7).
    pub live_reads_sent: u64,
    /// Live frames received in UDP media packets (PROTOCOL.md, section 14).
    pub media_frames_received: u64,
    /// `BindAck`s accepted on the media path: non-zero once the path is
    /// bound (PROTOCOL.md, section 14.3).
    pub media_binds_acked: u64,
    /// Frames of our uploads sent in `Uplink` packets (PROTOCOL.md §14.3).
    pub media_frames_uplinked: u64,
    /// Live clips whose `ClipStarted` came from a `HeadedFrame`, before
    /// their stream's header (PROTOCOL.md §14.4).
    pub media_clips_announced: u64,
    /// Clips received on the media path with frames missing, fetched whole
    /// before they were acknowledged.
    pub media_clips_fetched: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub clips_received: AtomicU64,
    pub frames_received: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub clips_aborted: AtomicU64,
    pub clips_stored: AtomicU64,
    pub clips_resent: AtomicU64,
    pub reconnects: AtomicU64,
    pub live_reads_sent: AtomicU64,
    pub media_frames_received: AtomicU64,
    pub media_binds_acked: AtomicU64,
    pub media_clips_fetched: AtomicU64,
    pub media_frames_uplinked: AtomicU64,
    pub media_clips_announced: AtomicU64,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ClientStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientStats {
            clips_received: g(&self.clips_received),
            frames_received: g(&self.frames_received),
            duplicates_dropped: g(&self.duplicates_dropped),
            clips_aborted: g(&self.clips_aborted),
            clips_stored: g(&self.clips_stored),
            clips_resent: g(&self.clips_resent),
            reconnects: g(&self.reconnects),
            live_reads_sent: g(&self.live_reads_sent),
            media_frames_received: g(&self.media_frames_received),
            media_binds_acked: g(&self.media_binds_acked),
            media_clips_fetched: g(&self.media_clips_fetched),
            media_frames_uplinked: g(&self.media_frames_uplinked),
            media_clips_announced: g(&self.media_clips_announced),
        }
    }
}

/// The live connection, numbered so that a talk or task can tell whether
/// its stream belongs to the current connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnSlot {
    pub epoch: u64,
    pub conn: quinn::Connection,
}

/// An uploaded clip kept in memory until the relay confirms it stored, so
/// that it can be sent again, whole and under the same id, on a new
/// connection.
#[derive(Debug)]
pub(crate) struct ClipData {
    pub header: ClipHeader,
    pub frames: Vec<Bytes>,
    /// Frame count and waveform, once the talker finished.
    pub end: Option<(u32, Bytes)>,
    /// The connection the current copy is (being) sent on; 0 for none.
    pub sent_epoch: u64,
    /// Set when the clip cannot succeed any more (rejected, aborted,
    /// connection lost without reconnection).
    pub failed: Option<ClientError>,
}

impl ClipData {
    /// Everything sent so far (header, frames, and the end if finished), as
    /// one buffer to write on a fresh stream.
    pub fn snapshot(&self) -> Bytes {
        let mut buf = BytesMut::new();
        ClipMessage::Header(self.header.clone()).encode(&mut buf);
        for (i, f) in self.frames.iter().enumerate() {
            encode_frame(&mut buf, i as u32, f);
        }
        if let Some((frame_count, waveform)) = &self.end {
            ClipMessage::End {
                frame_count: *frame_count,
                seq: 0,
                waveform: waveform.clone(),
            }
            .encode(&mut buf);
        }
        buf.freeze()
    }
}

pub(crate) type Shared<T> = Arc<Mutex<T>>;

/// The driver's bookkeeping of one upload.
#[derive(Debug)]
pub(crate) struct UploadSlot {
    pub clip: Shared<ClipData>,
    pub done: Option<oneshot::Sender<Result<StoredClip, ClientError>>>,
}

/// A fetch in progress: history clips of its group are surfaced even when
/// they were received before.
#[derive(Debug, Default)]
pub(crate) struct FetchState {
    pub requests: u32,
    pub seen: u32,
    pub expected: Option<u32>,
    pub expires: Option<Instant>,
}

/// How long after `FetchDone` history clips of a fetched group still
/// bypass duplicate suppression (their streams may arrive after it).
pub(crate) const FETCH_GRACE: Duration = Duration::from_secs(10);

/// Messages from tasks to the connection task.
#[derive(Debug)]
pub(crate) enum Internal {
    /// A message arrived on the control stream of connection `epoch`.
    Control { epoch: u64, msg: ControlMessage },
    /// The control stream of connection `epoch` ended or broke.
    ControlEnded {
        epoch: u64,
        reason: String,
        protocol_error: bool,
    },
    /// A clip was received whole: acknowledge it.
    Ack { group: String, seq: u64 },
    /// A live clip lost frames on the media path: fetch it whole.
    Fetch { group: String, seq: u64 },
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    /// Where the next connection goes: `config.addr`, until a relay's
    /// GoAway names another.
    pub relay_addr: Mutex<std::net::SocketAddr>,
    pub token: Mutex<String>,
    pub endpoint: quinn::Endpoint,
    pub quinn_config: quinn::ClientConfig,
    pub conn: Mutex<Option<ConnSlot>>,
    pub welcome: Mutex<Welcome>,
    pub uploads: Mutex<HashMap<ClipId, UploadSlot>>,
    pub dedup: Mutex<DedupCache>,
    pub fetching: Mutex<HashMap<String, FetchState>>,
    pub events: crate::event::EventTx,
    pub internal: mpsc::Sender<Internal>,
    pub stats: Stats,
    pub closed: AtomicBool,
    /// The media path's frame router, with the `stable_id` of the
    /// connection it belongs to.
    pub media_inbox: Mutex<Option<(usize, Arc<crate::media::MediaInbox>)>>,
}

impl Inner {
    /// The current connection, if any.
    pub fn current(&self) -> Option<ConnSlot> {
        lock(&self.conn).clone()
    }

    /// The media frame router of connection `conn`, if its path is open.
    pub fn media_inbox(&self, conn: &quinn::Connection) -> Option<Arc<crate::media::MediaInbox>> {
        lock(&self.media_inbox)
            .as_ref()
            .filter(|(id, _)| *id == conn.stable_id())
            .map(|(_, inbox)| inbox.clone())
    }

    /// Whether losing the connection is survivable.
    pub fn reconnects(&self) -> bool {
        self.config.reconnect.is_some() && !self.closed.load(Ordering::Acquire)
    }

    /// Sends an event; the application may have dropped its receiver.
    pub async fn emit(&self, event: Event) {
        self.events.send(event).await;
    }

    /// Whether a history clip of `group` belongs to a fetch and must be
    /// surfaced even if it was received before; counts it.
    pub fn take_fetch_bypass(&self, group: &str) -> bool {
        let mut fetching = lock(&self.fetching);
        let Some(state) = fetching.get_mut(group) else {
            return false;
        };
        if state.expires.is_some_and(|t| Instant::now() > t) {
            fetching.remove(group);
            return false;
        }
        state.seen += 1;
        if state.expected.is_some_and(|n| state.seen >= n) && state.requests == 0 {
            fetching.remove(group);
        }
        true
    }

    /// A fetch of `group` was requested.
    pub fn fetch_started(&self, group: &str) {
        let mut fetching = lock(&self.fetching);
        let state = fetching.entry(group.to_owned()).or_default();
        state.requests += 1;
        state.expires = None;
    }

    /// A fetch of `group` finished (`count` clips sent) or failed (`None`).
    pub fn fetch_finished(&self, group: &str, count: Option<u32>) {
        let mut fetching = lock(&self.fetching);
        let Some(state) = fetching.get_mut(group) else {
            return;
        };
        state.requests = state.requests.saturating_sub(1);
        state.expected = Some(state.expected.unwrap_or(0) + count.unwrap_or(0));
        if state.requests == 0 {
            if state.expected.is_some_and(|n| state.seen >= n) {
                fetching.remove(group);
            } else {
                state.expires = Some(Instant::now() + FETCH_GRACE);
            }
        }
    }
}
