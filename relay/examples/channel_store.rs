//! Issue #14's store figures: a channel with many followers, measured on
//! the embedded redb store.
//!
//! ```sh
//! cargo run -p ptt-relay --example channel_store -- 100000 10
//! ```
//!
//! Follows FOLLOWERS users (the store's writer batches them), publishes
//! CLIPS clips of 2 s, then lets every follower catch up from its cursor
//! (read the clips after it, write the cursor once) and prints per-follower
//! costs: store writes per publish, time and file bytes per follow,
//! catch-up time per follower. The same claims are checked at a small
//! size by `relay/tests/channels.rs` in `./dev.sh test`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ptt_protocol::{ChannelLimits, ClipFormat, ClipId};
use ptt_relay::store::{ClipMeta, ClipStore, FollowChange, NewClip, RedbStore};
use tokio::task::JoinSet;

/// Follows and catch-ups in flight at once.
const IN_FLIGHT: usize = 2048;

fn clip(i: u64) -> NewClip {
    NewClip {
        meta: ClipMeta {
            group: "news".into(),
            clip_id: ClipId::from_bytes(u128::from(i).to_be_bytes()),
            talker: "owner".into(),
            format: ClipFormat::Opus,
            sample_rate: 48_000,
            channels: 1,
            frame_ms: 20,
            created_ms: 1_767_225_600_000 + i,
            flags: 0,
        },
        // 2 s: 100 packets of 60 bytes.
        frames: (0..100).map(|_| Bytes::from(vec![0x55; 60])).collect(),
        waveform: Bytes::from(vec![7; 64]),
    }
}

fn file_size(store: &RedbStore) -> u64 {
    std::fs::metadata(store.path()).map_or(0, |m| m.len())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let followers: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let clips: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(RedbStore::open(dir.path())?);
    let limits = ChannelLimits {
        max_clip_ms: 60_000,
        ..ChannelLimits::default()
    };
    store.create_channel("news", "owner", true, limits).await?;
    let size_before = file_size(&store);

    // Follow.
    let start = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..followers {
        if set.len() >= IN_FLIGHT
            && let Some(done) = set.join_next().await
        {
            done??;
        }
        let store = store.clone();
        set.spawn(async move {
            store
                .change_follower(
                    "news",
                    &format!("user-{i:06}"),
                    FollowChange::Follow { start: 0 },
                )
                .await
        });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    let follow_time = start.elapsed();
    let follow_bytes = file_size(&store).saturating_sub(size_before);
    assert_eq!(store.follower_count("news").await?, followers as u64);

    // Publish.
    let before = store.counters();
    let start = Instant::now();
    for i in 1..=clips {
        store.append_clip(clip(i)).await?;
    }
    let publish_time = start.elapsed();
    let after = store.counters();
    let writes_per_publish = (after.appends - before.appends + after.cursor_writes
        - before.cursor_writes
        + after.follower_writes
        - before.follower_writes) as f64
        / clips as f64;

    // Catch up: every follower reads the clips after its cursor and
    // writes its cursor once.
    let start = Instant::now();
    let mut read_clips = 0usize;
    for i in 0..followers {
        if set.len() >= IN_FLIGHT
            && let Some(done) = set.join_next().await
        {
            done??;
        }
        let store = store.clone();
        set.spawn(async move {
            let user = format!("user-{i:06}");
            let cursor = store.cursor("news", &user).await?;
            let got = store.clips_after("news", cursor, clips as usize).await?;
            let last = got.last().map_or(cursor, |c| c.seq);
            store.advance_cursor("news", &user, last).await?;
            Ok(true)
        });
        read_clips += clips as usize;
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    let catch_up_time = start.elapsed();
    store.flush().await?;

    let per = |d: std::time::Duration, n: usize| d.as_secs_f64() * 1e6 / n as f64;
    println!("followers                      {followers}");
    println!("clips published                {clips} (2 s each, 6.1 KB)");
    println!(
        "follow                         {:.1} µs/follower ({:.1} s total), {:.0} bytes/follower on disk",
        per(follow_time, followers),
        follow_time.as_secs_f64(),
        follow_bytes as f64 / followers as f64
    );
    println!(
        "publish                        {:.2} ms/clip, {writes_per_publish:.0} store write(s)/clip",
        publish_time.as_secs_f64() * 1e3 / clips as f64
    );
    println!(
        "catch-up                       {:.1} µs/follower ({read_clips} clips read, {:.1} s total)",
        per(catch_up_time, followers),
        catch_up_time.as_secs_f64()
    );
    Ok(())
}
