//! The `broadcast` scenario at a small size: 300 followers, 30 % online,
//! followers leaving and joining during the run; every follower joined
//! until the end has every clip after its cursor, once.

use std::time::Duration;

use client_sim::RelayChoice;
use client_sim::broadcast::{BroadcastOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_follower_gets_every_clip_once_while_followers_come_and_go() {
    let opts = BroadcastOptions {
        followers: 300,
        online_fraction: 0.3,
        clips: 5,
        clip_interval: Duration::from_millis(600),
        clip_frames: 10,
        churn: 10,
        clients_per_endpoint: 50,
        settle: Duration::from_secs(20),
    };
    let report = run(&opts, &RelayChoice::Embedded)
        .await
        .expect("the scenario runs");
    println!("{}", report.table());
    assert_eq!(report.online, 90);
    // 80 stayed the whole run and saw 5 clips; 10 joined from cursor 0.
    assert!(report.deliveries_expected >= 90 * 5, "{report:?}");
    assert_eq!(report.deliveries_missing, 0, "{report:?}");
    assert_eq!(report.deliveries_duplicate, 0, "{report:?}");
    assert!(!report.failed);
    assert!(report.end_to_last_follower_ms.count == 5, "{report:?}");
}
