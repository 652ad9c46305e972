//! A real `nats-server` with JetStream for the cluster tests: found on the
//! PATH (or `$NATS_SERVER`), started on a free loopback port with its store
//! in a temporary directory, killed when dropped. [`NatsCluster`] is three
//! (or more) of them clustered by routes on loopback, JetStream replicated.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running NATS server.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    binary: PathBuf,
    store: tempfile::TempDir,
    /// Clustering flags (`-n`, `--cluster_name`, `--cluster`, `--routes`),
    /// empty for a server on its own.
    cluster_args: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a free loopback port; panics, saying how to
    /// install one, if there is no `nats-server` binary.
    pub fn start() -> NatsServer {
        let binary = binary();
        let port = free_port();
        let store = tempfile::tempdir().expect("temp dir");
        let mut server = NatsServer {
            child: None,
            port,
            binary,
            store,
            cluster_args: Vec::new(),
        };
        server.restart();
        server
    }

    /// The server's name in its cluster (`n<i>`), if clustered.
    pub fn name(&self) -> Option<&str> {
        let at = self.cluster_args.iter().position(|a| a == "-n")?;
        self.cluster_args.get(at + 1).map(String::as_str)
    }

    /// Kills the server at once (`kill -9`: nothing flushed, no goodbye
    /// to its peers), and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server as a service manager would (SIGTERM: it flushes
    /// its store and exits), killing it if it has not exited in 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port and store, and waits until
    /// it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(&self.binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .args(&self.cluster_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.greets() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start listening"
            );
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "nats-server exited at start ({status}): is port {} taken?",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl NatsServer {
    /// Whether the server accepts a connection and greets it with its
    /// `INFO` line (a listening socket alone is not enough: a client that
    /// connected while the server was still starting has been seen reset).
    fn greets(&self) -> bool {
        use std::io::Read;
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut info = [0u8; 4];
        stream.read_exact(&mut info).is_ok() && &info == b"INFO"
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// NATS servers clustered by routes on loopback (one JetStream domain, so
/// streams and buckets can have replicas up to the number of servers).
pub struct NatsCluster {
    /// The servers, `n1`, `n2`, … in order.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` clustered servers and waits until each accepts
    /// connections (electing JetStream's leaders takes a moment more: the
    /// first client requests may fail until then).
    pub fn start(n: usize) -> NatsCluster {
        let binary = binary();
        let mut ports = free_ports(2 * n);
        let clients = ports.split_off(n);
        let routes = ports;
        let route_urls = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let servers = routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                let mut server = NatsServer {
                    child: None,
                    port: clients[i],
                    binary: binary.clone(),
                    store: tempfile::tempdir().expect("temp dir"),
                    cluster_args: vec![
                        "-n".into(),
                        format!("n{}", i + 1),
                        "--cluster_name".into(),
                        "ptt-test".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{route}"),
                        "--routes".into(),
                        route_urls.clone(),
                    ],
                };
                server.restart();
                server
            })
            .collect();
        NatsCluster { servers }
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// The server named `name` (`n1`…).
    pub fn by_name(&mut self, name: &str) -> Option<&mut NatsServer> {
        self.servers.iter_mut().find(|s| s.name() == Some(name))
    }
}

/// `$NATS_SERVER`, or `nats-server` on the PATH (Debian puts it in
/// /usr/sbin).
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no nats-server binary (PATH, /usr/sbin or $NATS_SERVER): \
                 run ./dev.sh setup to install it"
            )
        })
}

fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports: every listener is held until all are chosen,
/// so the kernel cannot hand one out twice (a cluster's route ports and
/// client ports chosen one by one could collide, and a server whose port
/// is taken never listens).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("bound").port())
        .collect()
}
