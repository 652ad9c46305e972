//! The browser page in a real browser: headless Chromium, driven through
//! WebDriver (Debian's `chromium` and `chromium-driver`, installed by
//! `./dev.sh setup`), with a fake microphone playing the repository's
//! speech WAV. The page talks to an in-process relay over WebTransport;
//! native clients talk to the same relay over `ptt/1`.
//!
//! One test, in steps, so Chromium starts once per page (a few seconds on
//! a loaded machine):
//! 1. page A (alice) signs in and holds the talk button: the native client
//!    bob receives the clip whole, and its decoded audio follows the WAV;
//! 2. bob talks the WAV: page A receives it live and decodes every sample
//!    (read from the page's own state);
//! 3. page B (carol) signs in later and catches up both clips;
//! 4. alice's page shows bob's and carol's receipts; a screenshot is taken
//!    (`PTT_SCREENSHOT=path` keeps it, as `relay/web/screenshot.png` was made).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TestRelay, collect_clips};
use http_body_util::{BodyExt, Full};
use ptt_client::{ClipParams, GroupMode};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Longest a page may take to reach a state.
const PAGE_WAIT: Duration = Duration::from_secs(20);
/// The WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn speech_wav() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../codec/tests/fixtures/speech.wav")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_talks_listens_and_catches_up_in_chromium() {
    assert!(
        Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(),
        "this test needs Debian's chromium and chromium-driver: run ./dev.sh setup"
    );
    let relay = TestRelay::start_with(|c| c.web = Some("127.0.0.1:0".parse().unwrap())).await;
    relay
        .group("team", GroupMode::Notes, &["alice", "bob", "carol"])
        .await;
    let web = relay.handle.web_addr().expect("the web listener is on");
    let driver = ChromeDriver::start().await;

    // 0. The page's own codec (a second implementation, written from
    // PROTOCOL.md) reads and writes the document's examples.
    let alice = driver.page(web).await;
    let examples = protocol_examples();
    let codec = alice
        .call(
            "POST",
            "/execute/async",
            json!({ "script": CODEC_CHECK, "args": [examples] }),
        )
        .await;
    assert_eq!(codec["failures"], json!([]), "the page's codec: {codec}");
    assert!(codec["decoded"].as_u64().unwrap_or(0) >= 25, "{codec}");

    // 1. The page talks; a native client receives the clip whole.
    let (bob, mut bob_events) = relay.member("bob", "team").await;
    alice.sign_in(&relay.token("alice")).await;
    alice
        .wait_for(
            "joined team",
            "const g = ptt.state.groups.team; return !!(g && g.joined && g.caughtUp);",
        )
        .await;
    alice.hold_talk(Duration::from_millis(2500)).await;
    let received = collect_clips(&mut bob_events, 1).await.remove(0);
    assert_eq!(received.talker, "alice");
    assert!(!received.history);
    assert!(
        (90..=160).contains(&received.frames.len()),
        "a 2.5 s hold gives about 125 frames of 20 ms, got {}",
        received.frames.len()
    );
    let spoken = decode(&received.frames);
    let similarity = envelope_similarity(&spoken, &wav_48k_mono());
    eprintln!(
        "page → native: {} frames, envelope correlation with the WAV {similarity:.3}",
        received.frames.len()
    );
    assert!(
        similarity > 0.6,
        "the page's clip should be the fake microphone's speech (correlation {similarity:.3})"
    );

    // 2. A native client talks; the page plays it live, every sample.
    let encoded = ptt_codec::encode_wav_packets(
        std::fs::File::open(speech_wav()).expect("speech WAV"),
        &ptt_codec::EncoderConfig::default(),
    )
    .expect("encode");
    let packets: Vec<Bytes> = encoded
        .packets
        .iter()
        .map(|p| Bytes::from(p.data.clone()))
        .collect();
    // Spoken at twice real time: a live talker, not an upload of a file.
    let mut talk = bob
        .talk(
            "team",
            ClipParams {
                sample_rate: 16_000,
                ..ClipParams::default()
            },
        )
        .await
        .expect("bob talks");
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for packet in &packets {
        pace.tick().await;
        talk.send_frame(packet.clone()).await.expect("frame sent");
    }
    let stored = talk
        .finish(encoded.waveform.clone())
        .await
        .expect("bob's clip is stored");
    let expected_samples = packets.len() * 960;
    let samples = alice
        .wait_for(
            "bob's clip decoded",
            &format!(
                "const c = ptt.state.groups.team.clips.find(c => c.seq === {seq} && c.state === 'complete' && c.samples > 0);
                 return c ? {{ samples: c.samples, live: c.live, frames: c.frames.length, talker: c.talker }} : null;",
                seq = stored.seq
            ),
        )
        .await;
    eprintln!("native → page: {samples}");
    assert_eq!(samples["talker"], "bob");
    assert_eq!(samples["live"], true, "received live, not from the store");
    assert_eq!(samples["frames"], packets.len());
    assert_eq!(
        samples["samples"], expected_samples,
        "every 20 ms frame decoded to 960 samples"
    );

    // 3. A second page joins late and catches up both clips.
    let carol = driver.page(web).await;
    carol.sign_in(&relay.token("carol")).await;
    let caught_up = carol
        .wait_for(
            "caught up",
            "const g = ptt.state.groups.team;
             if (!g || !g.caughtUp) return null;
             const done = g.clips.filter(c => c.state === 'complete' && c.samples > 0);
             return done.length === 2 ? done.map(c => ({ seq: c.seq, talker: c.talker, frames: c.frames.length, samples: c.samples, live: c.live })) : null;",
        )
        .await;
    eprintln!("late page: {caught_up}");
    let clips = caught_up.as_array().expect("a list");
    assert_eq!(clips[0]["talker"], "alice");
    assert_eq!(clips[0]["frames"], received.frames.len());
    assert_eq!(clips[1]["talker"], "bob");
    assert_eq!(clips[1]["samples"], expected_samples);
    assert!(
        clips.iter().all(|c| c["live"] == false),
        "catch-up comes from the store"
    );

    // 4. Receipts for alice's clip reach her page.
    alice
        .wait_for(
            "receipts",
            "const c = ptt.state.groups.team.clips.find(c => c.own);
             return c && c.receipts.bob && c.receipts.carol ? c.receipts : null;",
        )
        .await;
    let png = alice.screenshot().await;
    if let Ok(path) = std::env::var("PTT_SCREENSHOT") {
        std::fs::write(&path, &png).expect("screenshot written");
    }
    assert!(png.starts_with(b"\x89PNG"));

    bob.close().await;
    alice.close().await;
    carol.close().await;
    driver.stop().await;
    relay.handle.shutdown().await;
}

/// Every `hex title=` example of PROTOCOL.md: its title, its bytes (hex)
/// and the name of the message it decodes to.
fn protocol_examples() -> Value {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../PROTOCOL.md"))
        .expect("PROTOCOL.md");
    let lines: Vec<&str> = doc.lines().collect();
    let mut examples = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(title) = lines[i].trim().strip_prefix("```hex title=") else {
            i += 1;
            continue;
        };
        let mut hex = String::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("```") {
            hex.push_str(lines[i].split('#').next().unwrap_or("").trim());
            hex.push(' ');
            i += 1;
        }
        let name = lines[i..]
            .iter()
            .take(4)
            .find_map(|l| l.strip_prefix("decodes-to: `"))
            .map(|d| d.split(|c: char| !c.is_alphanumeric()).next().unwrap_or(""))
            .unwrap_or("");
        examples.push(json!({ "title": title, "hex": hex.replace(' ', ""), "name": name }));
    }
    Value::Array(examples)
}

/// Runs in the page: decodes every example with `/protocol.js` and
/// encodes a few, comparing with the document.
const CODEC_CHECK: &str = r#"
const [examples, done] = arguments;
import('/protocol.js').then(P => {
  const failures = [];
  let decoded = 0;
  const names = { Header: 'ClipHeader', Frame: 'ClipFrame', End: 'ClipEnd' };
  // Requests (client → relay) are the page's to encode, not decode; the
  // answers to requests the page never sends (operators' MemberStatus and
  // ClipList, the channel answers 0x50–0x52, MediaOffer: browsers have no
  // UDP media path, §14) it skips as unknown (§2.1).
  const clientTypes = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15,
    0x16, 0x17, 0x18, 0x19, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a,
    0x60, 0x61, 0x68];
  const notForThePage = [0x32, 0x33, 0x50, 0x51, 0x52, 0x64];
  const bytes = {};
  for (const e of examples) {
    bytes[e.title] = P.fromHex(e.hex);
    if (e.title.startsWith('datagram')) continue;
    try {
      const r = new P.Reader(bytes[e.title]);
      const type = r.varint();
      const payload = r.raw(r.varint());
      if (clientTypes.includes(type) || notForThePage.includes(type)) continue;
      const m = P.decode(type, payload);
      const want = names[e.name] || e.name;
      if (m.name !== want) failures.push(`${e.title}: ${m.name}, not ${want}`);
      else decoded++;
    } catch (err) { failures.push(`${e.title}: ${err.message}`); }
  }
  const same = (title, got) => {
    const want = bytes[title];
    if (!want || want.length !== got.length || !want.every((b, i) => b === got[i])) failures.push(`encoding ${title}: ${P.hex(got)}`);
  };
  const id = P.fromHex('6f1c2a904b3e4d219a075ce10042beef');
  same('hello', P.encode.hello('ptt1.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl', 'ios/2.3'));
  same('join', P.encode.join(1, 'team-1'));
  same('clip-header-upload', P.encode.clipHeader({ group: 'team-1', clipId: id, talker: '', seq: 0, format: 1,
    sampleRate: 48000, channels: 1, frameMs: 20, createdMs: 1767225600123, flags: 0 }));
  same('clip-frame-200', P.encode.clipFrame(200, Uint8Array.from([0x48, 0x0b, 0xe4])));
  same('clip-end-upload', P.encode.clipEnd(201, 0, Uint8Array.from([0, 4, 0x11, 0x1f, 0x16, 9, 2, 0])));
  done({ decoded, failures });
}, err => done({ decoded: 0, failures: [String(err)] }));
"#;

/// Decodes Opus packets at 48 kHz mono.
fn decode(frames: &[Bytes]) -> Vec<f32> {
    let mut decoder = ptt_codec::PacketDecoder::new(48_000, 1).expect("decoder");
    let mut pcm = Vec::new();
    for frame in frames {
        pcm.extend_from_slice(decoder.decode(Some(frame), None).expect("valid Opus"));
    }
    pcm
}

/// The speech WAV, encoded and decoded the way the relay would (48 kHz mono).
fn wav_48k_mono() -> Vec<f32> {
    let encoded = ptt_codec::encode_wav_packets(
        std::fs::File::open(speech_wav()).expect("speech WAV"),
        &ptt_codec::EncoderConfig::default(),
    )
    .expect("encode");
    let frames: Vec<Bytes> = encoded
        .packets
        .iter()
        .map(|p| Bytes::from(p.data.clone()))
        .collect();
    decode(&frames)
}

/// The best normalised correlation between the loudness envelopes (RMS per
/// 10 ms) of `clip` and of `reference` played in a loop, over every offset:
/// the fake microphone loops the WAV from wherever it was when the page
/// opened it, and the browser's audio processing changes phase and gain,
/// not the envelope.
fn envelope_similarity(clip: &[f32], reference: &[f32]) -> f64 {
    let envelope = |pcm: &[f32]| -> Vec<f64> {
        pcm.chunks(480)
            .map(|c| (c.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / c.len() as f64).sqrt())
            .collect()
    };
    let a = envelope(clip);
    let b = envelope(reference);
    if a.len() < 10 || b.is_empty() {
        return 0.0;
    }
    let normalise = |v: &[f64]| -> Vec<f64> {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let centred: Vec<f64> = v.iter().map(|x| x - mean).collect();
        let norm = centred.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        centred.iter().map(|x| x / norm).collect()
    };
    let a = normalise(&a);
    let mut best = f64::MIN;
    for offset in 0..b.len() {
        let window: Vec<f64> = (0..a.len()).map(|i| b[(offset + i) % b.len()]).collect();
        let window = normalise(&window);
        let r: f64 = a.iter().zip(&window).map(|(x, y)| x * y).sum();
        best = best.max(r);
    }
    best
}

/// A chromedriver process on a loopback port.
struct ChromeDriver {
    process: tokio::process::Child,
    addr: SocketAddr,
}

impl ChromeDriver {
    async fn start() -> ChromeDriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let process = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            if let Ok(status) = webdriver(addr, "GET", "/status", None).await
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ChromeDriver { process, addr }
    }

    /// A new headless Chromium window on the relay's page.
    async fn page(&self, web: SocketAddr) -> Page {
        let wav = speech_wav().canonicalize().expect("speech WAV");
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--window-size=1000,700",
                        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                        format!("--use-file-for-fake-audio-capture={}", wav.display()),
                        "--autoplay-policy=no-user-gesture-required",
                    ],
                },
            }},
        });
        let created = webdriver(self.addr, "POST", "/session", Some(capabilities))
            .await
            .expect("a browser session");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        let page = Page {
            driver: self.addr,
            session,
        };
        page.call("POST", "/url", json!({ "url": format!("http://{web}/") }))
            .await;
        page
    }

    async fn stop(mut self) {
        let _ = self.process.kill().await;
    }
}

/// One browser window.
struct Page {
    driver: SocketAddr,
    session: String,
}

impl Page {
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let answer = webdriver(self.driver, method, &path, Some(body))
            .await
            .expect("webdriver answers");
        if answer["value"]["error"].is_string() {
            panic!("{method} {path}: {answer}");
        }
        answer["value"].clone()
    }

    async fn script(&self, body: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": body, "args": [] }),
        )
        .await
    }

    async fn sign_in(&self, token: &str) {
        self.call(
            "POST",
            "/execute/sync",
            json!({
                "script": "document.querySelector('#token').value = arguments[0];
                           document.querySelector('#signin').requestSubmit();",
                "args": [token],
            }),
        )
        .await;
    }

    /// Polls `script` until it returns something truthy; returns it.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            let value = self
                .script(&format!("if (!window.ptt) return null; {script}"))
                .await;
            if !(value.is_null() || value == false) {
                return value;
            }
            if Instant::now() > deadline {
                let state = self
                    .script("return window.ptt ? JSON.stringify({status: ptt.state.status, talk: ptt.state.talk, messages: ptt.state.messages}) : document.body.innerHTML")
                    .await;
                panic!("the page did not reach `{what}` in time; its state: {state}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Presses the talk button with a real pointer, holds, releases.
    async fn hold_talk(&self, hold: Duration) {
        let button = self
            .call(
                "POST",
                "/element",
                json!({ "using": "css selector", "value": "#talk" }),
            )
            .await;
        let element = button[ELEMENT].clone();
        self.call(
            "POST",
            "/actions",
            json!({ "actions": [{
                "type": "pointer", "id": "mouse", "parameters": { "pointerType": "mouse" },
                "actions": [
                    { "type": "pointerMove", "origin": { "element-6066-11e4-a52e-4f735466cecf": element }, "x": 0, "y": 0 },
                    { "type": "pointerDown", "button": 0 },
                    { "type": "pause", "duration": hold.as_millis() as u64 },
                    { "type": "pointerUp", "button": 0 },
                ],
            }]}),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let b64 = self.call("GET", "/screenshot", Value::Null).await;
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64"))
            .expect("valid base64")
    }

    async fn close(self) {
        let _ = webdriver(
            self.driver,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        )
        .await;
    }
}

/// One WebDriver call over HTTP/1.1 on loopback.
async fn webdriver(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let body = match body {
        Some(Value::Null) | None => Bytes::new(),
        Some(v) => Bytes::from(v.to_string()),
    };
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }
    .await;
    drop(sender);
    let _ = connection.await;
    result
}
