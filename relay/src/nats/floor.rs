//! The floor arbiter on a JetStream key-value bucket: one key per walkie
//! group in `<prefix>_floor`.
//!
//! A key's value is its floor: a holder (node, session, user, emergency,
//! granted and expiry times, Unix ms) or free (and whether the last hold
//! ran out). A request reads the key and writes a new holder by
//! compare-and-set on the revision it read, so two nodes never both
//! succeed; the loser reads again and is denied (or pre-empts, for an
//! emergency). A holder whose expiry has passed counts as gone for every
//! request, on every node, whether or not anyone has written that yet.
//!
//! Every node watches the whole bucket ([`NatsFloor::run`]) and turns each
//! change into [`FloorEvent`]s for its hub, in the bucket's order: a new
//! holder is `Taken` (after `Revoked` to the old holder, when it is one of
//! this node's sessions), a free floor `Idle`. The same task ends holds at
//! their expiry: every node tries to write "free, expired" by
//! compare-and-set at the deadline, one succeeds, so the floor of a node
//! that died frees within its lease. Node clocks are assumed to agree
//! within a small fraction of a hold (NTP).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::Operation;
use bytes::Bytes;
use futures_util::StreamExt;
use ptt_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Nats, token};
use crate::floor::{FloorArbiter, FloorEvent, FloorFuture, FloorGrant, FloorListener, Talker};

/// Compare-and-set attempts before a request gives up.
const MAX_ATTEMPTS: usize = 16;
/// Wait before watching again after the watch failed.
const RETRY: Duration = Duration::from_secs(1);

/// A floor as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FloorValue {
    /// The group id (keys are encoded).
    group: String,
    holder: Option<Holder>,
    /// Free because the last hold ran out (else released).
    #[serde(default)]
    expired: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    node: u64,
    session: u64,
    user: String,
    emergency: bool,
    granted_ms: u64,
    expires_ms: u64,
}

/// The [`FloorArbiter`] of a relay node on NATS. See the module
/// documentation.
pub struct NatsFloor {
    nats: Arc<Nats>,
    listener: Arc<dyn FloorListener>,
    /// Session to the groups it was granted through this node.
    held: Mutex<HashMap<u64, Vec<String>>>,
}

impl std::fmt::Debug for NatsFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsFloor")
            .field("nats", &self.nats)
            .finish_non_exhaustive()
    }
}

impl NatsFloor {
    /// An arbiter over `nats` announcing changes to `listener`; changes are
    /// announced only while [`NatsFloor::run`] runs.
    pub fn new(nats: Arc<Nats>, listener: Arc<dyn FloorListener>) -> NatsFloor {
        NatsFloor {
            nats,
            listener,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Watches the bucket and ends holds at their expiry until `shutdown`
    /// is cancelled. Run exactly one per arbiter, in the relay's task
    /// tracker. A failed watch is opened again after a second, from each
    /// key's current value.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut known: HashMap<String, FloorValue> = HashMap::new();
        loop {
            let watch = tokio::select! {
                _ = shutdown.cancelled() => return,
                watch = self.nats.floor.watch_with_history(">") => watch,
            };
            match watch {
                Ok(watch) => {
                    if self.watch(watch, &mut known, &shutdown).await {
                        return;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "watching the floor bucket"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// Follows one watch; `true` when shut down.
    async fn watch(
        &self,
        mut watch: async_nats::jetstream::kv::Watch,
        known: &mut HashMap<String, FloorValue>,
        shutdown: &CancellationToken,
    ) -> bool {
        loop {
            let deadline = next_deadline(known);
            let entry = tokio::select! {
                _ = shutdown.cancelled() => return true,
                entry = watch.next() => entry,
                () = sleep_until_ms(deadline.as_ref().map(|(ms, _)| *ms)) => {
                    if let Some((_, key)) = deadline {
                        self.expire(&key, known).await;
                    }
                    continue;
                }
            };
            let entry = match entry {
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "floor watch failed");
                    return false;
                }
                None => return false,
            };
            let new = match entry.operation {
                Operation::Put => match serde_json::from_slice::<FloorValue>(&entry.value) {
                    Ok(value) => value,
                    Err(e) => {
                        tracing::warn!(key = %entry.key, error = %e, "undecodable floor value");
                        continue;
                    }
                },
                Operation::Delete | Operation::Purge => match known.get(&entry.key) {
                    Some(old) => FloorValue {
                        group: old.group.clone(),
                        holder: None,
                        expired: false,
                    },
                    None => continue,
                },
            };
            let old = known.insert(entry.key.clone(), new.clone());
            for event in self.changes(old.as_ref(), &new) {
                self.listener.floor_event(event);
            }
        }
    }

    /// The events a change of one floor from `old` to `new` announces.
    fn changes(&self, old: Option<&FloorValue>, new: &FloorValue) -> Vec<FloorEvent> {
        let group = new.group.clone();
        let old_holder = old.and_then(|o| o.holder.as_ref());
        if old_holder == new.holder.as_ref() {
            return Vec::new();
        }
        let mut events = Vec::new();
        if let Some(o) = old_holder
            && o.node == self.nats.node
        {
            let code = match &new.holder {
                Some(n) if n.granted_ms < o.expires_ms => Some(ErrorCode::Preempted),
                Some(_) => Some(ErrorCode::ClipTooLong),
                None if new.expired => Some(ErrorCode::ClipTooLong),
                None => None,
            };
            self.untrack(o.session, &group);
            if let Some(code) = code {
                events.push(FloorEvent::Revoked {
                    group: group.clone(),
                    session: o.session,
                    code,
                });
            }
        }
        match &new.holder {
            Some(n) => events.push(FloorEvent::Taken {
                group,
                user: n.user.clone(),
                emergency: n.emergency,
            }),
            None if old_holder.is_some() => events.push(FloorEvent::Idle { group }),
            None => {}
        }
        events
    }

    /// Writes "free, expired" over `key` if it still holds the hold that
    /// ran out (every node tries; the compare-and-set lets one win).
    async fn expire(&self, key: &str, known: &mut HashMap<String, FloorValue>) {
        let Some(value) = known.get(key).cloned() else {
            return;
        };
        let entry = match self.nats.floor.entry(key).await {
            Ok(Some(entry)) => entry,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "reading a floor to expire it");
                // Try again at the next deadline check.
                tokio::time::sleep(RETRY).await;
                return;
            }
        };
        let Ok(current) = serde_json::from_slice::<FloorValue>(&entry.value) else {
            return;
        };
        if current.holder != value.holder {
            return;
        }
        let free = FloorValue {
            group: value.group.clone(),
            holder: None,
            expired: true,
        };
        if let Err(e) = self
            .nats
            .floor
            .update(key, encode(&free), entry.revision)
            .await
        {
            tracing::debug!(error = %e, "another node expired the floor first");
            // The watch brings what won; until then do not spin.
            if let Some(v) = known.get_mut(key)
                && let Some(h) = v.holder.as_mut()
            {
                h.expires_ms = h.expires_ms.saturating_add(RETRY.as_millis() as u64);
            }
        }
    }

    async fn try_request(
        &self,
        group: &str,
        talker: &Talker,
        emergency: bool,
        max_hold: Duration,
    ) -> Result<FloorGrant, String> {
        let key = token(group);
        for _ in 0..MAX_ATTEMPTS {
            let entry = self
                .nats
                .floor
                .entry(key.clone())
                .await
                .map_err(|e| e.to_string())?;
            let now = now_ms();
            let current = entry.as_ref().and_then(|e| {
                (e.operation == Operation::Put)
                    .then(|| serde_json::from_slice::<FloorValue>(&e.value).ok())
                    .flatten()
            });
            if let Some(h) = current
                .as_ref()
                .and_then(|c| c.holder.as_ref())
                .filter(|h| h.expires_ms > now)
            {
                if h.node == self.nats.node && h.session == talker.session {
                    return Ok(FloorGrant::Granted);
                }
                if !emergency || h.emergency {
                    return Ok(FloorGrant::Denied {
                        holder: h.user.clone(),
                    });
                }
            }
            let value = FloorValue {
                group: group.to_owned(),
                holder: Some(Holder {
                    node: self.nats.node,
                    session: talker.session,
                    user: talker.user.to_string(),
                    emergency,
                    granted_ms: now,
                    expires_ms: now + max_hold.as_millis() as u64,
                }),
                expired: false,
            };
            let written = match &entry {
                Some(e) => self
                    .nats
                    .floor
                    .update(&key, encode(&value), e.revision)
                    .await
                    .is_ok(),
                None => self.nats.floor.create(&key, encode(&value)).await.is_ok(),
            };
            if written {
                self.lock()
                    .entry(talker.session)
                    .or_default()
                    .push(group.to_owned());
                return Ok(FloorGrant::Granted);
            }
        }
        Err("the floor kept changing".into())
    }

    async fn try_release(&self, group: &str, session: u64) -> Result<bool, String> {
        let key = token(group);
        for _ in 0..MAX_ATTEMPTS {
            let Some(entry) = self
                .nats
                .floor
                .entry(key.clone())
                .await
                .map_err(|e| e.to_string())?
            else {
                return Ok(false);
            };
            let Ok(current) = serde_json::from_slice::<FloorValue>(&entry.value) else {
                return Ok(false);
            };
            let holds = current.holder.as_ref().is_some_and(|h| {
                h.node == self.nats.node && h.session == session && h.expires_ms > now_ms()
            });
            if !holds {
                return Ok(false);
            }
            let free = FloorValue {
                group: group.to_owned(),
                holder: None,
                expired: false,
            };
            if self
                .nats
                .floor
                .update(&key, encode(&free), entry.revision)
                .await
                .is_ok()
            {
                self.untrack(session, group);
                return Ok(true);
            }
        }
        Err("the floor kept changing".into())
    }

    fn untrack(&self, session: u64, group: &str) {
        let mut held = self.lock();
        if let Some(groups) = held.get_mut(&session) {
            groups.retain(|g| g != group);
            if groups.is_empty() {
                held.remove(&session);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<String>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FloorArbiter for NatsFloor {
    fn request<'a>(
        &'a self,
        group: &'a str,
        talker: &'a Talker,
        emergency: bool,
        max_hold: Duration,
    ) -> FloorFuture<'a, FloorGrant> {
        Box::pin(async move {
            match self.try_request(group, talker, emergency, max_hold).await {
                Ok(grant) => grant,
                Err(e) => {
                    tracing::error!(%group, error = %e, "NATS is unreachable or failing: the floor cannot be granted");
                    FloorGrant::Unavailable
                }
            }
        })
    }

    fn release<'a>(&'a self, group: &'a str, session: u64) -> FloorFuture<'a, bool> {
        Box::pin(async move {
            self.try_release(group, session).await.unwrap_or_else(|e| {
                tracing::warn!(%group, error = %e, "releasing a floor failed; it frees at its expiry");
                false
            })
        })
    }

    fn release_all<'a>(&'a self, session: u64) -> FloorFuture<'a, ()> {
        Box::pin(async move {
            let groups = self.lock().remove(&session).unwrap_or_default();
            for group in groups {
                if let Err(e) = self.try_release(&group, session).await {
                    tracing::warn!(%group, error = %e, "releasing a floor failed; it frees at its expiry");
                }
            }
        })
    }

    fn is_held_by<'a>(&'a self, group: &'a str, session: u64) -> FloorFuture<'a, bool> {
        Box::pin(async move {
            let Ok(Some(raw)) = self.nats.floor.get(token(group)).await else {
                return false;
            };
            serde_json::from_slice::<FloorValue>(&raw)
                .ok()
                .and_then(|v| v.holder)
                .is_some_and(|h| {
                    h.node == self.nats.node && h.session == session && h.expires_ms > now_ms()
                })
        })
    }
}

fn encode(value: &FloorValue) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a floor value serializes"))
}

fn now_ms() -> u64 {
    crate::auth::unix_millis(SystemTime::now())
}

/// The earliest expiry among the holds known, with its key.
fn next_deadline(known: &HashMap<String, FloorValue>) -> Option<(u64, String)> {
    known
        .iter()
        .filter_map(|(key, v)| v.holder.as_ref().map(|h| (h.expires_ms, key.clone())))
        .collect::<BTreeSet<_>>()
        .pop_first()
}

/// Sleeps until Unix time `ms`, or forever.
async fn sleep_until_ms(ms: Option<u64>) {
    match ms {
        Some(ms) => {
            let wait = ms.saturating_sub(now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        None => std::future::pending().await,
    }
}
