//! Prometheus metrics, `/healthz` and `/readyz` scraped over HTTP during a
//! real exchange over QUIC. Its own test binary: the exporter is the
//! process's global recorder, so no other test may move its counters.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use ptt_client::{ClientError, ErrorCode, Event, GroupMode};
use ptt_protocol::ClipMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path`: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(WAIT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .await
    .expect("an HTTP answer in time")
}

/// Every series of a scrape: `name{labels}` to value.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    let at = |m: &HashMap<String, f64>| m.get(series).copied().unwrap_or(0.0);
    at(after) - at(before)
}

#[tokio::test]
async fn counters_move_by_what_a_real_exchange_did() {
    // Frames on streams: the byte counters below are stream bytes (the
    // clients would otherwise take the UDP media path).
    let relay = TestRelay::start_with(|c| {
        c.metrics = Some("127.0.0.1:0".parse().unwrap());
        c.media = false;
    })
    .await;
    let addr = relay.handle.metrics_addr().expect("a metrics listener");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    assert_eq!(get(addr, "/nothing").await.0, 404);
    relay
        .group("team", GroupMode::Walkie, &["alice", "bob", "carol"])
        .await;
    let before = scrape(addr).await;

    let (alice, _a) = relay.member("alice", "team").await;
    let (bob, mut bob_events) = relay.member("bob", "team").await;
    let (_carol, mut carol_events) = relay.member("carol", "team").await;
    // A token the relay did not sign.
    let forged = relay.config("ptt1.e30.AAAA".into());
    assert!(ptt_client::Client::connect(forged).await.is_err());

    alice.request_floor("team", false).await.expect("granted");
    match bob.request_floor("team", false).await {
        Err(ClientError::FloorDenied { holder }) => assert_eq!(holder, "alice"),
        other => panic!("expected a denial, got {other:?}"),
    }
    // Bob talks anyway: refused with FloorTaken (a second denial).
    let refused = bob.send_clip("team", params(), frames(9, 3), Bytes::new());
    let error = refused.await.expect_err("refused");
    assert_eq!(error.code(), Some(ErrorCode::FloorTaken), "{error:?}");
    let sent = frames(1, 20);
    let stored = alice
        .send_clip("team", params(), sent.clone(), Bytes::new())
        .await
        .expect("stored");
    assert_eq!(stored.seq, 1);
    for events in [&mut bob_events, &mut carol_events] {
        assert_eq!(collect_clips(events, 1).await[0].frames, sent);
    }
    // Counts of deliveries land when each delivery task ends, just after
    // the clip's end is written.
    let frame_bytes: usize = sent
        .iter()
        .enumerate()
        .map(|(index, data)| {
            let mut buf = BytesMut::new();
            ClipMessage::Frame {
                index: index as u32,
                data: data.clone(),
            }
            .encode(&mut buf);
            buf.len()
        })
        .sum();
    let mut after = scrape(addr).await;
    for _ in 0..50 {
        if delta(&before, &after, "ptt_frames_out_total") >= 40.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = scrape(addr).await;
    }
    let d = |series: &str| delta(&before, &after, series);
    assert_eq!(d("ptt_connections_accepted_total"), 4.0);
    assert_eq!(after["ptt_connections"], 3.0, "three clients connected");
    assert!(
        after["ptt_runtime_alive_tasks"] >= 3.0,
        "a task per connection at least: {}",
        after["ptt_runtime_alive_tasks"]
    );
    assert_eq!(d("ptt_auth_failures_total{reason=\"invalid_token\"}"), 1.0);
    assert_eq!(d("ptt_floor_grants_total"), 2.0, "the request and the clip");
    assert_eq!(d("ptt_floor_denials_total"), 2.0);
    assert_eq!(d("ptt_clips_started_total"), 1.0);
    assert_eq!(d("ptt_clips_stored_total"), 1.0);
    assert_eq!(d("ptt_clips_rejected_total{reason=\"floor_taken\"}"), 1.0);
    assert_eq!(
        d("ptt_frames_in_total"),
        20.0,
        "bob's refused frames never count"
    );
    assert_eq!(d("ptt_bytes_in_total"), frame_bytes as f64);
    assert_eq!(d("ptt_frames_out_total"), 40.0, "two listeners");
    assert_eq!(d("ptt_bytes_out_total"), 2.0 * frame_bytes as f64);
    assert_eq!(d("ptt_store_commit_seconds_count"), 1.0);
    assert!(d("ptt_frame_relay_seconds_count") >= 2.0, "sampled latency");
    assert_eq!(d("ptt_live_cuts_total"), 0.0);

    // A member who comes back later catches up from the store.
    let (dave_relay_user, mut dave) = {
        relay.group("other", GroupMode::Notes, &["alice"]).await;
        ptt_relay::admin::add_member(&**relay.handle.store(), "other", "bob")
            .await
            .unwrap();
        let (client, events) = relay.client("bob").await;
        (client, events)
    };
    alice
        .send_clip("other", params(), frames(2, 5), Bytes::new())
        .await
        .expect("stored");
    dave_relay_user.join("other").await.expect("join");
    assert_eq!(collect_clips(&mut dave, 1).await.len(), 1);
    let mut later = scrape(addr).await;
    for _ in 0..50 {
        if delta(&after, &later, "ptt_catchup_deliveries_total") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        later = scrape(addr).await;
    }
    assert_eq!(delta(&after, &later, "ptt_catchup_deliveries_total"), 1.0);

    // Issue #15 item 2: a live frame reaches a caught-up member written by
    // the talker's own task. Alice talks in lockstep with her listeners
    // (each frame once both have the one before), so their deliveries are
    // parked, caught up, whenever a frame comes.
    const LOCKSTEP: u32 = 12;
    let mut talk = alice.talk("team", params()).await.expect("talk");
    for index in 0..LOCKSTEP {
        talk.send_frame(Bytes::from(vec![index as u8; 40]))
            .await
            .expect("frame");
        for events in [&mut bob_events, &mut carol_events] {
            wait_for(events, |e| match e {
                Event::Frame { index: i, .. } if *i == index => Some(()),
                _ => None,
            })
            .await;
        }
    }
    talk.finish(Bytes::new()).await.expect("stored");
    for events in [&mut bob_events, &mut carol_events] {
        wait_for(events, |e| {
            matches!(e, Event::ClipEnded { .. }).then_some(())
        })
        .await;
    }
    let mut lockstep = scrape(addr).await;
    for _ in 0..50 {
        if delta(&later, &lockstep, "ptt_frames_out_total") >= f64::from(2 * LOCKSTEP) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        lockstep = scrape(addr).await;
    }
    let d = |series: &str| delta(&later, &lockstep, series);
    assert_eq!(d("ptt_frames_out_total"), f64::from(2 * LOCKSTEP));
    // Every frame after the first could be written so (22); scheduling
    // on a loaded machine may let a delivery task see a few itself.
    let direct = d("ptt_live_frames_direct_total");
    assert!(
        (f64::from(LOCKSTEP)..=f64::from(2 * LOCKSTEP)).contains(&direct),
        "{direct} of {} frames written by the talker's task",
        2 * LOCKSTEP
    );

    // Draining: not ready any more, still healthy, until the relay stops.
    let talk = alice.talk("other", params()).await.expect("talk");
    let shutdown = tokio::spawn(relay.handle.shutdown());
    let mut ready = 200;
    for _ in 0..100 {
        ready = get(addr, "/readyz").await.0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, 503, "/readyz fails while draining");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    drop(talk);
    shutdown.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed once the relay stopped"
    );
}
