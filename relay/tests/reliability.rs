//! Reliability under process kills (issue #12): a real `relay serve`
//! process is killed with SIGKILL at random moments while talkers upload
//! and listeners receive, and restarted on the same data directory. The
//! driver is `client_sim::kill` (the long run: `scripts/kill-soak.sh`).

use std::ffi::OsString;
use std::time::Duration;

use client_sim::kill::{KillPlan, run};

/// A few kills (< 60 s): nothing acknowledged is lost, nothing is
/// delivered twice as new or partial as complete, and clips cut mid-upload
/// are re-sent and land once with one seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_clips_survive_repeated_kills() {
    let dir = tempfile::tempdir().unwrap();
    let relay: Vec<OsString> = [
        env!("CARGO_BIN_EXE_relay"),
        "serve",
        "--worker-threads",
        "1",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    // A fixed seed: the same kill moments on every run.
    let mut plan = KillPlan::new(relay, dir.path().join("data"), 4, 0x12_0004);
    plan.settle = Duration::from_secs(15);
    let report = tokio::time::timeout(Duration::from_secs(120), run(&plan, |l| eprintln!("{l}")))
        .await
        .expect("the kill run ends in time")
        .expect("the kill run works");
    eprintln!("{report:#?}");
    assert!(report.passed(), "failures: {:#?}", report.failures);
    assert_eq!(report.kills, 4);
    assert!(report.clips_acknowledged >= 10, "{report:?}");
    // The kills did cut clips mid-upload, and those were re-sent.
    assert!(report.clips_resent > 0, "{report:?}");
    assert_eq!(report.deliveries_ok, report.deliveries_expected);
}

// ---------------------------------------------------------------------------
// The group log against a model.

mod log_model {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    use bytes::Bytes;
    use proptest::prelude::*;
    use ptt_protocol::{ClipFormat, ClipId, GroupMode};
    use ptt_relay::log::{GroupLog, LocalLog};
    use ptt_relay::store::{AppendOutcome, ClipMeta, ClipStore, NewClip, RedbStore};

    const GROUPS: [&str; 2] = ["g0", "g1"];
    const USERS: [&str; 2] = ["u0", "u1"];

    #[derive(Debug, Clone)]
    enum Op {
        /// Append clip id `id` (few ids, so retries are frequent) with
        /// `frames` frames.
        Append { group: usize, id: u8, frames: u8 },
        /// Read up to `limit` clips after `after`.
        Read {
            group: usize,
            after: u64,
            limit: usize,
        },
        /// Move a member's cursor (maybe backwards).
        Cursor { group: usize, user: usize, seq: u64 },
        /// Close the store and open it again.
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..2usize, 0..12u8, 0..4u8)
                .prop_map(|(group, id, frames)| Op::Append { group, id, frames }),
            2 => (0..2usize, 0..14u64, 1..6usize)
                .prop_map(|(group, after, limit)| Op::Read { group, after, limit }),
            2 => (0..2usize, 0..2usize, 0..14u64)
                .prop_map(|(group, user, seq)| Op::Cursor { group, user, seq }),
            1 => Just(Op::Reopen),
        ]
    }

    /// What the log must hold: per group the clip ids in seq order (seq
    /// = index + 1), and each cursor.
    #[derive(Default)]
    struct Model {
        clips: HashMap<usize, Vec<(ClipId, u8)>>,
        cursors: HashMap<(usize, usize), u64>,
    }

    fn clip(group: usize, id: u8, frames: u8) -> NewClip {
        NewClip {
            meta: ClipMeta {
                group: GROUPS[group].to_owned(),
                clip_id: ClipId::from_bytes([id; 16]),
                talker: "t".into(),
                format: ClipFormat::Opus,
                sample_rate: 48_000,
                channels: 1,
                frame_ms: 20,
                created_ms: 1,
                flags: 0,
            },
            frames: (0..frames).map(|i| Bytes::from(vec![id, i])).collect(),
            waveform: Bytes::new(),
        }
    }

    async fn open(dir: &Path) -> (Arc<RedbStore>, LocalLog) {
        let store = Arc::new(RedbStore::open(dir).expect("store opens"));
        (store.clone(), LocalLog::new(store))
    }

    async fn check(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut log) = open(dir.path()).await;
        for g in GROUPS {
            store
                .create_group(g, GroupMode::Notes, 60_000)
                .await
                .unwrap();
        }
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Append { group, id, frames } => {
                    let clip_id = ClipId::from_bytes([id; 16]);
                    let clips = model.clips.entry(group).or_default();
                    let expected = match clips.iter().position(|(c, _)| *c == clip_id) {
                        // Dedup by clip id: the first copy's seq, nothing stored.
                        Some(i) => AppendOutcome::Duplicate { seq: i as u64 + 1 },
                        None => {
                            clips.push((clip_id, frames));
                            AppendOutcome::Stored {
                                seq: clips.len() as u64,
                            }
                        }
                    };
                    let got = log.append(clip(group, id, frames)).await.unwrap();
                    prop_assert_eq!(got, expected);
                    let seq = log.clip_seq(GROUPS[group], clip_id).await.unwrap();
                    prop_assert_eq!(seq, Some(expected.seq()));
                }
                Op::Read {
                    group,
                    after,
                    limit,
                } => {
                    let got = log.read(GROUPS[group], after, limit).await.unwrap();
                    let clips = model.clips.get(&group).map_or(&[][..], Vec::as_slice);
                    // Gapless: exactly the clips after `after`, in order.
                    let want: Vec<(u64, ClipId, u8)> = clips
                        .iter()
                        .enumerate()
                        .map(|(i, (c, f))| (i as u64 + 1, *c, *f))
                        .filter(|(seq, _, _)| *seq > after)
                        .take(limit)
                        .collect();
                    let got: Vec<(u64, ClipId, u8)> = got
                        .iter()
                        .map(|c| (c.seq, c.meta.clip_id, c.frames.len() as u8))
                        .collect();
                    prop_assert_eq!(got, want);
                    let range = log.range(GROUPS[group]).await.unwrap();
                    prop_assert_eq!(range.last, clips.len() as u64);
                }
                Op::Cursor { group, user, seq } => {
                    store
                        .advance_cursor(GROUPS[group], USERS[user], seq)
                        .await
                        .unwrap();
                    let cursor = model.cursors.entry((group, user)).or_default();
                    // Monotone: a cursor never moves back.
                    *cursor = (*cursor).max(seq);
                }
                Op::Reopen => {
                    drop(log);
                    drop(store);
                    (store, log) = open(dir.path()).await;
                }
            }
            for (g, group) in GROUPS.iter().enumerate() {
                for (u, user) in USERS.iter().enumerate() {
                    let got = store.cursor(group, user).await.unwrap();
                    let want = model.cursors.get(&(g, u)).copied().unwrap_or(0);
                    prop_assert_eq!(got, want, "cursor of {} in {}", user, group);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Appends deduplicated by clip id, seqs without gaps, reads in
        /// order, cursors monotone, all across reopening the store.
        #[test]
        fn the_group_log_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(check(ops))?;
        }
    }
}

// ---------------------------------------------------------------------------
// Fuzzing: the seed corpus and every crash found, replayed.

/// The fuzz targets' checks (`fuzz/src/lib.rs`, the same file the fuzz
/// targets call).
#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_checks;

/// Every input under `fuzz/seeds/<target>/` (the committed seed corpus) and
/// `fuzz/regressions/<target>/` (each crash `scripts/fuzz.sh` found, kept
/// after the fix) runs through its target's check without a panic.
#[test]
fn fuzz_seeds_and_past_crashes_replay_clean() {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for (target, check) in fuzz_checks::TARGETS {
        for dir in ["seeds", "regressions"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                eprintln!("{target}: {}", path.display());
                check(&data);
                replayed += 1;
            }
        }
    }
    assert!(replayed >= 7, "the seed corpus is missing");
}

// ---------------------------------------------------------------------------
// Power loss: the store on storage that forgets unsynced writes.

mod power_loss {
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    use bytes::Bytes;
    use ptt_protocol::{ClipFormat, ClipId, GroupMode};
    use ptt_relay::store::{ClipMeta, ClipStore, NewClip, RedbStore};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// One write the disk was asked for since the last sync.
    #[derive(Debug)]
    enum Pending {
        Write(u64, Vec<u8>),
        SetLen(u64),
    }

    /// A disk: what survives a power cut (`durable`, the image at the last
    /// `sync_data`), what the running system sees (`current`), and the
    /// writes in between. After the cut it fails every operation.
    #[derive(Debug, Default)]
    struct Disk {
        durable: Vec<u8>,
        current: Vec<u8>,
        pending: Vec<Pending>,
        off: bool,
    }

    impl Disk {
        /// Cuts the power: the image the disk holds afterwards is the last
        /// synced one plus an arbitrary subset of the unsynced writes (a
        /// disk cache flushes some pages and not others, in any order).
        fn cut(&mut self, rng: &mut SmallRng) -> Vec<u8> {
            self.off = true;
            let mut image = self.durable.clone();
            for p in &self.pending {
                if !rng.random_bool(0.5) {
                    continue;
                }
                match p {
                    Pending::SetLen(len) => image.resize(*len as usize, 0),
                    Pending::Write(offset, data) => {
                        let end = *offset as usize + data.len();
                        if image.len() < end {
                            image.resize(end, 0);
                        }
                        image[*offset as usize..end].copy_from_slice(data);
                    }
                }
            }
            image
        }
    }

    #[derive(Debug, Clone)]
    struct PowerCutBackend(Arc<Mutex<Disk>>);

    impl PowerCutBackend {
        fn from_image(image: Vec<u8>) -> PowerCutBackend {
            PowerCutBackend(Arc::new(Mutex::new(Disk {
                durable: image.clone(),
                current: image,
                ..Disk::default()
            })))
        }

        fn disk(&self) -> std::io::Result<MutexGuard<'_, Disk>> {
            let disk = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if disk.off {
                return Err(std::io::Error::other("the power is off"));
            }
            Ok(disk)
        }
    }

    impl redb::StorageBackend for PowerCutBackend {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.disk()?.current.len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let disk = self.disk()?;
            let start = offset as usize;
            let src = disk
                .current
                .get(start..start + out.len())
                .ok_or_else(|| std::io::Error::other("read past the end"))?;
            out.copy_from_slice(src);
            Ok(())
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            let mut disk = self.disk()?;
            disk.current.resize(len as usize, 0);
            disk.pending.push(Pending::SetLen(len));
            Ok(())
        }

        fn sync_data(&self) -> std::io::Result<()> {
            let mut disk = self.disk()?;
            disk.durable = disk.current.clone();
            disk.pending.clear();
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut disk = self.disk()?;
            let end = offset as usize + data.len();
            if disk.current.len() < end {
                return Err(std::io::Error::other("write past the end"));
            }
            disk.current[offset as usize..end].copy_from_slice(data);
            disk.pending.push(Pending::Write(offset, data.to_vec()));
            Ok(())
        }
    }

    fn clip_id(round: u32, k: u32) -> ClipId {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&round.to_be_bytes());
        id[4..8].copy_from_slice(&k.to_be_bytes());
        ClipId::from_bytes(id)
    }

    /// The frames of a clip, from its id.
    fn frames(id: ClipId) -> Vec<Bytes> {
        let b = id.as_bytes();
        (0..(b[3] % 5 + b[7] % 7 + 1))
            .map(|i| Bytes::from(vec![b[3], b[7], i, 0xf8, 0xff]))
            .collect()
    }

    fn new_clip(id: ClipId) -> NewClip {
        NewClip {
            meta: ClipMeta {
                group: "team".into(),
                clip_id: id,
                talker: "alice".into(),
                format: ClipFormat::Opus,
                sample_rate: 48_000,
                channels: 1,
                frame_ms: 20,
                created_ms: 1,
                flags: 0,
            },
            frames: frames(id),
            waveform: Bytes::new(),
        }
    }

    /// What the store holds must be gapless, each clip whole, and include
    /// every clip acknowledged before the cut.
    async fn check(store: &RedbStore, acknowledged: &[(u64, ClipId)]) -> Vec<ClipId> {
        let clips = store.clips_after("team", 0, usize::MAX).await.unwrap();
        let mut ids = Vec::new();
        for (i, clip) in clips.iter().enumerate() {
            assert_eq!(clip.seq, i as u64 + 1, "seqs without gaps");
            assert_eq!(
                clip.frames,
                frames(clip.meta.clip_id),
                "clip #{} whole",
                clip.seq
            );
            assert!(!ids.contains(&clip.meta.clip_id), "stored once");
            ids.push(clip.meta.clip_id);
        }
        for (seq, id) in acknowledged {
            let held = clips.get(*seq as usize - 1).map(|c| c.meta.clip_id);
            assert_eq!(held, Some(*id), "acknowledged clip #{seq} survives");
        }
        ids
    }

    /// 40 power cuts at random moments while clips are appended 4 at a
    /// time (group commit) and cursors written without fsync: each time
    /// the store opens, every acknowledged clip is there, whole, with its
    /// seq, and nothing else is half there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_clips_survive_power_loss() {
        let seed = 0x12_0002;
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut image = Vec::new();
        let mut acknowledged: Vec<(u64, ClipId)> = Vec::new();
        let mut kept_unacknowledged = 0;
        for round in 0..40u32 {
            let backend = PowerCutBackend::from_image(std::mem::take(&mut image));
            let store = Arc::new(
                RedbStore::open_with_backend(backend.clone(), format!("disk-{round}").into())
                    .unwrap_or_else(|e| {
                        panic!("round {round} (seed {seed}): the store opens: {e}")
                    }),
            );
            if round == 0 {
                store
                    .create_group("team", GroupMode::Notes, 60_000)
                    .await
                    .unwrap();
                store.add_member("team", "bob").await.unwrap();
            }
            let held = check(&store, &acknowledged).await;
            kept_unacknowledged += held.len() - acknowledged.len();
            // Clips stored but never acknowledged (the cut came between the
            // fsync and the answer) count from now on: the talker's retry
            // gets `Duplicate` with that seq.
            acknowledged = held
                .iter()
                .enumerate()
                .map(|(i, id)| (i as u64 + 1, *id))
                .collect();

            let mut writers = tokio::task::JoinSet::new();
            for k in 0..4u32 {
                let store = store.clone();
                writers.spawn(async move {
                    let mut done = Vec::new();
                    for n in 0..50u32 {
                        let id = clip_id(round, k * 1000 + n);
                        match store.append_clip(new_clip(id)).await {
                            Ok(outcome) => done.push((outcome.seq(), id)),
                            Err(_) => break,
                        }
                        // Cursor batches commit without fsync.
                        let _ = store.advance_cursor("team", "bob", u64::from(n)).await;
                    }
                    done
                });
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(1..60))).await;
            image = backend.0.lock().unwrap().cut(&mut rng);
            while let Some(done) = writers.join_next().await {
                acknowledged.extend(done.unwrap());
            }
            acknowledged.sort_unstable();
            drop(store);
        }
        // The last image opens too.
        let store =
            RedbStore::open_with_backend(PowerCutBackend::from_image(image), "disk-final".into())
                .unwrap();
        check(&store, &acknowledged).await;
        eprintln!(
            "{} clips acknowledged across 40 power cuts, all present; {kept_unacknowledged} \
             more were stored before a cut without their answer reaching the writer",
            acknowledged.len()
        );
        assert!(acknowledged.len() > 40, "the cuts came after some appends");
    }
}
