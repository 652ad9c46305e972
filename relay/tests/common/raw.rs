//! A bare QUIC client speaking the protocol by hand, for tests that send
//! what the client library never would.

use std::time::Duration;

use ptt_protocol::message::MAX_PAYLOAD_LEN;
use ptt_protocol::{
    ClipFormat, ClipHeader, ClipMessage, ControlMessage, ErrorCode, FramedReader, PROTOCOL_VERSION,
};

use super::{TestRelay, WAIT};

/// A bare QUIC connection.
pub struct Raw {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

impl Raw {
    pub async fn connect(relay: &TestRelay) -> Raw {
        Raw::connect_with(relay, |_| {}).await
    }

    /// Connects with the client configuration adjusted (ALPN, windows).
    pub async fn connect_with(
        relay: &TestRelay,
        adjust: impl FnOnce(&mut quinn::ClientConfig),
    ) -> Raw {
        let config = relay.config(String::new());
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut client = ptt_client::quinn_config(&config).unwrap();
        adjust(&mut client);
        endpoint.set_default_client_config(client);
        let conn = endpoint
            .connect(relay.handle.addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        Raw { endpoint, conn }
    }

    /// Connects and authenticates as `user`; returns the control stream.
    pub async fn hello(relay: &TestRelay, user: &str) -> (Raw, quinn::SendStream, Control) {
        let raw = Raw::connect(relay).await;
        let (send, control) = raw.hello_as(relay, user).await;
        (raw, send, control)
    }

    /// Connects as `user`, joins `group` and waits for its catch-up.
    pub async fn member(
        relay: &TestRelay,
        user: &str,
        group: &str,
    ) -> (Raw, quinn::SendStream, Control) {
        let (raw, mut send, mut control) = Raw::hello(relay, user).await;
        let join = ControlMessage::Join {
            request_id: 1,
            group: group.into(),
        };
        send.write_all(&join.to_bytes()).await.unwrap();
        control
            .until(|m| matches!(m, ControlMessage::CaughtUp { .. }).then_some(()))
            .await;
        (raw, send, control)
    }

    /// Opens the control stream and says hello as `user`.
    pub async fn hello_as(&self, relay: &TestRelay, user: &str) -> (quinn::SendStream, Control) {
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        let hello = ControlMessage::Hello {
            version: PROTOCOL_VERSION,
            token: relay.token(user),
            client: "raw".into(),
        };
        send.write_all(&hello.to_bytes()).await.unwrap();
        let mut control = Control(FramedReader::new(recv, MAX_PAYLOAD_LEN));
        assert!(matches!(
            control.next().await,
            Some(ControlMessage::Welcome(_))
        ));
        (send, control)
    }

    /// The application code the relay closed the connection with.
    pub async fn closed_with(&self) -> u64 {
        match tokio::time::timeout(WAIT, self.conn.closed())
            .await
            .expect("closed in time")
        {
            quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
            other => panic!("closed otherwise: {other}"),
        }
    }

    /// The next clip stream the relay opens, read whole: its messages and
    /// how it ended (`None`: FIN; `Some(code)`: RESET_STREAM).
    pub async fn next_clip(&self) -> (Vec<ClipMessage>, Option<u64>) {
        let recv = tokio::time::timeout(WAIT, self.conn.accept_uni())
            .await
            .expect("a clip stream in time")
            .expect("a clip stream");
        read_clip(recv).await
    }
}

/// Reads a clip stream to its end: its messages and how it ended.
pub async fn read_clip(recv: quinn::RecvStream) -> (Vec<ClipMessage>, Option<u64>) {
    let mut reader = FramedReader::new(recv, MAX_PAYLOAD_LEN);
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, reader.next_clip())
            .await
            .expect("clip stream progress in time")
        {
            Ok(Some((message, _))) => messages.push(message),
            Ok(None) => return (messages, None),
            Err(ptt_protocol::ReadError::Stream(quinn::ReadError::Reset(code))) => {
                return (messages, Some(code.into_inner()));
            }
            Err(e) => panic!("clip stream failed: {e}"),
        }
    }
}

/// The control stream's receiving side.
pub struct Control(pub FramedReader<quinn::RecvStream>);

impl Control {
    /// The next message (`None` when the stream ends or fails).
    pub async fn next(&mut self) -> Option<ControlMessage> {
        tokio::time::timeout(WAIT, self.0.next_control())
            .await
            .expect("a control message in time")
            .ok()
            .flatten()
    }

    /// The next message that `keep` selects, skipping others.
    pub async fn until<T>(&mut self, mut keep: impl FnMut(ControlMessage) -> Option<T>) -> T {
        loop {
            let message = self.next().await.expect("the control stream is open");
            if let Some(v) = keep(message) {
                return v;
            }
        }
    }

    /// The code of the `Error{0, code}` that announces the close.
    pub async fn closing_error(&mut self) -> ErrorCode {
        self.until(|m| match m {
            ControlMessage::Error {
                request_id: 0,
                code,
                ..
            } => Some(code),
            _ => None,
        })
        .await
    }

    /// Messages that arrive within `window`.
    pub async fn drain(&mut self, window: Duration) -> Vec<ControlMessage> {
        let mut out = Vec::new();
        while let Ok(Ok(Some(m))) = tokio::time::timeout(window, self.0.next_control()).await {
            out.push(m);
        }
        out
    }
}

/// An upload header for `group`.
pub fn header(group: &str) -> ClipHeader {
    ClipHeader {
        group: group.into(),
        clip_id: ptt_client::random_clip_id(),
        talker: String::new(),
        seq: 0,
        format: ClipFormat::Opus,
        sample_rate: 48_000,
        channels: 1,
        frame_ms: 20,
        created_ms: 0,
        flags: 0,
    }
}

/// `code` as a number, for comparing close and reset codes.
pub fn n(code: ErrorCode) -> u64 {
    u64::from(code.code())
}
