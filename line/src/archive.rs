//! The NG archive (docs/line.md, "Archive"): for each kept part its frame, its heatmap and a JSON
//! record, so that the quality engineer who walks up to the box later sees what was rejected
//! and why.
//!
//! Two inputs meet on one writer thread: the inspection stage hands over the frame and map of a
//! part it may keep ([`ArchiveTap`], only for parts the `keep` rule could want), and the arbiter's
//! resolved result arrives through [`ArchiveSink`]. Only the result decides (a part the model
//! called NG may still end ERR at its deadline). Both hand-overs are `try_send`: a slow disk
//! drops archive entries and counts them (ARCHIVE_DROPPED), it never delays a verdict.
//!
//! An entry is a folder `<unix ms>-<tag>` written as `.tmp-<name>` and renamed into place, so a
//! crash leaves no half entry (leftover `.tmp-*` folders are removed at start). The oldest
//! entries go first when the folder passes its budget; the budget is kept across restarts (the
//! folder is scanned at start).

use crate::arbiter::Sink;
use crate::config::{ArchiveKeep, ArchiveSection};
use crate::status::{Health, Outcome, ResultRecord};
use edge_ad::heatmap::{self, Scale};
use edge_ad::pipeline::Inspection;
use edge_ad::preprocess::Rgb8;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the stage hands over for a part it may keep.
pub struct Capture {
    /// The part's tag.
    pub tag: u32,
    /// The frame as inspected.
    pub frame: Rgb8,
    /// Map, score and timings.
    pub inspection: Inspection,
    /// The threshold the verdict used.
    pub threshold: f64,
    /// The heatmap's colour scale (the bank's).
    pub scale: Scale,
    /// The product id the part was inspected as (the result's says 0 for an auto part that
    /// ended ERR at its deadline after it was recognised).
    pub product: u16,
}

enum Msg {
    Capture(Box<Capture>),
    Result(ResultRecord),
    /// The line stops: write what is queued before this, then say so.
    Stop(SyncSender<()>),
}

/// Captures waiting for their result at most: more than the FIFO can hold in flight
/// (`timing.fifo` ≤ 64).
const PENDING: usize = 72;
/// Messages queued for the writer at most; beyond, entries are dropped and counted.
const QUEUE: usize = 32;

/// The stage's side: offers frames of parts the rule may keep.
#[derive(Clone)]
pub struct ArchiveTap {
    keep: ArchiveKeep,
    tx: SyncSender<Msg>,
    health: Arc<Health>,
}

impl ArchiveTap {
    /// Whether a part the model judged `ng` may be kept (its frame is worth copying).
    pub fn wants(&self, ng: bool) -> bool {
        match self.keep {
            ArchiveKeep::All => true,
            ArchiveKeep::Ng | ArchiveKeep::Rejected => ng,
            ArchiveKeep::None => false,
        }
    }
    /// Hand a capture over without waiting; a full queue drops it (counted).
    pub fn offer(&self, c: Capture) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Msg::Capture(Box::new(c)))
        {
            dropped(&self.health);
        }
    }
}

fn dropped(h: &Health) {
    let n = h.archive_dropped.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        log::warn!("archive: cannot keep up, {n} entries dropped so far");
    }
}

/// The arbiter's side: every resolved result, in tag order.
pub struct ArchiveSink {
    keep: ArchiveKeep,
    tx: SyncSender<Msg>,
    health: Arc<Health>,
}

/// Whether `keep` keeps this result. A trigger while the line was not Running (offline,
/// Faulted, draining) was never inspected: nothing to look at, never kept (a Faulted line with
/// a running photo-eye would otherwise fill the disk with empty records).
pub fn keeps(keep: ArchiveKeep, r: &ResultRecord) -> bool {
    if r.cause == Some(crate::status::ErrCause::NotRunning) {
        return false;
    }
    match keep {
        ArchiveKeep::All => true,
        ArchiveKeep::Ng => r.outcome == Outcome::Ng,
        ArchiveKeep::Rejected => r.outcome != Outcome::Ok,
        ArchiveKeep::None => false,
    }
}

impl Drop for ArchiveSink {
    /// The line stops (SIGTERM, drain done): let the writer finish the entries queued, for at
    /// most a second, so that a stop does not leave parts of the last seconds unwritten.
    fn drop(&mut self) {
        let (tx, rx) = sync_channel(1);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut msg = Msg::Stop(tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if std::time::Instant::now() < until => {
                    msg = m;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = rx.recv_timeout(until.saturating_duration_since(std::time::Instant::now()));
    }
}

impl Sink for ArchiveSink {
    fn emit(&mut self, r: &ResultRecord) {
        // Every result goes through (it also releases a capture the rule does not keep).
        if self.tx.try_send(Msg::Result(*r)).is_err() && keeps(self.keep, r) {
            dropped(&self.health);
        }
    }
}

/// Open the archive folder (created when missing), clean up what a crash left, and start the
/// writer thread; `products` (id, name) name the products in records. `None` for
/// `keep = "none"`, and when the folder cannot be opened (a disk not mounted): the line runs
/// without its archive, said in the journal, rather than not at all.
pub fn start(
    section: &ArchiveSection,
    health: Arc<Health>,
    products: Vec<(u16, String)>,
) -> Option<(ArchiveTap, ArchiveSink)> {
    if section.keep == ArchiveKeep::None {
        return None;
    }
    let mut store = match Store::open(&section.dir, section.max_mb.saturating_mul(1 << 20)) {
        Ok(s) => s,
        Err(e) => {
            log::error!(
                "archive.dir {}: {e}; the line runs without its archive",
                section.dir.display()
            );
            return None;
        }
    };
    store.products = products;
    log::info!(
        "archive {}: keep {:?}, {} entries, {:.1} of {} MiB",
        section.dir.display(),
        section.keep,
        store.entries.len(),
        store.total as f64 / (1u64 << 20) as f64,
        section.max_mb
    );
    let (tx, rx) = sync_channel(QUEUE);
    let keep = section.keep;
    let writer_health = health.clone();
    std::thread::Builder::new()
        .name("edge-ad-archive".into())
        .spawn(move || writer(keep, rx, &mut store, &writer_health))
        .ok()?;
    Some((
        ArchiveTap {
            keep,
            tx: tx.clone(),
            health: health.clone(),
        },
        ArchiveSink { keep, tx, health },
    ))
}

/// `a` comes at or before `b` in tag order (tags wrap; the parts in flight are few).
fn not_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

fn writer(keep: ArchiveKeep, rx: Receiver<Msg>, store: &mut Store, health: &Health) {
    let mut pending: VecDeque<Box<Capture>> = VecDeque::new();
    // Results arrive in tag order: a capture at or before the last result's tag will never be
    // matched (its part was resolved first, e.g. at its deadline) and is dropped at once.
    let mut last_result: Option<u32> = None;
    while let Ok(m) = rx.recv() {
        match m {
            Msg::Capture(c) => {
                if last_result.is_some_and(|t| not_after(c.tag, t)) {
                    continue;
                }
                if pending.len() >= PENDING {
                    pending.pop_front();
                }
                pending.push_back(c);
            }
            Msg::Result(r) => {
                last_result = Some(r.tag);
                let capture = pending
                    .iter()
                    .position(|c| c.tag == r.tag)
                    .and_then(|i| pending.remove(i));
                pending.retain(|c| !not_after(c.tag, r.tag));
                if keeps(keep, &r) {
                    if let Err(e) = store.add(&r, capture.as_deref()) {
                        log::error!("archive {}: tag {}: {e}", store.dir.display(), r.tag);
                        dropped(health);
                    }
                }
            }
            Msg::Stop(done) => {
                let _ = done.send(());
                return;
            }
        }
    }
}

/// The archive folder: its entries oldest first with their sizes, and the budget.
struct Store {
    dir: PathBuf,
    budget: u64,
    entries: VecDeque<(String, u64)>,
    names: std::collections::HashSet<String>,
    total: u64,
    /// Product names by id, for records.
    products: Vec<(u16, String)>,
}

/// The disk an entry folder takes: the blocks allocated to it and to its files (a record of
/// 400 bytes still takes a block; counting lengths would let many small entries pass the
/// budget several times over).
fn dir_size(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let blocks = |m: &std::fs::Metadata| (m.blocks() * 512).max(m.len());
    let own = std::fs::metadata(p).map(|m| blocks(&m)).unwrap_or(0);
    own + std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| blocks(&m))
                .sum()
        })
        .unwrap_or(0)
}

fn sync_dir(p: &Path) -> Result<(), String> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// An entry folder's name: `<unix ms, 13 digits>-<tag, 10 digits>`, so name order is time order.
fn is_entry_name(n: &str) -> bool {
    let b = n.as_bytes();
    b.len() == 24
        && b[13] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 13 || c.is_ascii_digit())
}

impl Store {
    fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut entries = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            } else if is_entry_name(&name) && e.path().is_dir() {
                entries.push((name, dir_size(&e.path())));
            }
        }
        entries.sort();
        let total = entries.iter().map(|e| e.1).sum();
        let names = entries.iter().map(|e| e.0.clone()).collect();
        let mut s = Self {
            dir: dir.to_path_buf(),
            budget,
            entries: entries.into(),
            names,
            total,
            products: Vec::new(),
        };
        s.trim();
        Ok(s)
    }

    /// Remove the oldest entries until the folder is within its budget.
    fn trim(&mut self) {
        while self.total > self.budget {
            if !self.remove_oldest() {
                break;
            }
        }
    }

    fn remove_oldest(&mut self) -> bool {
        let Some((name, size)) = self.entries.pop_front() else {
            return false;
        };
        if let Err(e) = std::fs::remove_dir_all(self.dir.join(&name)) {
            log::warn!("archive: cannot remove {name}: {e}");
        }
        self.names.remove(&name);
        self.total = self.total.saturating_sub(size);
        true
    }

    /// [`Store::write`], and when the disk is full, once more after removing the oldest
    /// entries that make room for one more of this size.
    fn add(&mut self, r: &ResultRecord, c: Option<&Capture>) -> Result<(), String> {
        match self.write(r, c) {
            Err(e) if e.contains("No space left") => {
                let need = self.entries.back().map_or(1 << 20, |e| 2 * e.1);
                let mut freed = 0;
                while freed < need {
                    let before = self.total;
                    if !self.remove_oldest() {
                        break;
                    }
                    freed += before - self.total;
                }
                self.write(r, c)
            }
            other => other,
        }
    }

    /// Write one entry atomically, then trim to the budget.
    fn write(&mut self, r: &ResultRecord, c: Option<&Capture>) -> Result<(), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let unix_ms = now.as_millis() as u64;
        // Two entries in one millisecond with one tag (a wrapped counter): keep both.
        let mut ms = unix_ms;
        let mut name = format!("{ms:013}-{:010}", r.tag);
        while self.names.contains(&name) {
            ms += 1;
            name = format!("{ms:013}-{:010}", r.tag);
        }
        let product = match (r.product, c) {
            (0, Some(c)) => c.product,
            (p, _) => p,
        };
        let product_name = self
            .products
            .iter()
            .find(|p| p.0 == product)
            .map(|p| p.1.clone());
        let tmp = self.dir.join(format!(".tmp-{name}"));
        let fin = self.dir.join(&name);
        let io = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp.display().to_string(), &e))?;
        let result = (|| {
            if let Some(c) = c {
                save_jpeg(&c.frame, &tmp.join("frame.jpg"))?;
                let label = format!("{:.3} {}", c.inspection.score, r.outcome.word());
                let heat = heatmap::render(&c.frame, &c.inspection, c.scale, &label);
                save_jpeg(&heat, &tmp.join("heatmap.jpg"))?;
            }
            let t = c.map(|c| &c.inspection.timings);
            let record = serde_json::json!({
                "tag": r.tag,
                "product": { "id": product, "name": product_name },
                "time": rfc3339_utc(now.as_secs(), now.subsec_millis()),
                "unix_ms": unix_ms,
                "verdict": r.outcome,
                "score": if r.score.is_finite() { Some(r.score) } else { None },
                "threshold": c.map(|c| c.threshold),
                "cause": r.cause,
                "ms": r.ms,
                "timings": t,
                "frame": c.map(|_| "frame.jpg"),
                "heatmap": c.map(|_| "heatmap.jpg"),
            });
            let text = serde_json::to_string_pretty(&record).map_err(|e| io("record", &e))?;
            write_synced(&tmp.join("record.json"), text.as_bytes())?;
            sync_dir(&tmp)
        })();
        if let Err(e) = result.and_then(|()| {
            std::fs::rename(&tmp, &fin).map_err(|e| io(&fin.display().to_string(), &e))?;
            sync_dir(&self.dir)
        }) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let size = dir_size(&fin);
        self.total += size;
        self.names.insert(name.clone());
        self.entries.push_back((name, size));
        self.trim();
        Ok(())
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn save_jpeg(img: &Rgb8, path: &Path) -> Result<(), String> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
        .encode(
            &img.data,
            img.width as u32,
            img.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    write_synced(path, &buf)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for seconds since the epoch (civil-from-days, proleptic
/// Gregorian), so records read the same on every box without a time-zone database.
pub fn rfc3339_utc(secs: u64, ms: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// One archive entry as `edge-ad archive` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// The entry's folder.
    pub path: PathBuf,
    /// Its record (`record.json`).
    pub record: serde_json::Value,
}

impl Entry {
    /// The record's verdict word (OK, NG, ERR).
    pub fn verdict(&self) -> &str {
        self.record["verdict"].as_str().unwrap_or("?")
    }
    /// The record's product id and name.
    pub fn product(&self) -> (u64, &str) {
        (
            self.record["product"]["id"].as_u64().unwrap_or(0),
            self.record["product"]["name"].as_str().unwrap_or(""),
        )
    }
}

/// A record that could not be read: its file and why.
pub type Unreadable = (PathBuf, String);

/// The entries of an archive folder, newest first. A record that cannot be read is reported in
/// the second list (its folder and why) rather than ending the listing.
pub fn list(dir: &Path) -> std::io::Result<(Vec<Entry>, Vec<Unreadable>)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_entry_name(n))
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for n in names {
        let path = dir.join(&n);
        let rec = path.join("record.json");
        match std::fs::read(&rec)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(record) => entries.push(Entry { path, record }),
            Err(e) => bad.push((rec, e)),
        }
    }
    Ok((entries, bad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ErrCause;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339_utc(1_796_342_399, 999), "2026-12-03T23:59:59.999Z");
    }

    fn rec(tag: u32, outcome: Outcome) -> ResultRecord {
        ResultRecord {
            tag,
            outcome,
            score: if outcome == Outcome::Err {
                f32::NAN
            } else {
                0.5
            },
            ms: 10,
            cause: (outcome == Outcome::Err).then_some(ErrCause::Deadline),
            product: 2,
        }
    }

    #[test]
    fn keep_rules() {
        let table = [
            (ArchiveKeep::Ng, [false, true, false, false]),
            (ArchiveKeep::Rejected, [false, true, true, false]),
            (ArchiveKeep::All, [true, true, true, false]),
            (ArchiveKeep::None, [false, false, false, false]),
        ];
        let not_running = ResultRecord {
            cause: Some(ErrCause::NotRunning),
            ..rec(1, Outcome::Err)
        };
        for (k, want) in table {
            let got = [
                rec(1, Outcome::Ok),
                rec(1, Outcome::Ng),
                rec(1, Outcome::Err),
                not_running,
            ]
            .map(|r| keeps(k, &r));
            assert_eq!(got, want, "{k:?}");
        }
    }

    /// Entries without a frame (ERR parts) are written whole; the oldest go when the budget is
    /// passed, also across a reopen; a half-written entry left by a crash is removed.
    #[test]
    fn store_keeps_within_its_budget_across_restarts() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("a");
        let mut s = Store::open(&dir, 1 << 20).unwrap();
        s.products = vec![(2, "tile".into())];
        for tag in 1..=5 {
            s.add(&rec(tag, Outcome::Err), None).unwrap();
        }
        let (entries, bad) = list(&dir).unwrap();
        assert!(bad.is_empty());
        let tags: Vec<u64> = entries
            .iter()
            .map(|e| e.record["tag"].as_u64().unwrap())
            .collect();
        assert_eq!(tags, vec![5, 4, 3, 2, 1]);
        assert_eq!(entries[0].verdict(), "ERR");
        assert_eq!(entries[0].product(), (2, "tile"));
        assert_eq!(entries[0].record["cause"], "deadline");
        // A record-only entry takes at least its folder's and its file's blocks, not 400 bytes.
        let one = s.entries[0].1;
        assert!(one >= 4096, "{one}");
        // A budget of three entries: reopening trims to it, oldest first.
        std::fs::create_dir_all(dir.join(".tmp-0000000000001-0000000009")).unwrap();
        let s2 = Store::open(&dir, 3 * one + one / 2).unwrap();
        assert_eq!(s2.entries.len(), 3);
        assert!(!dir.join(".tmp-0000000000001-0000000009").exists());
        let (entries, _) = list(&dir).unwrap();
        let tags: Vec<u64> = entries
            .iter()
            .map(|e| e.record["tag"].as_u64().unwrap())
            .collect();
        assert_eq!(tags, vec![5, 4, 3]);
        assert!(s2.total <= 3 * one + one / 2);
    }
}
