//! The real `ptt` binary against a relay started in-process on loopback:
//! login, groups, talking a WAV and PCM from stdin, listening in another
//! process with Ogg files that opusinfo and ffmpeg accept, history, and
//! the exit statuses scripts rely on.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use ptt_client::{Client, ClientConfig, Event, GroupMode, ReceiptKind, Trust};
use ptt_codec::decode_ogg_opus;
use ptt_relay::{RelayConfig, RelayHandle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const SPEECH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../codec/tests/fixtures/speech.wav"
);

/// Every process must be done well within this.
const WAIT: Duration = Duration::from_secs(60);

/// The libopus encoder delay the saved files declare, in 48 kHz samples.
const PRE_SKIP: usize = 312;

struct Harness {
    relay: RelayHandle,
    dir: tempfile::TempDir,
}

impl Harness {
    /// A relay with group `team` (notes) of alice and bob.
    async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    /// The same with the relay's configuration adjusted.
    async fn start_with(adjust: impl FnOnce(&mut RelayConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RelayConfig::for_tests(&dir.path().join("relay"));
        adjust(&mut config);
        let relay = ptt_relay::start(config).await.unwrap();
        let h = Harness { relay, dir };
        let trust = Trust::fingerprint_from_hex(h.relay.cert_fingerprint()).unwrap();
        let config = ClientConfig::new(h.relay.addr(), "localhost", trust, h.token("root", true));
        let (admin, _events) = Client::connect(config).await.unwrap();
        admin.create_group("team", GroupMode::Notes).await.unwrap();
        for user in ["alice", "bob"] {
            admin.add_member("team", user).await.unwrap();
        }
        admin.close().await;
        h
    }

    /// An in-process client of `user`, to watch what the relay sends them.
    async fn client(&self, user: &str) -> (Client, ptt_client::Events) {
        let trust = Trust::fingerprint_from_hex(self.relay.cert_fingerprint()).unwrap();
        let config = ClientConfig::new(
            self.relay.addr(),
            "localhost",
            trust,
            self.token(user, false),
        );
        Client::connect(config).await.unwrap()
    }

    fn token(&self, user: &str, admin: bool) -> String {
        self.relay
            .issue_token(user, Duration::from_secs(3600), admin, false)
            .unwrap()
    }

    fn config_of(&self, user: &str) -> PathBuf {
        self.dir.path().join(user).join("config.toml")
    }

    /// `ptt ARGS` with `user`'s configuration file.
    fn ptt(&self, user: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ptt"));
        cmd.args(args)
            .env("PTT_CONFIG", self.config_of(user))
            .env_remove("PTT_TOKEN")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, user: &str, args: &[&str]) -> Output {
        finish(self.ptt(user, args).spawn().unwrap()).await
    }

    /// Logs `user` in with the relay's pin.
    async fn login(&self, user: &str) {
        let out = self
            .run(
                user,
                &[
                    "login",
                    "--relay",
                    &self.relay.addr().to_string(),
                    "--pin",
                    self.relay.cert_fingerprint(),
                    "--token",
                    &self.token(user, false),
                ],
            )
            .await;
        assert_ok(&out);
    }
}

async fn finish(child: tokio::process::Child) -> Output {
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("ptt did not finish in time")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn wav_frames(path: &str) -> usize {
    hound::WavReader::open(path).unwrap().duration() as usize
}

/// Samples ffmpeg decodes from `file` at 48 kHz mono.
fn ffmpeg_samples(file: &Path) -> usize {
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-f", "s16le", "-ac", "1", "-ar", "48000", "-"])
        .output()
        .expect("ffmpeg is installed");
    assert!(out.status.success(), "ffmpeg: {}", text(&out.stderr));
    out.stdout.len() / 2
}

fn opusinfo_accepts(file: &Path) {
    let out = std::process::Command::new("opusinfo")
        .arg(file)
        .output()
        .expect("opusinfo is installed");
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "opusinfo: {all}");
    assert!(
        !all.contains("WARNING") && !all.contains("ERROR"),
        "opusinfo: {all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_stores_a_private_config_and_groups_lists_them() {
    let h = Harness::start().await;

    // Not logged in yet: status 3, and words saying what to do.
    let out = h.run("alice", &["groups"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("ptt login"),
        "{}",
        text(&out.stderr)
    );

    h.login("alice").await;
    let config = std::fs::read_to_string(h.config_of("alice")).unwrap();
    assert!(config.contains(&h.token("alice", false)[..20]));
    assert!(config.contains("user = \"alice\""), "{config}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(h.config_of("alice"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = h.run("alice", &["groups"]).await;
    assert_ok(&out);
    assert_eq!(text(&out.stdout), "team notes\n");

    // Trust by CA file, and the XDG default location when --config is absent.
    let ca = h.dir.path().join("relay.pem");
    std::fs::write(&ca, h.relay.cert_pem()).unwrap();
    let xdg = h.dir.path().join("xdg");
    let out = finish(
        h.ptt(
            "bob",
            &[
                "login",
                "--relay",
                &h.relay.addr().to_string(),
                "--ca",
                ca.to_str().unwrap(),
                "--user",
                "bob",
            ],
        )
        .env_remove("PTT_CONFIG")
        .env("XDG_CONFIG_HOME", &xdg)
        .env("PTT_TOKEN", h.token("bob", false))
        .spawn()
        .unwrap(),
    )
    .await;
    assert_ok(&out);
    let stored = xdg.join("ptt").join("config.toml");
    assert!(std::fs::read_to_string(&stored).unwrap().contains("ca_pem"));
    let out = finish(
        h.ptt("bob", &["groups"])
            .env_remove("PTT_CONFIG")
            .env("XDG_CONFIG_HOME", &xdg)
            .spawn()
            .unwrap(),
    )
    .await;
    assert_ok(&out);
    assert_eq!(text(&out.stdout), "team notes\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_refusals_fail_in_words_with_distinct_statuses() {
    let h = Harness::start().await;
    let addr = h.relay.addr().to_string();
    let pin = h.relay.cert_fingerprint().to_owned();

    // Alice's claims with bob's signature: the relay refuses it.
    let alice = h.token("alice", false);
    let bob = h.token("bob", false);
    let forged = format!(
        "{}.{}",
        alice.rsplit_once('.').unwrap().0,
        bob.rsplit_once('.').unwrap().1
    );
    let login = |token: &str, user: Option<&str>| {
        let mut args = vec!["login", "--relay", &addr, "--pin", &pin, "--token"];
        args.push(token);
        if let Some(user) = user {
            args.extend(["--user", user]);
        }
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let args = login(&forged, None);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = h.run("alice", &args).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("InvalidToken"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !h.config_of("alice").exists(),
        "a refused login is not stored"
    );

    // A token for someone else than --user says.
    let args = login(&alice, Some("bob"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = h.run("alice", &args).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));

    // A stored token that the relay refuses later (stored unchecked).
    let args = login(&forged, None);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("--no-check");
    assert_ok(&h.run("alice", &args).await);
    let out = h.run("alice", &["groups"]).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("InvalidToken"),
        "{}",
        text(&out.stderr)
    );

    // A wrong pin: unreachable (status 4).
    let args = login(&alice, None);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let zeros = "00".repeat(32);
    args[4] = &zeros;
    let out = h.run("carol", &args).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));

    // A group we are not in: refused (status 6) with the code's name.
    h.login("alice").await;
    let out = h
        .run("alice", &["listen", "nowhere", "--timeout", "5s"])
        .await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("NoSuchGroup") || stderr.contains("NotMember"),
        "{stderr}"
    );
    // Not a WAV file: status 8.
    let junk = h.dir.path().join("junk.wav");
    std::fs::write(&junk, b"not a wav file at all").unwrap();
    let out = h
        .run("alice", &["talk", "team", junk.to_str().unwrap()])
        .await;
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_talked_wav_is_heard_live_saved_as_ogg_opus_and_acknowledged() {
    let h = Harness::start().await;
    h.login("alice").await;
    h.login("bob").await;
    let save = h.dir.path().join("clips");

    // Bob listens in his own process; wait until he has joined.
    let mut listener = h
        .ptt(
            "bob",
            &[
                "listen",
                "team",
                "--save",
                save.to_str().unwrap(),
                "--played",
                "--count",
                "1",
                "--timeout",
                "50s",
            ],
        )
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(listener.stderr.take().unwrap()).lines();
    let joined = tokio::time::timeout(WAIT, async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("joined team") {
                return line;
            }
        }
        panic!("the listener ended before joining");
    })
    .await
    .unwrap();
    assert!(joined.contains("0 clips to catch up"), "{joined}");
    // Alice's phone, online, gets the receipts of her clips.
    let (phone, mut receipts) = h.client("alice").await;
    phone.join("team").await.unwrap();

    let out = h.run("alice", &["talk", "team", SPEECH, "--fast"]).await;
    assert_ok(&out);
    assert_eq!(text(&out.stdout), "1\n", "the seq, alone, when piped");

    let heard = finish(listener).await;
    assert_ok(&heard);
    let line = text(&heard.stdout);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 7, "{line}");
    assert_eq!(&fields[..2], ["team", "#1"]);
    assert_eq!(fields[3], "alice");
    let secs: f64 = fields[4].trim_end_matches('s').parse().unwrap();
    let wav = wav_frames(SPEECH); // 16 kHz
    assert!((secs - wav as f64 / 16_000.0).abs() < 0.05, "{line}");
    assert!(
        fields[5].chars().all(|c| ('▁'..='█').contains(&c)),
        "{line}"
    );
    assert!(
        fields[5].chars().any(|c| c >= '▅'),
        "speech has loud parts: {line}"
    );
    let file = save.join("team-000001.opus");
    assert_eq!(fields[6], file.to_str().unwrap());

    // Any player opens it, and it is as long as what alice recorded.
    opusinfo_accepts(&file);
    let audio = decode_ogg_opus(std::fs::File::open(&file).unwrap()).unwrap();
    assert_eq!(audio.sample_rate, 16_000, "decoded at the talker's rate");
    let packets = (secs * 50.0).round() as usize;
    assert_eq!(audio.frames(), (packets * 960 - PRE_SKIP) / 3);
    assert!(
        audio.frames() >= wav && audio.frames() < wav + 320,
        "decoded {} of {wav}",
        audio.frames()
    );
    let ffmpeg = ffmpeg_samples(&file);
    assert!(
        ffmpeg.abs_diff(wav * 3) < 960,
        "ffmpeg decoded {ffmpeg} samples at 48 kHz for {wav} at 16 kHz"
    );

    // Bob's listener acknowledged the clip and reported it played.
    let mut kinds = Vec::new();
    tokio::time::timeout(WAIT, async {
        while kinds.len() < 2 {
            if let Some(Event::Receipt {
                seq: 1, user, kind, ..
            }) = receipts.next().await
                && user == "bob"
            {
                kinds.push(kind);
            }
        }
    })
    .await
    .expect("receipts from bob");
    assert_eq!(kinds, [ReceiptKind::Delivered, ReceiptKind::Played]);
    phone.close().await;

    // Acknowledged: listening again finds nothing to catch up, and waiting
    // for a clip that does not come ends with status 7.
    let out = h
        .run(
            "bob",
            &["listen", "team", "--count", "1", "--timeout", "1s"],
        )
        .await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("0 clips to catch up"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcm_from_stdin_is_sent_in_real_time_and_history_lists_without_acknowledging() {
    let h = Harness::start().await;
    h.login("alice").await;
    h.login("bob").await;

    // A clip from a file first, then one second of a 440 Hz tone from
    // stdin at 48 kHz, as a microphone would give it.
    assert_ok(&h.run("alice", &["talk", "team", SPEECH, "--fast"]).await);
    let pcm: Vec<u8> = (0..48_000)
        .map(|i| ((i as f32 * 440.0 * std::f32::consts::TAU / 48_000.0).sin() * 12_000.0) as i16)
        .flat_map(i16::to_le_bytes)
        .collect();
    let started = Instant::now();
    let mut child = h
        .ptt(
            "alice",
            &["talk", "team", "-", "--rate", "48000", "--channels", "1"],
        )
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&pcm).await.unwrap();
    drop(stdin);
    let out = finish(child).await;
    assert_ok(&out);
    assert_eq!(text(&out.stdout), "2\n");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "one second of audio was sent in {:?}",
        started.elapsed()
    );

    // History: both clips in order, saved; the tone is one second long.
    let save = h.dir.path().join("history");
    let out = h
        .run(
            "bob",
            &[
                "history",
                "team",
                "--count",
                "5",
                "--save",
                save.to_str().unwrap(),
            ],
        )
        .await;
    assert_ok(&out);
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("team #1 "), "{lines:?}");
    assert!(lines[1].starts_with("team #2 "), "{lines:?}");
    assert!(lines[1].contains(" alice 1.0"), "{lines:?}");
    let tone = save.join("team-000002.opus");
    opusinfo_accepts(&tone);
    let audio = decode_ogg_opus(std::fs::File::open(&tone).unwrap()).unwrap();
    assert_eq!(audio.sample_rate, 48_000);
    assert!(
        audio.frames() >= 48_000 && audio.frames() < 48_000 + 960,
        "{}",
        audio.frames()
    );

    // History did not acknowledge: listening catches up on both.
    let out = h
        .run(
            "bob",
            &["listen", "team", "--count", "2", "--timeout", "20s"],
        )
        .await;
    assert_ok(&out);
    assert!(
        text(&out.stderr).contains("2 clips to catch up"),
        "{}",
        text(&out.stderr)
    );
    let mut seqs: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_owned())
        .collect();
    seqs.sort();
    assert_eq!(seqs, ["#1", "#2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_longest_clip_bounds_what_is_sent() {
    let h = Harness::start_with(|c| c.max_clip = Duration::from_secs(1)).await;
    h.login("alice").await;

    // A file longer than the relay takes is refused before sending.
    let out = h.run("alice", &["talk", "team", SPEECH, "--fast"]).await;
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("at most 1.0 s"),
        "{}",
        text(&out.stderr)
    );

    // A microphone that keeps going: the first second is sent and stored.
    let mut child = h
        .ptt("alice", &["talk", "team", "-", "--rate", "16000"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let pcm: Vec<u8> = (0..32_000)
        .map(|i| ((i as f32 * 0.07).sin() * 9_000.0) as i16)
        .flat_map(i16::to_le_bytes)
        .collect();
    // The pipe may be closed by ptt before all of it is written.
    let _ = stdin.write_all(&pcm).await;
    drop(stdin);
    let out = finish(child).await;
    assert_ok(&out);
    assert_eq!(text(&out.stdout), "1\n");
    assert!(
        text(&out.stderr).contains("at most 1.0 s"),
        "{}",
        text(&out.stderr)
    );

    h.login("bob").await;
    let out = h.run("bob", &["history", "team", "--count", "1"]).await;
    assert_ok(&out);
    let line = text(&out.stdout);
    let secs: f64 = line
        .split_whitespace()
        .nth(4)
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!((0.98..=1.0).contains(&secs), "{line}");
}
