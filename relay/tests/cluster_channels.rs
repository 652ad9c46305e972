//! Broadcast channels on a cluster (issue #14 on issue #10's NATS seams):
//! two relay nodes on one real `nats-server`. Roles, channels, follows,
//! invites and counts live in NATS, so a channel created on one node is
//! found, followed and heard on the other as on a single node.
//!
//! Needs `nats-server` (`./dev.sh setup` installs it).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::nats::NatsServer;
use common::*;
use ptt_client::{ClipHeader, ErrorCode, Event, Events};
use ptt_relay::RelayConfig;

/// A relay node on `nats`; with `keys_of`, it accepts that node's tokens.
async fn node(nats: &NatsServer, keys_of: Option<&TestRelay>) -> TestRelay {
    let dir = tempfile::tempdir().expect("temp dir");
    if let Some(other) = keys_of {
        std::fs::copy(
            other.dir.path().join("token.key"),
            dir.path().join("token.key"),
        )
        .expect("copy the token key");
    }
    let mut config = RelayConfig::for_tests(dir.path());
    config.cluster.nats = vec![nats.url()];
    config.cluster.request_timeout = Duration::from_secs(2);
    let handle = ptt_relay::start(config).await.expect("node starts");
    TestRelay { handle, dir }
}

/// The next clip end: (seq, whether it came from the store).
async fn next_clip(events: &mut Events) -> (u64, bool) {
    let history = wait_for(events, |e| match e {
        Event::ClipStarted { history, .. } => Some(*history),
        _ => None,
    })
    .await;
    let seq = wait_for(events, |e| match e {
        Event::ClipEnded { seq, .. } => Some(*seq),
        _ => None,
    })
    .await;
    (seq, history)
}

/// Follow on A, publish on B: the follower on A hears it live; another
/// follower on A catches up from its cursor; the publish writes no
/// follower or count record; invites, listing and the owner's counts work
/// across nodes.
#[tokio::test]
async fn follow_on_one_node_publish_on_the_other() {
    let nats = NatsServer::start();
    let a = node(&nats, None).await;
    let b = node(&nats, Some(&a)).await;

    let (owner, _oe) = b.client("bank").await;
    owner.create_channel("news-daily", true).await.unwrap();
    owner.create_channel("news-club", false).await.unwrap();

    let (carol, mut carol_events) = a.client("carol").await;
    assert_eq!(carol.list_channels("news").await.unwrap(), ["news-daily"]);
    carol.follow("news-daily", "").await.unwrap();
    let joined = carol.join("news-daily").await.unwrap();
    assert_eq!((joined.cursor, joined.last_seq), (0, 0));
    let (dave, _de) = a.client("dave").await;
    dave.follow("news-daily", "").await.unwrap();
    dave.close().await;
    // A private channel: an invite made on B opens it on A.
    assert_eq!(
        carol.follow("news-club", "").await.unwrap_err().code(),
        Some(ErrorCode::BadInvite)
    );
    let code = owner.create_invite("news-club").await.unwrap();
    carol.follow("news-club", &code).await.unwrap();

    // Publishing on B: one clip in the log, no follower record, no count.
    let before_a = a.handle.store().counters();
    let before_b = b.handle.store().counters();
    owner
        .send_clip("news-daily", params(), frames(1, 3), Bytes::new())
        .await
        .unwrap();
    assert_eq!(next_clip(&mut carol_events).await, (1, false), "live on A");
    let (after_a, after_b) = (a.handle.store().counters(), b.handle.store().counters());
    assert_eq!(after_a.follower_writes, before_a.follower_writes);
    assert_eq!(after_b.follower_writes, before_b.follower_writes);
    assert_eq!(after_b.cursor_writes, before_b.cursor_writes);
    // A follower may not talk, on either node.
    let err = carol
        .send_clip("news-daily", params(), frames(2, 3), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ListenerOnly), "{err}");

    // Dave comes back on A and catches up from his cursor.
    let (dave, mut dave_events) = a.client("dave").await;
    let joined = dave.join("news-daily").await.unwrap();
    assert_eq!((joined.cursor, joined.last_seq), (0, 1));
    assert_eq!(next_clip(&mut dave_events).await, (1, true), "caught up");

    // The owner on B reads the followers and, once A has written its
    // tallies (every few seconds), both acknowledgements.
    tokio::time::timeout(WAIT, async {
        loop {
            let c = owner.channel_stats("news-daily").await.unwrap();
            assert_eq!(c.followers, 2);
            if c.delivered == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .expect("A's tallies reach B");

    // Unfollow on A: the joined connection is told; the count drops.
    carol.unfollow("news-daily").await.unwrap();
    wait_for(&mut carol_events, |e| match e {
        Event::GroupLeft { code, .. } => Some(*code),
        _ => None,
    })
    .await;
    let c = owner.channel_stats("news-daily").await.unwrap();
    assert_eq!(c.followers, 1);
}

/// The header flags of the next clip to start.
async fn next_flags(events: &mut Events) -> u8 {
    wait_for(events, |e| match e {
        Event::ClipStarted { header, .. } => Some(header.flags),
        _ => None,
    })
    .await
}

/// A follower joined on both nodes mutes the channel on A: the clips its
/// connection on B receives from then on are flagged muted, without a new
/// Join, and Unmute on A clears the flag (the other node is told on the
/// channel's live subject, ahead of the next clip A publishes). Unfollow on
/// A: the connection on B is told it left and receives nothing more, while
/// another follower on B still does.
#[tokio::test]
async fn mute_and_unfollow_on_one_node_reach_the_followers_connection_on_the_other() {
    let nats = NatsServer::start();
    let a = node(&nats, None).await;
    let b = node(&nats, Some(&a)).await;
    let (owner, _oe) = a.client("bank").await;
    owner.create_channel("news-daily", true).await.unwrap();
    let (phone, _pe) = a.client("carol").await;
    phone.follow("news-daily", "").await.unwrap();
    phone.join("news-daily").await.unwrap();
    let (laptop, mut laptop_events) = b.client("carol").await;
    laptop.join("news-daily").await.unwrap();
    let (dave, mut dave_events) = b.client("dave").await;
    dave.follow("news-daily", "").await.unwrap();
    dave.join("news-daily").await.unwrap();

    let publish = async |i: u8| {
        owner
            .send_clip("news-daily", params(), frames(i, 2), Bytes::new())
            .await
            .unwrap();
    };
    publish(1).await;
    assert_eq!(
        next_flags(&mut laptop_events).await & ClipHeader::FLAG_MUTED,
        0
    );
    phone.mute("news-daily", true).await.unwrap();
    publish(2).await;
    assert_ne!(
        next_flags(&mut laptop_events).await & ClipHeader::FLAG_MUTED,
        0,
        "muted on the other node"
    );
    phone.mute("news-daily", false).await.unwrap();
    publish(3).await;
    assert_eq!(
        next_flags(&mut laptop_events).await & ClipHeader::FLAG_MUTED,
        0,
        "unmuted on the other node"
    );

    phone.unfollow("news-daily").await.unwrap();
    let code = wait_for(&mut laptop_events, |e| match e {
        Event::GroupLeft { code, .. } => Some(*code),
        _ => None,
    })
    .await;
    assert_eq!(code, ErrorCode::NotMember);
    publish(4).await;
    // Dave, on B too, has clips 1 to 4: by then B's feed had clip 4.
    for _ in 0..4 {
        next_flags(&mut dave_events).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Some(event) = laptop_events.try_next() {
        assert!(
            !matches!(event, Event::ClipStarted { .. } | Event::Frame { .. }),
            "the unfollowed connection on B still receives: {event:?}"
        );
    }
}
