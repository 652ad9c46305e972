//! Connects to a relay, joins a group, speaks one second of a tone into it,
//! and prints what happens for a few seconds.
//!
//! ```text
//! PTT_FINGERPRINT=<64 hex digits printed by the relay> \
//! PTT_TOKEN=$(cargo run -q -p ptt-relay --bin relay -- token --user alice --admin) \
//! cargo run -p ptt-client --example talk -- team
//! ```
//!
//! `PTT_ADDR` (default `127.0.0.1:4433`) and `PTT_SERVER_NAME` (default
//! `localhost`) may be set too. With an admin token the group is created
//! (walkie) and the token's user added to it if needed.

use std::time::Duration;

use ptt_client::{
    Client, ClientConfig, EncoderConfig, ErrorCode, Event, GroupMode, ReconnectPolicy, Trust,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let group = std::env::args().nth(1).unwrap_or_else(|| "team".into());
    let addr = std::env::var("PTT_ADDR").unwrap_or_else(|_| "127.0.0.1:4433".into());
    let name = std::env::var("PTT_SERVER_NAME").unwrap_or_else(|_| "localhost".into());
    let trust = Trust::fingerprint_from_hex(&std::env::var("PTT_FINGERPRINT")?)?;
    let token = std::env::var("PTT_TOKEN")?;

    let config = ClientConfig::new(addr.parse()?, name, trust, token.trim())
        .with_client_name("ptt-client example")
        .with_reconnect(ReconnectPolicy::default());
    let (client, mut events) = Client::connect(config).await?;
    let me = client.user();
    println!("connected as {me}; limits {:?}", client.welcome().limits);

    // With an admin token, make sure the group exists and we are in it.
    match client.create_group(&group, GroupMode::Walkie).await {
        Ok(()) => println!("created group {group}"),
        Err(e) if e.code() == Some(ErrorCode::GroupExists) => {}
        Err(e) if e.code() == Some(ErrorCode::Forbidden) => {}
        Err(e) => return Err(e.into()),
    }
    let _ = client.add_member(&group, &me).await;

    let info = client.join(&group).await?;
    println!("joined {group}: {info:?}");

    // One second of 440 Hz at 16 kHz, in 20 ms "microphone callbacks".
    let mut talk = client
        .talk_pcm(&group, 16_000, 1, &EncoderConfig::default(), false)
        .await?;
    for block in 0..50 {
        let pcm: Vec<i16> = (0..320)
            .map(|i| {
                let t = (block * 320 + i) as f32 / 16_000.0;
                ((t * 440.0 * std::f32::consts::TAU).sin() * 8000.0) as i16
            })
            .collect();
        talk.push_i16(&pcm).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = talk.finish().await?;
    println!("stored as {group} #{}", stored.seq);

    let deadline = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            event = events.next() => match event {
                Some(Event::Frame { .. }) => {}
                Some(event) => println!("{event:?}"),
                None => break,
            },
        }
    }
    println!("stats: {:?}", client.stats());
    client.close().await;
    Ok(())
}
