//! Output sinks decoupled from the arbiter (docs/line.md "Outputs"): each slow or blocking output
//! (results log, serial line, the journal) runs on its own thread behind a bounded queue, so an
//! output that cannot keep up loses its own lines — counted in OUTPUTS_DROPPED — and never holds
//! back the thread that resolves every part.

use crate::arbiter::Sink;
use crate::status::{Health, LineState, Outcome, ResultRecord};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

/// Lines a queued output may fall behind by before it drops (a few seconds at line rate).
pub const QUEUE_LEN: usize = 256;

enum Msg {
    Result(ResultRecord),
    State(LineState),
}

/// A sink on its own thread behind a bounded queue (see the module docs).
pub struct QueuedSink {
    name: &'static str,
    tx: Option<SyncSender<Msg>>,
    done: Receiver<()>,
    health: Arc<Health>,
}

impl QueuedSink {
    /// Run `inner` on a thread named after `name`; drops are counted in `health`.
    pub fn spawn(name: &'static str, mut inner: Box<dyn Sink>, health: Arc<Health>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE_LEN);
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("edge-ad-out-{name}"))
            .spawn(move || {
                while let Ok(m) = rx.recv() {
                    match m {
                        Msg::Result(r) => inner.emit(&r),
                        Msg::State(s) => inner.state(s),
                    }
                }
                let _ = done_tx.send(());
            })
            .expect("spawn an output thread");
        Self {
            name,
            tx: Some(tx),
            done,
            health,
        }
    }

    fn send(&mut self, m: Msg) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(m) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = self.health.outputs_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!(
                        "output {}: cannot keep up, {n} lines dropped so far",
                        self.name
                    );
                }
            }
        }
    }
}

impl Sink for QueuedSink {
    fn emit(&mut self, r: &ResultRecord) {
        self.send(Msg::Result(*r));
    }
    fn state(&mut self, s: LineState) {
        self.send(Msg::State(s));
    }
}

impl Drop for QueuedSink {
    /// Let the output write what is queued, for at most 300 ms (the line's three queued
    /// outputs together within a second): a blocked output must not keep a draining process
    /// from exiting (the systemd stop timeout is deadline + 2 s).
    fn drop(&mut self) {
        self.tx = None;
        let _ = self.done.recv_timeout(Duration::from_millis(300));
    }
}

/// NG and ERR parts, and state changes, in the log.
pub struct LogSink;

impl Sink for LogSink {
    fn emit(&mut self, r: &ResultRecord) {
        match r.outcome {
            Outcome::Ok => log::debug!("tag {} OK {:.3} {} ms", r.tag, r.score, r.ms),
            Outcome::Ng => log::info!("tag {} NG {:.3} {} ms", r.tag, r.score, r.ms),
            Outcome::Err => log::warn!("tag {} ERR ({:?}) {} ms", r.tag, r.cause, r.ms),
        }
    }
    fn state(&mut self, s: LineState) {
        log::info!("line {}", crate::server::state_word(s));
    }
}

/// The results log: one JSON line per resolved tag, appended (a restart keeps what was there),
/// rotated by size (`results` → `results.1` → … → `results.<keep>`, the oldest deleted), each
/// line flushed. A failed write counts in LOG_WRITE_ERRORS and sets the LOG_ERROR status bit
/// until a write succeeds again.
pub struct JsonlSink {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
    health: Arc<Health>,
}

impl JsonlSink {
    /// Open `path` for appending (created if missing).
    pub fn open(
        path: &Path,
        max_bytes: u64,
        keep: u32,
        health: Arc<Health>,
    ) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            max_bytes,
            keep,
            health,
        })
    }

    fn rotated(&self, i: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{i}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for i in (1..self.keep).rev() {
            let from = self.rotated(i);
            if from.exists() {
                std::fs::rename(&from, self.rotated(i + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.file = Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?,
        );
        self.size = 0;
        Ok(())
    }

    fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            if let Err(e) = self.rotate() {
                // Go on appending to whatever is at the path now; the next rotation is tried a
                // whole file later, so a failing rename cannot delete the rotated history line
                // by line.
                self.file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .ok();
                self.size = 0;
                return Err(e);
            }
        }
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let f = self.file.as_mut().expect("opened above");
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|_| f.flush()) {
            // No torn line for the next one to be glued onto (disk full mid-line).
            if let Ok(m) = f.metadata() {
                if m.is_file() && m.len() > self.size {
                    let _ = f.set_len(self.size);
                }
            }
            return Err(e);
        }
        self.size += line.len() as u64;
        Ok(())
    }
}

/// One results-log line.
pub fn jsonl_line(r: &ResultRecord) -> String {
    let line = serde_json::json!({
        "tag": r.tag, "outcome": r.outcome,
        "score": if r.score.is_finite() { Some(r.score) } else { None },
        "ms": r.ms, "cause": r.cause, "product": r.product,
    });
    format!("{line}\n")
}

impl Sink for JsonlSink {
    fn emit(&mut self, r: &ResultRecord) {
        match self.write_line(&jsonl_line(r)) {
            Ok(()) => self.health.log_failing.store(false, Ordering::Relaxed),
            Err(e) => {
                let n = self.health.log_errors.fetch_add(1, Ordering::Relaxed) + 1;
                self.health.log_failing.store(true, Ordering::Relaxed);
                if n.is_power_of_two() {
                    log::error!(
                        "log.results {}: write failed ({e}); {n} lines lost so far",
                        self.path.display()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Outcome;

    fn rec(tag: u32) -> ResultRecord {
        ResultRecord {
            tag,
            product: 1,
            outcome: Outcome::Ok,
            score: 0.5,
            ms: 10,
            cause: None,
        }
    }

    /// M3: the log used to be truncated at every start; it appends and rotates by size now.
    #[test]
    fn results_log_appends_across_restarts_and_rotates_by_size() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("results.jsonl");
        std::fs::write(&p, "{\"old\":1}\n").unwrap();
        let h = Arc::new(Health::default());
        let line_len = jsonl_line(&rec(1)).len() as u64;
        let mut s = JsonlSink::open(&p, 10 * line_len, 2, h.clone()).unwrap();
        s.emit(&rec(1));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with("{\"old\":1}\n") && text.contains("\"tag\":1"),
            "{text}"
        );
        for t in 2..=40 {
            s.emit(&rec(t));
        }
        let tags = |q: &Path| -> Vec<u64> {
            std::fs::read_to_string(q)
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["tag"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        let (cur, r1, r2) = (tags(&p), tags(&s.rotated(1)), tags(&s.rotated(2)));
        // Each file stays under 10 lines' worth of bytes; the newest lines are kept, in order,
        // across the files; the oldest file beyond `keep` is gone.
        for f in [&cur, &r1, &r2] {
            assert!((1..=10).contains(&f.len()), "{cur:?} {r1:?} {r2:?}");
        }
        let all: Vec<u64> = r2.iter().chain(&r1).chain(&cur).copied().collect();
        let first = all[0];
        assert_eq!(all, (first..=40).collect::<Vec<_>>());
        assert!(r2.len() >= 9 && r1.len() >= 9, "{r1:?} {r2:?}");
        assert!(!s.rotated(3).exists());
        assert_eq!(h.log_errors.load(Ordering::Relaxed), 0);
    }

    /// M4: write errors (disk full) used to be ignored; they count and raise LOG_ERROR.
    #[test]
    fn results_log_write_errors_are_counted_and_flagged() {
        let h = Arc::new(Health::default());
        let mut s = JsonlSink::open(Path::new("/dev/full"), u64::MAX, 1, h.clone()).unwrap();
        s.emit(&rec(1));
        s.emit(&rec(2));
        assert_eq!(h.log_errors.load(Ordering::Relaxed), 2);
        assert!(h.log_failing.load(Ordering::Relaxed));
    }

    /// H2: an output that blocks loses its own lines; the caller never waits.
    #[test]
    fn a_blocked_output_drops_and_counts_instead_of_blocking() {
        struct Stuck;
        impl Sink for Stuck {
            fn emit(&mut self, _: &ResultRecord) {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let h = Arc::new(Health::default());
        let mut q = QueuedSink::spawn("stuck", Box::new(Stuck), h.clone());
        let t = std::time::Instant::now();
        for i in 0..(QUEUE_LEN as u32 + 50) {
            q.emit(&rec(i));
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // One line is being written, QUEUE_LEN wait; the rest are dropped.
        let dropped = h.outputs_dropped.load(Ordering::Relaxed);
        assert!((49..=50).contains(&dropped), "{dropped}");
        let t = std::time::Instant::now();
        drop(q);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
