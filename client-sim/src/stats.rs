//! Measurements: latency histograms (hdrhistogram, microseconds), a
//! per-second time series of frame latency, and the CPU time and resident
//! memory of a process read from `/proc`.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The latencies the simulator measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// QUIC handshake + hello/welcome (token check) of one client.
    Connect,
    /// Floor request to grant, in walkie groups (press to go-ahead).
    FloorGrant,
    /// Talker sends frame 0 to a member receives it (live clips).
    FirstFrame,
    /// Every live frame, send to receive.
    Frame,
    /// A member that (re)joins while a clip is in flight or stored: join
    /// to the first frame of that clip.
    LateEntry,
    /// Talker's last frame (finish) to a member's clip end (live clips).
    ClipComplete,
    /// Talker's finish to the relay's `Stored` confirmation.
    StoredAck,
    /// How late the talker's pacing timer fired (the simulator's own lag).
    PacingLag,
    /// Every live frame at the members that read slowly on purpose
    /// (`slow_per_group`), kept out of [`Metric::Frame`].
    SlowFrame,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 9] = [
        Metric::Connect,
        Metric::FloorGrant,
        Metric::FirstFrame,
        Metric::Frame,
        Metric::LateEntry,
        Metric::ClipComplete,
        Metric::StoredAck,
        Metric::PacingLag,
        Metric::SlowFrame,
    ];

    /// The key in the JSON report.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Connect => "connect",
            Metric::FloorGrant => "floor_grant",
            Metric::FirstFrame => "first_frame",
            Metric::Frame => "frame",
            Metric::LateEntry => "late_entry",
            Metric::ClipComplete => "clip_complete",
            Metric::StoredAck => "stored_ack",
            Metric::PacingLag => "sim_pacing_lag",
            Metric::SlowFrame => "slow_frame",
        }
    }
}

/// A new histogram of microseconds, 1 µs to 10 minutes, 3 digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// Summarises a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Tick {
    /// Seconds since the talking started.
    pub t: f64,
    /// Frames received in that second.
    pub frames: u64,
    /// Frame latency percentiles in that second, ms.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

struct Inner {
    hist: Vec<Histogram<u64>>,
    interval: Histogram<u64>,
    interval_frames: u64,
}

/// The shared recorder. Frame latencies arrive in batches (see
/// [`FrameBatch`]) so the lock is taken once per few hundred frames.
pub struct Recorder {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 600_000_000)
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Recorder {
        Recorder {
            inner: Mutex::new(Inner {
                hist: Metric::ALL.iter().map(|_| new_histogram()).collect(),
                interval: new_histogram(),
                interval_frames: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one sample.
    pub fn record(&self, metric: Metric, d: Duration) {
        let v = us(d);
        let mut g = self.lock();
        let _ = g.hist[metric as usize].record(v);
    }

    /// Records a batch of frame latencies (µs) and received-frame counts.
    pub fn record_frames(&self, batch: &mut FrameBatch) {
        self.record_frames_as(Metric::Frame, batch);
    }

    /// Records a batch of frame latencies (µs) as `metric`, and
    /// received-frame counts; only [`Metric::Frame`] goes into the
    /// per-second series.
    pub fn record_frames_as(&self, metric: Metric, batch: &mut FrameBatch) {
        if batch.latencies.is_empty() && batch.received == 0 {
            return;
        }
        let mut g = self.lock();
        for &v in &batch.latencies {
            let v = u64::from(v).max(1);
            let _ = g.hist[metric as usize].record(v);
            if metric == Metric::Frame {
                let _ = g.interval.record(v);
            }
        }
        g.interval_frames += batch.received;
        batch.latencies.clear();
        batch.received = 0;
    }

    /// Takes the frame latencies recorded since the last call, as the tick
    /// at `t` seconds.
    pub fn take_tick(&self, t: f64) -> Tick {
        let mut g = self.lock();
        let s = Summary::of(&g.interval);
        let tick = Tick {
            t,
            frames: g.interval_frames,
            p50: s.p50,
            p99: s.p99,
            max: s.max,
        };
        g.interval.reset();
        g.interval_frames = 0;
        tick
    }

    /// A copy of one histogram.
    pub fn histogram(&self, metric: Metric) -> Histogram<u64> {
        self.lock().hist[metric as usize].clone()
    }

    /// Summaries of every metric.
    pub fn summaries(&self) -> Vec<(Metric, Summary)> {
        let g = self.lock();
        Metric::ALL
            .iter()
            .map(|&m| (m, Summary::of(&g.hist[m as usize])))
            .collect()
    }
}

/// Frame latencies a receiver collects before taking the recorder's lock.
#[derive(Debug, Default)]
pub struct FrameBatch {
    /// Latencies in µs.
    pub latencies: Vec<u32>,
    /// Frames received (with or without a latency).
    pub received: u64,
}

impl FrameBatch {
    /// Flush when this many latencies are waiting.
    pub const CAPACITY: usize = 256;

    /// An empty batch with room for [`FrameBatch::CAPACITY`] samples.
    pub fn new() -> FrameBatch {
        FrameBatch {
            latencies: Vec::with_capacity(Self::CAPACITY),
            received: 0,
        }
    }

    /// Adds a latency; `true` when the batch should be flushed.
    pub fn push(&mut self, d: Duration) -> bool {
        self.latencies
            .push(d.as_micros().min(u128::from(u32::MAX)) as u32);
        self.latencies.len() >= Self::CAPACITY
    }
}

/// CPU time and memory of a process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProcSample {
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

/// Clock ticks per second for `/proc/PID/stat`'s utime and stime: the
/// `AT_CLKTCK` entry of `/proc/self/auxv` (what `sysconf(_SC_CLK_TCK)`
/// returns, read without `unsafe`, which the workspace forbids), or 100,
/// the value on every mainstream Linux, when that cannot be read.
pub fn clock_ticks() -> u64 {
    const AT_CLKTCK: u64 = 17;
    if let Ok(auxv) = std::fs::read("/proc/self/auxv") {
        for pair in auxv.chunks_exact(16) {
            let key = u64::from_ne_bytes(pair[..8].try_into().expect("8 bytes"));
            let value = u64::from_ne_bytes(pair[8..].try_into().expect("8 bytes"));
            if key == AT_CLKTCK && value > 0 {
                return value;
            }
        }
    }
    100
}

/// Parses utime + stime (clock ticks) from the text of `/proc/PID/stat`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Parses VmRSS (KiB) from the text of `/proc/PID/status`.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Reads a process's CPU time and RSS; `pid` `None` is this process.
pub fn sample_process(pid: Option<u32>) -> Option<ProcSample> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_owned(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    Some(ProcSample {
        cpu_s: ticks as f64 / clock_ticks() as f64,
        rss_kib: parse_status_rss(&status)?,
    })
}

/// Machine-wide CPU time from `/proc/stat`: (busy, total) in seconds over
/// all cores, and the 1-minute load average.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostSample {
    /// CPU seconds spent not idle, all cores.
    pub busy_s: f64,
    /// CPU seconds elapsed, all cores.
    pub total_s: f64,
    /// 1-minute load average.
    pub loadavg: f64,
}

/// Parses the aggregate `cpu` line of `/proc/stat` into (busy, total)
/// clock ticks (idle and iowait are not busy).
pub fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total - v[3] - v[4], total))
}

/// Reads the machine's CPU counters and load average.
pub fn sample_host() -> Option<HostSample> {
    let (busy, total) = parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let hz = clock_ticks() as f64;
    Some(HostSample {
        busy_s: busy as f64 / hz,
        total_s: total as f64 / hz,
        loadavg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "1234 (relay (x) y) S 1 1234 1234 0 -1 4194304 2000 0 0 0 \
                    150 50 0 0 20 0 4 0 12345 1000000 2500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(200));
        let status = "Name:\trelay\nVmPeak:\t  2000 kB\nVmRSS:\t   1536 kB\nThreads:\t4\n";
        assert_eq!(parse_status_rss(status), Some(1536));
        assert!(clock_ticks() >= 1);
        let me = sample_process(None).expect("/proc/self is readable");
        assert!(me.rss_kib > 0);
    }

    #[test]
    fn host_counters_parse() {
        let stat = "cpu  100 5 50 800 45 0 0 0 0 0\ncpu0 50 2 25 400 20 0 0 0 0 0\n";
        assert_eq!(parse_proc_stat(stat), Some((155, 1000)));
        assert!(sample_host().is_some());
    }

    #[test]
    fn batches_and_ticks_add_up() {
        let r = Recorder::new();
        let mut b = FrameBatch::new();
        for ms in 1..=100u64 {
            b.received += 1;
            b.push(Duration::from_millis(ms));
        }
        r.record_frames(&mut b);
        assert!(b.latencies.is_empty());
        let t = r.take_tick(1.0);
        assert_eq!(t.frames, 100);
        assert!((t.p50 - 50.0).abs() < 0.1, "{t:?}");
        assert!((t.max - 100.0).abs() < 0.1, "{t:?}");
        assert_eq!(r.take_tick(2.0).frames, 0);
        let s = Summary::of(&r.histogram(Metric::Frame));
        assert_eq!(s.count, 100);
        assert!((s.p99 - 99.0).abs() < 0.1, "{s:?}");
    }
}
