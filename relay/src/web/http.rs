//! The HTTP/1.1 listener that serves the browser page: the embedded static
//! files and `config.json` (the relay's UDP port, the WebTransport path and
//! the development certificate's hashes). GET and HEAD only, at most
//! [`MAX_CONNECTIONS`] connections at once, each closed after
//! [`CONNECTION_TIME`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::transport::WEB_PATH;
use crate::web::cert::CertResolver;

/// Most HTTP connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// Longest an HTTP connection is kept (the page is a few small files).
pub const CONNECTION_TIME: Duration = Duration::from_secs(30);

const JS: &str = "text/javascript; charset=utf-8";

/// The page's files: path, content type, content.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
    ("/app.js", JS, include_str!("../../web/app.js")),
    ("/protocol.js", JS, include_str!("../../web/protocol.js")),
    ("/audio.js", JS, include_str!("../../web/audio.js")),
];

/// The bound listener and what `config.json` says.
#[derive(Debug)]
pub struct Site {
    listener: TcpListener,
    addr: SocketAddr,
    pages: Arc<Pages>,
}

/// Binds the page's listener; `quic_port` is the relay's UDP port.
pub async fn bind(
    addr: SocketAddr,
    quic_port: u16,
    certs: Arc<CertResolver>,
) -> std::io::Result<Site> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    Ok(Site {
        listener,
        addr,
        pages: Arc::new(Pages { quic_port, certs }),
    })
}

impl Site {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`; then stops every connection and returns.
    pub async fn serve(self, shutdown: CancellationToken) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = connections.join_next() => {}
                accepted = self.listener.accept(), if connections.len() < MAX_CONNECTIONS => {
                    let Ok((stream, _)) = accepted else { continue };
                    let pages = self.pages.clone();
                    connections.spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                            let response = pages.respond(request.method(), request.uri().path());
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let connection = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(io, service);
                        let _ = tokio::time::timeout(CONNECTION_TIME, connection).await;
                    });
                }
            }
        }
        connections.shutdown().await;
    }
}

/// Answers requests without I/O.
#[derive(Debug)]
struct Pages {
    quic_port: u16,
    certs: Arc<CertResolver>,
}

impl Pages {
    fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        if method != Method::GET && method != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        if path == "/config.json" {
            let config = serde_json::json!({
                "port": self.quic_port,
                "path": WEB_PATH,
                "certificate_hashes": self.certs.certificate_hashes(),
            });
            return response(
                StatusCode::OK,
                "application/json",
                config.to_string().into(),
            );
        }
        let path = if path == "/index.html" { "/" } else { path };
        match FILES.iter().find(|(p, _, _)| *p == path) {
            Some((_, kind, body)) => {
                response(StatusCode::OK, kind, Bytes::from_static(body.as_bytes()))
            }
            None => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    response(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(text.as_bytes()),
    )
}

fn response(status: StatusCode, kind: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(kind) = header::HeaderValue::from_str(kind) {
        headers.insert(header::CONTENT_TYPE, kind);
    }
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::time::SystemTime;

    fn pages() -> Pages {
        let identity = crate::tls::Identity::self_signed().unwrap();
        Pages {
            quic_port: 4433,
            certs: Arc::new(CertResolver::new(&identity, true, SystemTime::now()).unwrap()),
        }
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn config_names_the_port_path_and_current_hash() {
        let pages = pages();
        let response = pages.respond(&Method::GET, "/config.json");
        assert_eq!(response.status(), StatusCode::OK);
        let config: serde_json::Value = serde_json::from_str(&body(response).await).unwrap();
        assert_eq!(config["port"], 4433);
        assert_eq!(config["path"], "/ptt");
        assert_eq!(
            config["certificate_hashes"][0],
            pages.certs.certificate_hashes()[0].as_str()
        );
    }

    #[tokio::test]
    async fn files_are_served_and_others_refused() {
        let pages = pages();
        let index = pages.respond(&Method::GET, "/");
        assert_eq!(index.status(), StatusCode::OK);
        assert!(body(index).await.contains("<script type=\"module\""));
        let app = pages.respond(&Method::GET, "/app.js");
        assert_eq!(app.headers()[header::CONTENT_TYPE], JS);
        assert_eq!(
            pages.respond(&Method::GET, "/../Cargo.toml").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            pages.respond(&Method::POST, "/").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
