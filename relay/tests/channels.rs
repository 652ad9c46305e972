//! Roles and broadcast channels (issue #14) over real QUIC on loopback:
//! listeners cannot talk, public channels are found and followed, private
//! ones need an invite, a new follower gets the backlog and not the whole
//! history, muted clips are flagged, the owner's limits hold and are
//! capped, counts go to the owner alone, and publishing to many followers
//! costs one store write.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use ptt_client::{ChannelLimits, ClipHeader, ErrorCode, Event, Events, GroupMode, Role};
use ptt_relay::store::FollowChange;

/// Waits until `check` holds, polling.
async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the condition held in time");
}

/// The next clip start's (seq, history, header flags).
async fn next_start(events: &mut Events) -> (u64, bool, u8) {
    wait_for(events, |e| match e {
        Event::ClipStarted {
            seq,
            history,
            header,
            ..
        } => Some((*seq, *history, header.flags)),
        _ => None,
    })
    .await
}

async fn next_end(events: &mut Events) -> u64 {
    wait_for(events, |e| match e {
        Event::ClipEnded { seq, .. } => Some(*seq),
        _ => None,
    })
    .await
}

/// Whether `client`'s FloorRequest in "team" is refused as a listener's
/// (a granted floor is given back).
async fn listener_only(client: &ptt_client::Client) -> bool {
    match client.request_floor("team", false).await {
        Ok(_) => {
            client.release_floor("team").await.unwrap();
            false
        }
        Err(e) => {
            assert_eq!(e.code(), Some(ErrorCode::ListenerOnly), "{e}");
            true
        }
    }
}

#[tokio::test]
async fn a_listener_cannot_talk_and_only_owners_and_admins_set_roles() {
    let relay = TestRelay::start().await;
    relay
        .group("team", GroupMode::Walkie, &["alice", "bob", "carol"])
        .await;
    let (alice, _ae) = relay.member("alice", "team").await;
    let (bob, mut bob_events) = relay.member("bob", "team").await;
    // A group of before roles: everyone a member, so anyone may talk.
    alice
        .send_clip("team", params(), frames(1, 3), Bytes::new())
        .await
        .unwrap();
    assert_eq!(next_end(&mut bob_events).await, 1);
    // A plain member may not set roles.
    let err = bob
        .set_role("team", "carol", Role::Listener)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));

    let store = relay.handle.store();
    store.set_role("team", "alice", Role::Admin).await.unwrap();
    alice.set_role("team", "bob", Role::Listener).await.unwrap();
    // The relay learns of the change through the group's feed, as of any
    // membership change: shortly after the Ok.
    eventually(async || listener_only(&bob).await).await;
    let err = bob
        .send_clip("team", params(), frames(2, 3), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ListenerOnly), "{err}");
    // It still listens.
    alice
        .send_clip("team", params(), frames(3, 3), Bytes::new())
        .await
        .unwrap();
    assert_eq!(next_end(&mut bob_events).await, 2);
    // An admin may not make an owner.
    let err = alice
        .set_role("team", "carol", Role::Owner)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    alice.set_role("team", "bob", Role::Member).await.unwrap();
    eventually(async || !listener_only(&bob).await).await;
    bob.send_clip("team", params(), frames(4, 3), Bytes::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_public_channel_is_found_followed_caught_up_from_its_backlog_and_muted() {
    let relay = TestRelay::start().await;
    let (owner, _oe) = relay.client("bank").await;
    owner.create_channel("news-daily", true).await.unwrap();
    owner.create_channel("news-secret", false).await.unwrap();
    relay.group("newsroom", GroupMode::Notes, &["bank"]).await;
    for i in 0..3u8 {
        owner
            .send_clip("news-daily", params(), frames(i, 2), Bytes::new())
            .await
            .unwrap();
    }
    owner
        .set_channel_limits(
            "news-daily",
            ChannelLimits {
                backlog_clips: 2,
                ..ChannelLimits::default()
            },
        )
        .await
        .unwrap();

    let (carol, mut events) = relay.client("carol").await;
    assert_eq!(carol.list_channels("news").await.unwrap(), ["news-daily"]);
    // Not a follower yet: not a member either.
    assert_eq!(
        carol.join("news-daily").await.unwrap_err().code(),
        Some(ErrorCode::NotMember)
    );
    carol.follow("news-daily", "").await.unwrap();
    let joined = carol.join("news-daily").await.unwrap();
    assert_eq!((joined.cursor, joined.last_seq), (1, 3));
    let mut got = vec![next_end(&mut events).await, next_end(&mut events).await];
    got.sort();
    assert_eq!(got, [2, 3], "the backlog, not the whole history");

    // Live, and refused to talk.
    owner
        .send_clip("news-daily", params(), frames(9, 2), Bytes::new())
        .await
        .unwrap();
    let (_, history, flags) = next_start(&mut events).await;
    assert!(!history);
    assert_eq!(flags & ClipHeader::FLAG_MUTED, 0);
    let err = carol
        .send_clip("news-daily", params(), frames(8, 2), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ListenerOnly), "{err}");

    // Muted: still delivered, flagged.
    carol.mute("news-daily", true).await.unwrap();
    owner
        .send_clip("news-daily", params(), frames(10, 2), Bytes::new())
        .await
        .unwrap();
    let (_, _, flags) = next_start(&mut events).await;
    assert_ne!(flags & ClipHeader::FLAG_MUTED, 0);
    carol.mute("news-daily", false).await.unwrap();

    // Counts for the owner alone, from the acknowledgements.
    let err = carol.channel_stats("news-daily").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    eventually(async || {
        let c = owner.channel_stats("news-daily").await.unwrap();
        c.followers == 1 && c.online == 1 && c.delivered == 4
    })
    .await;

    // Unfollow: the joined connection is told, the record is gone.
    carol.unfollow("news-daily").await.unwrap();
    wait_for(&mut events, |e| match e {
        Event::GroupLeft { code, .. } => Some(*code),
        _ => None,
    })
    .await;
    let store = relay.handle.store();
    assert_eq!(store.follower("news-daily", "carol").await.unwrap(), None);
    assert_eq!(
        carol.follow("newsroom", "").await.unwrap_err().code(),
        Some(ErrorCode::NotChannel)
    );
}

#[tokio::test]
async fn a_private_channel_is_followed_with_an_invite_until_it_is_revoked() {
    let relay = TestRelay::start().await;
    let (owner, _oe) = relay.client("club").await;
    owner.create_channel("club-news", false).await.unwrap();
    let (dave, _de) = relay.client("dave").await;
    assert!(dave.list_channels("club").await.unwrap().is_empty());
    assert_eq!(
        dave.follow("club-news", "").await.unwrap_err().code(),
        Some(ErrorCode::BadInvite)
    );
    let code = owner.create_invite("club-news").await.unwrap();
    dave.follow("club-news", &code).await.unwrap();
    dave.join("club-news").await.unwrap();
    // A follower does not manage invites.
    assert_eq!(
        dave.create_invite("club-news").await.unwrap_err().code(),
        Some(ErrorCode::Forbidden)
    );
    owner.revoke_invite("club-news", &code).await.unwrap();
    let (erin, _ee) = relay.client("erin").await;
    assert_eq!(
        erin.follow("club-news", &code).await.unwrap_err().code(),
        Some(ErrorCode::BadInvite)
    );
}

#[tokio::test]
async fn the_owners_limits_hold_and_the_relay_caps_them() {
    let relay = TestRelay::start_with(|c| c.channel_max_clips_per_day = 3).await;
    let (owner, _oe) = relay.client("radio").await;
    owner.create_channel("radio-1", true).await.unwrap();
    owner
        .set_channel_limits(
            "radio-1",
            ChannelLimits {
                clips_per_day: 1000,
                max_clip_ms: 100,
                ..ChannelLimits::default()
            },
        )
        .await
        .unwrap();
    // 100 ms: 5 frames of 20 ms; 10 are too long.
    let err = owner
        .send_clip("radio-1", params(), frames(1, 10), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ClipTooLong), "{err}");
    for i in 0..3u8 {
        owner
            .send_clip("radio-1", params(), frames(i, 5), Bytes::new())
            .await
            .unwrap();
    }
    // The owner asked 1000 a day; the relay allows 3.
    let err = owner
        .send_clip("radio-1", params(), frames(7, 5), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ChannelLimit), "{err}");
}

/// 2,000 followers, 20 of them online: a clip costs one append and no
/// follower or cursor write until followers acknowledge; every online one
/// hears it live; an offline one catches up from its cursor later.
#[tokio::test]
async fn publishing_to_many_followers_costs_one_write() {
    const FOLLOWERS: usize = 2000;
    const ONLINE: usize = 20;
    let relay = TestRelay::start().await;
    let (owner, _oe) = relay.client("owner").await;
    owner.create_channel("big", true).await.unwrap();
    let store = relay.handle.store().clone();
    // Queued together, so the store's writer commits them in batches.
    let mut follows = tokio::task::JoinSet::new();
    for i in 0..FOLLOWERS {
        let store = store.clone();
        follows.spawn(async move {
            store
                .change_follower("big", &format!("f{i}"), FollowChange::Follow { start: 0 })
                .await
                .unwrap()
        });
    }
    assert!(
        follows.join_all().await.into_iter().all(|new| new),
        "every follow is new"
    );
    assert_eq!(store.follower_count("big").await.unwrap(), FOLLOWERS as u64);

    let mut online = Vec::new();
    for i in 0..ONLINE {
        let (client, events) = relay.member(&format!("f{i}"), "big").await;
        online.push((client, events));
    }
    let before = store.counters();
    owner
        .send_clip("big", params(), frames(1, 5), Bytes::new())
        .await
        .unwrap();
    for (_, events) in &mut online {
        assert_eq!(next_end(events).await, 1);
    }
    let after = store.counters();
    assert_eq!(after.appends - before.appends, 1);
    assert_eq!(after.follower_writes, before.follower_writes);
    // Cursor writes only for followers that acknowledged (the online ones).
    assert!(after.cursor_writes - before.cursor_writes <= ONLINE as u64);

    // An offline follower comes back and catches up from its cursor.
    let (late, mut late_events) = relay.client("f1999").await;
    let joined = late.join("big").await.unwrap();
    assert_eq!((joined.cursor, joined.last_seq), (0, 1));
    assert_eq!(next_end(&mut late_events).await, 1);
}

/// A follower's Mute on one connection flags the clips its other joined
/// connection receives from then on, without a new Join; Unmute clears it.
#[tokio::test]
async fn mute_reaches_the_followers_other_connections_at_once() {
    let relay = TestRelay::start().await;
    let (owner, _oe) = relay.client("bank").await;
    owner.create_channel("news-daily", true).await.unwrap();
    let (phone, _pe) = relay.client("carol").await;
    phone.follow("news-daily", "").await.unwrap();
    phone.join("news-daily").await.unwrap();
    let (laptop, mut laptop_events) = relay.client("carol").await;
    laptop.join("news-daily").await.unwrap();

    let mut flags_of_next = async |i: u8| {
        owner
            .send_clip("news-daily", params(), frames(i, 2), Bytes::new())
            .await
            .unwrap();
        next_start(&mut laptop_events).await.2 & ClipHeader::FLAG_MUTED
    };
    assert_eq!(flags_of_next(1).await, 0);
    phone.mute("news-daily", true).await.unwrap();
    assert_ne!(flags_of_next(2).await, 0, "muted on the other connection");
    phone.mute("news-daily", false).await.unwrap();
    assert_eq!(flags_of_next(3).await, 0, "unmuted on the other connection");
    // A change of the channel's record (its limits) keeps its followers.
    owner
        .set_channel_limits("news-daily", ChannelLimits::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(flags_of_next(4).await, 0, "still receiving");
}

/// The owner's delivered and played counts survive a restart of the relay,
/// and followers' acknowledgements reach the store in batches (one write
/// per channel every few seconds), not one write each.
#[tokio::test]
async fn delivered_and_played_counts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let start = async |dir: &std::path::Path| TestRelay {
        handle: ptt_relay::start(ptt_relay::RelayConfig::for_tests(dir))
            .await
            .unwrap(),
        dir: tempfile::tempdir().unwrap(),
    };
    let started = std::time::Instant::now();
    let relay = start(dir.path()).await;
    let (owner, _oe) = relay.client("bank").await;
    owner.create_channel("news-daily", true).await.unwrap();
    let mut followers = Vec::new();
    for user in ["carol", "dave"] {
        let (client, events) = relay.client(user).await;
        client.follow("news-daily", "").await.unwrap();
        client.join("news-daily").await.unwrap();
        followers.push((client, events));
    }
    for i in 0..3u8 {
        owner
            .send_clip("news-daily", params(), frames(i, 2), Bytes::new())
            .await
            .unwrap();
    }
    for (_, events) in &mut followers {
        for _ in 0..3 {
            next_end(events).await;
        }
    }
    followers[0].0.played("news-daily", 1).await.unwrap();
    followers[0].0.played("news-daily", 2).await.unwrap();
    eventually(async || {
        let c = owner.channel_stats("news-daily").await.unwrap();
        (c.delivered, c.played) == (6, 2)
    })
    .await;
    // 8 acknowledgements and Played; at most one write per flush period.
    let periods = started.elapsed().as_secs() / ptt_relay::hub::TALLY_FLUSH.as_secs() + 1;
    assert!(relay.handle.store().counters().count_writes <= periods);

    for (client, _) in followers {
        client.close().await;
    }
    owner.close().await;
    relay.handle.shutdown().await;
    let relay = start(dir.path()).await;
    let (owner, _oe) = relay.client("bank").await;
    let c = owner.channel_stats("news-daily").await.unwrap();
    assert_eq!(
        (c.followers, c.online, c.delivered, c.played),
        (2, 0, 6, 2),
        "counted before the restart"
    );
    relay.handle.shutdown().await;
}

/// A follower fetches a channel's newest clips as a member fetches a
/// group's, with the same bounds; someone who does not follow it cannot.
#[tokio::test]
async fn a_follower_fetches_the_channels_recent_clips() {
    let relay = TestRelay::start().await;
    let (owner, _oe) = relay.client("bank").await;
    owner.create_channel("news-daily", true).await.unwrap();
    for i in 0..3u8 {
        owner
            .send_clip("news-daily", params(), frames(i, 2), Bytes::new())
            .await
            .unwrap();
    }
    let (carol, mut events) = relay.client("carol").await;
    let refused = carol.fetch_recent("news-daily", 2).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NotMember));
    carol.follow("news-daily", "").await.unwrap();
    // Without a Join: the newest two, flagged fetched.
    assert_eq!(carol.fetch_recent("news-daily", 2).await.unwrap(), 2);
    let mut got = Vec::new();
    for _ in 0..2 {
        let (seq, flags) = wait_for(&mut events, |e| match e {
            Event::ClipStarted { seq, header, .. } => Some((*seq, header.flags)),
            _ => None,
        })
        .await;
        assert_ne!(flags & ClipHeader::FLAG_FETCHED, 0);
        got.push(seq);
    }
    got.sort();
    assert_eq!(got, [2, 3]);
    carol.unfollow("news-daily").await.unwrap();
    let refused = carol.fetch_recent("news-daily", 1).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NotMember));
}
