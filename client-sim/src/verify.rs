//! End-to-end delivery verification, as a pure computation.
//!
//! The talkers record what they sent ([`SentClip`]: group, clip id, frame
//! count, an order-sensitive digest of the frames, the outcome of the
//! upload); the receivers record what each member got ([`Received`]: one
//! record per clip that arrived whole, i.e. per `ClipEnded` event). The
//! group membership is known from the set-up. [`verify`] then counts, for
//! every stored clip and every member other than its talker:
//!
//! - **ok**: received whole, with the same frame count, digest and sequence
//!   number as sent, frames in index order;
//! - **missing**: never received whole;
//! - **corrupt**: received, but some copy differs (frames, count, order,
//!   sequence number);
//! - **duplicate**: each complete copy beyond the first;
//! - **misdelivered**: a clip received by someone who is not a member of
//!   its group, under another group, or a clip nobody sent.
//!
//! Sequence numbers must also be consistent: every clip of a group has one
//! sequence number, the same for the talker and every member, and no two
//! clips share one, so that every member orders the group identically.
//! Clips whose upload outcome is unknown (the talker gave up) are not
//! expected anywhere, but a copy that does arrive is still checked.
//!
//! Nothing here does I/O; the unit tests feed it deliberately broken runs.

use std::collections::{BTreeMap, HashMap, HashSet};

use ptt_protocol::ClipId;

/// Index of a simulated user.
pub type UserIdx = u32;
/// Index of a group.
pub type GroupIdx = u32;

/// A group index that names no group of the run (a clip arrived labelled
/// with an unknown group).
pub const UNKNOWN_GROUP: GroupIdx = GroupIdx::MAX;

/// An order-sensitive digest of a clip's frames: each frame's bytes are
/// hashed (FNV-1a, 64 bit) and folded with its index, so a missing,
/// extra, swapped or altered frame changes the digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digest(pub u64);

impl Digest {
    /// The digest of no frames.
    pub const EMPTY: Digest = Digest(0xcbf2_9ce4_8422_2325);

    /// Folds frame `index` with `frame_hash` (see [`frame_hash`]) in.
    pub fn push(self, index: u32, frame_hash: u64) -> Digest {
        let mut h = self.0 ^ u64::from(index).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h = h.rotate_left(27).wrapping_mul(0x0000_0100_0000_01b3);
        Digest(h ^ frame_hash)
    }
}

/// A 64-bit hash of one frame's bytes: FNV-1a over 8-byte words (then the
/// last bytes one by one), finished with a mixing step. Every step is a
/// bijection of the state, so a frame that differs from the sent one in a
/// single word always hashes differently; a word at a time, it costs the
/// receiving simulator an eighth of a byte-wise hash (issue #15 item 6).
pub fn frame_hash(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        h = (h ^ word).wrapping_mul(PRIME).rotate_left(29);
    }
    for &b in words.remainder() {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h ^= data.len() as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// How a talker's upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The relay confirmed it stored as this sequence number: every other
    /// member must receive it.
    Stored(u64),
    /// The relay refused it, or it was abandoned before its end: nobody
    /// may receive it whole.
    Failed,
    /// Not known (the talker gave up waiting): not expected, not forbidden.
    Unknown,
}

/// What a talker sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentClip {
    /// The group.
    pub group: GroupIdx,
    /// The talker.
    pub talker: UserIdx,
    /// The clip id.
    pub clip_id: ClipId,
    /// Frames in the clip.
    pub frame_count: u32,
    /// Digest of all frames, in order.
    pub digest: Digest,
    /// How the upload ended.
    pub outcome: Outcome,
}

/// One clip that arrived whole at a member (one `ClipEnded`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Who received it.
    pub member: UserIdx,
    /// The group it was labelled with ([`UNKNOWN_GROUP`] if unknown).
    pub group: GroupIdx,
    /// The clip id.
    pub clip_id: ClipId,
    /// The sequence number in its end.
    pub seq: u64,
    /// The frame count announced in its end.
    pub frame_count: u32,
    /// Frames actually received in this copy.
    pub frames_seen: u32,
    /// Digest of the frames received, in arrival order with their indices.
    pub digest: Digest,
    /// Whether the frame indices arrived as 0, 1, 2… without gaps.
    pub in_order: bool,
    /// Whether it came from the store (catch-up) rather than live.
    pub history: bool,
}

/// The verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// Clips the talkers finished (stored, failed or unknown).
    pub clips_sent: u64,
    /// Clips confirmed stored.
    pub clips_stored: u64,
    /// Clips refused or abandoned.
    pub clips_failed: u64,
    /// Clips with an unknown outcome.
    pub clips_unknown: u64,
    /// (stored clip, member other than its talker) pairs.
    pub deliveries_expected: u64,
    /// Expected pairs received whole and intact.
    pub deliveries_ok: u64,
    /// Expected pairs never received whole.
    pub deliveries_missing: u64,
    /// Expected pairs with at least one corrupt copy.
    pub deliveries_corrupt: u64,
    /// Complete copies beyond the first, for any pair.
    pub deliveries_duplicate: u64,
    /// Copies received by non-members, under the wrong group, of unknown
    /// clips, or of clips the relay refused.
    pub misdelivered: u64,
    /// Clips whose sequence numbers disagree (between talker and members,
    /// or two clips of a group sharing one).
    pub seq_inconsistent: u64,
    /// Copies of a talker's own clip sent back to it (not a failure).
    pub self_deliveries: u64,
    /// Expected pairs first received from the store (catch-up) rather than
    /// live.
    pub catch_up_deliveries: u64,
    /// Arrivals whose sequence number is lower than one the member already
    /// had in the group (allowed: clips have their own streams and members
    /// order by sequence number; reported for information).
    pub reordered: u64,
    /// A few examples of each failure, for the report (which lists them as
    /// `failure_examples`).
    #[serde(skip)]
    pub examples: Vec<String>,
}

impl Verdict {
    /// Every failure counted together.
    pub fn failures(&self) -> u64 {
        self.deliveries_missing
            + self.deliveries_corrupt
            + self.deliveries_duplicate
            + self.misdelivered
            + self.seq_inconsistent
    }
}

const MAX_EXAMPLES: usize = 20;

fn example(v: &mut Verdict, text: impl FnOnce() -> String) {
    if v.examples.len() < MAX_EXAMPLES {
        v.examples.push(text());
    }
}

/// Compares what was sent with what was received. `members[g]` lists the
/// members of group `g`; `received` may come in any order but each
/// member's records must be in its arrival order (for [`Verdict::reordered`]).
pub fn verify(members: &[Vec<UserIdx>], sent: &[SentClip], received: &[Received]) -> Verdict {
    let mut v = Verdict::default();
    let member_sets: Vec<HashSet<UserIdx>> = members
        .iter()
        .map(|m| m.iter().copied().collect())
        .collect();
    let mut by_id: HashMap<ClipId, &SentClip> = HashMap::with_capacity(sent.len());
    for clip in sent {
        v.clips_sent += 1;
        match clip.outcome {
            Outcome::Stored(_) => v.clips_stored += 1,
            Outcome::Failed => v.clips_failed += 1,
            Outcome::Unknown => v.clips_unknown += 1,
        }
        by_id.insert(clip.clip_id, clip);
    }

    // Sequence numbers: unique per group on the talkers' side.
    let mut seq_owner: HashMap<(GroupIdx, u64), ClipId> = HashMap::new();
    for clip in sent {
        if let Outcome::Stored(seq) = clip.outcome
            && let Some(other) = seq_owner.insert((clip.group, seq), clip.clip_id)
            && other != clip.clip_id
        {
            v.seq_inconsistent += 1;
            example(&mut v, || {
                format!(
                    "clips {other} and {} of group {} were both stored as #{seq}",
                    clip.clip_id, clip.group
                )
            });
        }
    }

    // Copies per (member, clip), in arrival order.
    let mut copies: HashMap<(UserIdx, ClipId), Vec<&Received>> = HashMap::new();
    let mut last_seq: HashMap<(UserIdx, GroupIdx), u64> = HashMap::new();
    let mut seen_seq: HashMap<ClipId, u64> = HashMap::new();
    for r in received {
        let Some(clip) = by_id.get(&r.clip_id) else {
            v.misdelivered += 1;
            example(&mut v, || {
                format!(
                    "user {} received clip {} that nobody sent",
                    r.member, r.clip_id
                )
            });
            continue;
        };
        if r.member == clip.talker {
            v.self_deliveries += 1;
            continue;
        }
        let is_member = member_sets
            .get(clip.group as usize)
            .is_some_and(|m| m.contains(&r.member));
        if r.group != clip.group || !is_member {
            v.misdelivered += 1;
            example(&mut v, || {
                format!(
                    "user {} received clip {} of group {} (labelled group {}), not being a member",
                    r.member, r.clip_id, clip.group, r.group
                )
            });
            continue;
        }
        if clip.outcome == Outcome::Failed {
            v.misdelivered += 1;
            example(&mut v, || {
                format!(
                    "user {} received clip {} whole although the relay refused it",
                    r.member, r.clip_id
                )
            });
            continue;
        }
        // The same clip must carry the same seq everywhere.
        let expected_seq = match clip.outcome {
            Outcome::Stored(seq) => Some(seq),
            _ => seen_seq.get(&r.clip_id).copied(),
        };
        match expected_seq {
            Some(seq) if seq != r.seq => {
                v.seq_inconsistent += 1;
                example(&mut v, || {
                    format!(
                        "user {} received clip {} as #{} but it is #{seq}",
                        r.member, r.clip_id, r.seq
                    )
                });
            }
            None => {
                seen_seq.insert(r.clip_id, r.seq);
            }
            _ => {}
        }
        let last = last_seq.entry((r.member, r.group)).or_insert(0);
        if r.seq < *last {
            v.reordered += 1;
        }
        *last = (*last).max(r.seq);
        copies.entry((r.member, r.clip_id)).or_default().push(r);
    }

    let intact = |clip: &SentClip, r: &Received| {
        r.frame_count == clip.frame_count
            && r.frames_seen == clip.frame_count
            && r.digest == clip.digest
            && r.in_order
    };

    // Every copy of every pair, expected or not.
    for ((member, clip_id), list) in &copies {
        let clip = by_id[clip_id];
        if list.len() > 1 {
            v.deliveries_duplicate += list.len() as u64 - 1;
            example(&mut v, || {
                format!(
                    "user {member} received clip {clip_id} of group {} {} times",
                    clip.group,
                    list.len()
                )
            });
        }
    }

    // Every expected pair.
    for clip in sent {
        let Outcome::Stored(_) = clip.outcome else {
            // Unknown outcome: copies that arrived must still be intact.
            for member in members.get(clip.group as usize).into_iter().flatten() {
                if let Some(list) = copies.get(&(*member, clip.clip_id))
                    && list.iter().any(|r| !intact(clip, r))
                {
                    v.deliveries_corrupt += 1;
                }
            }
            continue;
        };
        for &member in members.get(clip.group as usize).into_iter().flatten() {
            if member == clip.talker {
                continue;
            }
            v.deliveries_expected += 1;
            match copies.get(&(member, clip.clip_id)) {
                None => {
                    v.deliveries_missing += 1;
                    example(&mut v, || {
                        format!(
                            "user {member} never received clip {} of group {} from user {}",
                            clip.clip_id, clip.group, clip.talker
                        )
                    });
                }
                Some(list) => {
                    if let Some(bad) = list.iter().find(|r| !intact(clip, r)) {
                        v.deliveries_corrupt += 1;
                        example(&mut v, || {
                            format!(
                                "user {member} received clip {} of group {} damaged: \
                                 {} of {} frames (end says {}), digest {}, in order {}",
                                clip.clip_id,
                                clip.group,
                                bad.frames_seen,
                                clip.frame_count,
                                bad.frame_count,
                                if bad.digest == clip.digest {
                                    "equal"
                                } else {
                                    "differs"
                                },
                                bad.in_order
                            )
                        });
                    } else {
                        v.deliveries_ok += 1;
                        if list[0].history {
                            v.catch_up_deliveries += 1;
                        }
                    }
                }
            }
        }
    }
    v
}

/// Counts clips per group and outcome, for debugging reports.
pub fn stored_per_group(sent: &[SentClip]) -> BTreeMap<GroupIdx, u64> {
    let mut out = BTreeMap::new();
    for clip in sent {
        if let Outcome::Stored(_) = clip.outcome {
            *out.entry(clip.group).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ClipId {
        ClipId::from_bytes([n; 16])
    }

    fn frames(n: u8) -> Vec<Vec<u8>> {
        (0..5).map(|i| vec![n, i, 0xf8, 0xff]).collect()
    }

    fn digest(frames: &[Vec<u8>]) -> Digest {
        frames
            .iter()
            .enumerate()
            .fold(Digest::EMPTY, |d, (i, f)| d.push(i as u32, frame_hash(f)))
    }

    /// Group 0 = users 0, 1, 2 (talker 0); group 1 = users 3, 4.
    #[test]
    fn frame_hash_sees_every_byte() {
        // Lengths with and without a tail shorter than a word.
        for len in [1usize, 8, 37, 160] {
            let frame: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let hash = frame_hash(&frame);
            for i in 0..len {
                for flip in [1u8, 0x80, 0xff] {
                    let mut bad = frame.clone();
                    bad[i] ^= flip;
                    assert_ne!(frame_hash(&bad), hash, "len {len} byte {i}");
                }
            }
            assert_ne!(frame_hash(&frame[..len - 1]), hash, "len {len} cut");
        }
    }

    fn members() -> Vec<Vec<UserIdx>> {
        vec![vec![0, 1, 2], vec![3, 4]]
    }

    fn sent() -> Vec<SentClip> {
        vec![
            SentClip {
                group: 0,
                talker: 0,
                clip_id: id(1),
                frame_count: 5,
                digest: digest(&frames(1)),
                outcome: Outcome::Stored(1),
            },
            SentClip {
                group: 0,
                talker: 1,
                clip_id: id(2),
                frame_count: 5,
                digest: digest(&frames(2)),
                outcome: Outcome::Stored(2),
            },
            SentClip {
                group: 1,
                talker: 3,
                clip_id: id(3),
                frame_count: 5,
                digest: digest(&frames(3)),
                outcome: Outcome::Stored(1),
            },
        ]
    }

    fn got(member: UserIdx, clip: &SentClip, seq: u64) -> Received {
        Received {
            member,
            group: clip.group,
            clip_id: clip.clip_id,
            seq,
            frame_count: clip.frame_count,
            frames_seen: clip.frame_count,
            digest: clip.digest,
            in_order: true,
            history: false,
        }
    }

    /// Every expected delivery, once, intact.
    fn clean() -> Vec<Received> {
        let s = sent();
        vec![
            got(1, &s[0], 1),
            got(2, &s[0], 1),
            got(0, &s[1], 2),
            got(2, &s[1], 2),
            got(4, &s[2], 1),
        ]
    }

    #[test]
    fn a_clean_run_has_no_failures() {
        let v = verify(&members(), &sent(), &clean());
        assert_eq!(v.deliveries_expected, 5);
        assert_eq!(v.deliveries_ok, 5);
        assert_eq!(v.failures(), 0, "{v:?}");
        assert_eq!(v.clips_stored, 3);
        assert!(v.examples.is_empty());
    }

    #[test]
    fn a_missing_clip_is_caught() {
        let mut r = clean();
        r.remove(3); // user 2 never gets clip 2
        let v = verify(&members(), &sent(), &r);
        assert_eq!(v.deliveries_missing, 1);
        assert_eq!(v.deliveries_ok, 4);
        assert_eq!(v.failures(), 1);
        assert!(v.examples[0].contains("never received"), "{:?}", v.examples);
    }

    #[test]
    fn a_duplicated_clip_is_caught() {
        let mut r = clean();
        let extra = r[4].clone();
        r.push(extra);
        let v = verify(&members(), &sent(), &r);
        assert_eq!(v.deliveries_duplicate, 1);
        assert_eq!(v.deliveries_ok, 5);
        assert_eq!(v.failures(), 1);
    }

    #[test]
    fn a_corrupted_clip_is_caught() {
        // One byte of one frame altered.
        let mut f = frames(2);
        f[3][0] ^= 1;
        let mut r = clean();
        r[2].digest = digest(&f);
        // A truncated copy (frames lost, end says 5).
        r[4].frames_seen = 4;
        // Two frames swapped.
        let mut swapped = frames(1);
        swapped.swap(1, 2);
        r[0].digest = digest(&swapped);
        let v = verify(&members(), &sent(), &r);
        assert_eq!(v.deliveries_corrupt, 3, "{v:?}");
        assert_eq!(v.deliveries_ok, 2);
        assert_eq!(v.failures(), 3);
    }

    #[test]
    fn a_misdelivered_clip_is_caught() {
        let s = sent();
        let mut r = clean();
        // User 3 (group 1) receives a clip of group 0.
        r.push(got(3, &s[0], 1));
        // A clip labelled with the wrong group.
        let mut wrong = got(2, &s[1], 2);
        wrong.group = 1;
        r.push(wrong);
        // A clip nobody sent.
        let mut ghost = got(1, &s[0], 9);
        ghost.clip_id = id(99);
        r.push(ghost);
        let v = verify(&members(), &sent(), &r);
        assert_eq!(v.misdelivered, 3, "{v:?}");
        assert_eq!(v.deliveries_ok, 5);
        assert_eq!(v.failures(), 3);
    }

    #[test]
    fn sequence_numbers_must_agree() {
        let mut s = sent();
        let mut r = clean();
        r[1].seq = 7; // user 2 sees clip 1 as #7
        s[1].outcome = Outcome::Stored(1); // two clips stored as #1
        for x in r.iter_mut().filter(|x| x.clip_id == id(2)) {
            x.seq = 1;
        }
        let v = verify(&members(), &s, &r);
        assert_eq!(v.seq_inconsistent, 2, "{v:?}");
    }

    #[test]
    fn self_echo_refused_and_unknown_clips_are_classified() {
        let mut s = sent();
        s.push(SentClip {
            group: 0,
            talker: 2,
            clip_id: id(4),
            frame_count: 5,
            digest: digest(&frames(4)),
            outcome: Outcome::Failed,
        });
        s.push(SentClip {
            group: 0,
            talker: 2,
            clip_id: id(5),
            frame_count: 5,
            digest: digest(&frames(5)),
            outcome: Outcome::Unknown,
        });
        let mut r = clean();
        r.push(got(0, &s[0], 1)); // the talker's own clip back
        r.push(got(1, &s[3], 3)); // a refused clip arrived
        r.push(got(1, &s[4], 4)); // an unknown one arrived intact: fine
        let v = verify(&members(), &s, &r);
        assert_eq!(v.self_deliveries, 1);
        assert_eq!(v.misdelivered, 1);
        assert_eq!(v.clips_failed, 1);
        assert_eq!(v.clips_unknown, 1);
        assert_eq!(v.deliveries_expected, 5);
        assert_eq!(v.failures(), 1);
    }

    #[test]
    fn catch_up_and_reordering_are_counted_but_not_failures() {
        let s = sent();
        let mut r = clean();
        // User 2 gets clip #2 before #1, the latter from the store.
        r.swap(1, 3);
        r[3].history = true;
        let v = verify(&members(), &s, &r);
        assert_eq!(v.failures(), 0);
        assert_eq!(v.reordered, 1);
        assert_eq!(v.catch_up_deliveries, 1);
    }

    #[test]
    fn the_digest_sees_order_and_content() {
        let f = frames(1);
        let d = digest(&f);
        let mut g = f.clone();
        g.swap(0, 1);
        assert_ne!(d, digest(&g));
        assert_ne!(d, digest(&f[..4]));
        assert_eq!(d, digest(&f.clone()));
        assert_ne!(frame_hash(b"ab"), frame_hash(b"ba"));
        assert_ne!(frame_hash(b""), frame_hash(b"\0"));
    }
}
