//! The bank reader against hostile input. Targeted refusals (each of these inputs panicked, aborted
//! or was accepted before the reader validated its fields) and a bounded, deterministic mutation
//! fuzz over valid banks that checks that no input panics and that no input makes the reader
//! allocate more than the input justifies.
//!
//! Allocation bound: every allocation the reader makes copies or decodes bytes it was given (level
//! data 1:1, JSON strings and number arrays at most ~2× their text after `Vec` doubling), so the
//! largest single request must stay within `4 × input length`, with a 4 KiB floor for small inputs
//! (error messages, serde_json's scratch). The valid banks here peak at 0.85× their size. A request
//! sized from a field (`rows`, `grid`) instead of from the bytes present — the bug class — exceeds
//! it for any implausible value (a 20 TB request would abort the test binary, failing it too).

use edge_ad_calibration::aligned::{AlignmentIndex, CellFeatures};
use edge_ad_calibration::bankfile::{AlignedPool, MAGIC, VERSION};
use edge_ad_calibration::{
    BankFile, BankFileError, BankHeader, Identity, LevelData, LevelInfo, Threshold, ThresholdRule,
};
use half::f16;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

/// Records the largest single allocation request of the current thread while tracking is on
/// (tests run on parallel threads; each measures only its own parses).
struct LargestRequest;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: const thread-locals without destructors never allocate, even during teardown.
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for LargestRequest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: LargestRequest = LargestRequest;

/// The documented bound on one allocation while parsing `len` bytes.
fn alloc_bound(len: usize) -> usize {
    (4 * len).max(4 << 10)
}

/// Parse under `catch_unwind`, returning the outcome (Err: it panicked) and the largest request.
fn parse(bytes: &[u8]) -> (std::thread::Result<Result<BankFile, BankFileError>>, usize) {
    LARGEST.with(|m| m.set(0));
    TRACK.with(|t| t.set(true));
    let r = std::panic::catch_unwind(|| BankFile::from_bytes(bytes, Path::new("bank.eab")));
    TRACK.with(|t| t.set(false));
    (r, LARGEST.with(|m| m.get()))
}

fn refusal(bytes: &[u8]) -> String {
    let (r, _) = parse(bytes);
    match r.expect("the reader panicked") {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------- banks

fn identity() -> Identity {
    Identity {
        onnx_sha256: "0a".repeat(32),
        model_sha256: "0b".repeat(32),
        projector_sha256: None,
    }
}

fn threshold() -> Threshold {
    Threshold::between(
        &[0.4, 0.5, 0.55],
        &[0.9, 1.2],
        ThresholdRule::MaxTimesMargin { margin: 1.05 },
    )
    .unwrap()
}

fn header(levels: Vec<LevelInfo>, aligned: Option<AlignedPool>) -> BankHeader {
    BankHeader {
        identity: identity(),
        model_name: "fuzz".into(),
        fit: "crop".into(),
        windows: 4,
        references: vec!["a.png".into(), "b.png".into()],
        selection: "first of 2".into(),
        level_choice: "given".into(),
        levels,
        threshold: threshold(),
        aligned,
        written_by: "bank_fuzz".into(),
    }
}

fn level(level: usize, rows: usize, channels: usize, dtype: &str) -> LevelInfo {
    LevelInfo {
        level,
        rows,
        channels,
        dtype: dtype.into(),
    }
}

/// Two levels: model level 1 in f16 (6 × 5, 60 bytes), model level 3 in f32 (4 × 3, 48 bytes).
fn plain_bank() -> BankFile {
    BankFile {
        header: header(vec![level(1, 6, 5, "f16"), level(3, 4, 3, "f32")], None),
        levels: vec![
            LevelData::F16((0..30).map(|i| f16::from_f32(i as f32 * 0.125)).collect()),
            LevelData::F32((0..12).map(|i| (i as f32 * 0.7).sin()).collect()),
        ],
    }
}

/// An aligned bank: a pool of 3 images of 1, 2 and 1 windows × 2 positions (8 rows), 4 channels,
/// grid 2, 2 clusters; levels 1 and 2 in f16 (64 bytes each).
fn aligned_bank() -> BankFile {
    let image = |seed: usize| CellFeatures {
        cells: (0..4)
            .map(|c| {
                (0..2)
                    .map(|j| {
                        let v: Vec<f32> = (0..4)
                            .map(|k| ((seed * 7 + c * 3 + j * 5 + k) as f32 * 0.37).cos())
                            .collect();
                        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                        v.iter().map(|x| x / n).collect()
                    })
                    .collect()
            })
            .collect(),
    };
    let pool: Vec<CellFeatures> = (0..3).map(image).collect();
    let index = AlignmentIndex::build(&pool, 2, 2, 4, 7);
    let data = |s: f32| LevelData::F16((0..32).map(|i| f16::from_f32(i as f32 * s)).collect());
    BankFile {
        header: header(
            vec![level(1, 8, 4, "f16"), level(2, 8, 4, "f16")],
            Some(AlignedPool {
                k: 2,
                level: 1,
                images: vec!["p0.png".into(), "p1.png".into(), "p2.png".into()],
                windows: vec![1, 2, 1],
                index,
            }),
        ),
        levels: vec![data(0.01), data(-0.02)],
    }
}

// ---------------------------------------------------------------- byte surgery

const PREFIX: usize = 20;

/// Header JSON and payload of a well-formed bank.
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let hlen = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[PREFIX..PREFIX + hlen]).unwrap();
    (header, bytes[PREFIX + hlen..bytes.len() - 32].to_vec())
}

/// A bank file from header JSON bytes and payload, with a correct length field and checksum.
fn assemble(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Recompute the trailing checksum over whatever precedes it, as a hand editor would.
fn fix_checksum(bytes: &mut [u8]) {
    if bytes.len() >= 32 {
        let n = bytes.len() - 32;
        let sum = Sha256::digest(&bytes[..n]);
        bytes[n..].copy_from_slice(&sum);
    }
}

/// `bank` with its header edited by `f` (length field and checksum recomputed).
fn edit(bank: &BankFile, f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (mut h, payload) = split(&bank.to_bytes().unwrap());
    f(&mut h);
    assemble(&serde_json::to_vec(&h).unwrap(), &payload)
}

/// `bank` with its payload edited by `f` (checksum recomputed).
fn edit_payload(bank: &BankFile, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (h, mut payload) = split(&bank.to_bytes().unwrap());
    f(&mut payload);
    assemble(&serde_json::to_vec(&h).unwrap(), &payload)
}

// ---------------------------------------------------------------- targeted

#[test]
fn valid_banks_load_and_the_format_is_unchanged() {
    for bank in [plain_bank(), aligned_bank()] {
        let bytes = bank.to_bytes().unwrap();
        // The layout of the module docs, built by hand: magic, version, length, JSON, LE data, sum.
        let mut payload = Vec::new();
        for l in &bank.levels {
            match l {
                LevelData::F16(v) => v.iter().for_each(|x| payload.extend(x.to_le_bytes())),
                LevelData::F32(v) => v.iter().for_each(|x| payload.extend(x.to_le_bytes())),
            }
        }
        assert_eq!(
            bytes,
            assemble(&serde_json::to_vec(&bank.header).unwrap(), &payload)
        );
        let (r, largest) = parse(&bytes);
        assert_eq!(r.unwrap().unwrap(), bank);
        assert!(largest <= alloc_bound(bytes.len()), "{largest}");
    }
    assert_eq!(split(&plain_bank().to_bytes().unwrap()).1.len(), 60 + 48);
    assert_eq!(split(&aligned_bank().to_bytes().unwrap()).1.len(), 64 + 64);
}

#[test]
fn a_huge_row_count_with_a_valid_checksum_names_the_field() {
    let bank = plain_bank();
    let e = refusal(&edit(&bank, |h| {
        h["levels"][1]["rows"] = 4294967295u32.into()
    }));
    assert_eq!(
        e,
        "bank.eab: level 2 rows = 4294967295 × channels = 3 (f32) needs 51.5 GB but the file \
         has 48 B left"
    );
    // Products that overflow 64 bits (these panicked, or wrapped past the size check).
    let e = refusal(&edit(&bank, |h| h["levels"][0]["rows"] = u64::MAX.into()));
    assert_eq!(
        e,
        format!(
            "bank.eab: level 1 rows = {} × channels = 5 × 2 bytes (f16) overflows 64 bits",
            u64::MAX
        )
    );
    let e = refusal(&edit(&bank, |h| {
        h["levels"][1]["rows"] = (1u64 << 62).into();
        h["levels"][1]["channels"] = 4.into();
    }));
    assert!(
        e.contains("level 2 rows = 4611686018427387904 × channels = 4"),
        "{e}"
    );
    assert!(e.ends_with("overflows 64 bits"), "{e}");
    let e = refusal(&edit(&bank, |h| h["levels"][0]["channels"] = 0.into()));
    assert!(e.contains("level 1 rows = 6 × channels = 0"), "{e}");
    // One byte more than the levels need, checksum valid.
    let e = refusal(&edit_payload(&bank, |p| p.push(0)));
    assert_eq!(
        e,
        "bank.eab: the levels' data is 108 bytes but the file holds 109 between header and checksum"
    );
}

#[test]
fn a_cut_file_is_still_reported_as_truncated() {
    let bytes = plain_bank().to_bytes().unwrap();
    let cut = &bytes[..bytes.len() - 50];
    let (r, _) = parse(cut);
    match r.unwrap() {
        Err(BankFileError::Truncated {
            expected, found, ..
        }) => {
            assert_eq!((expected, found), (bytes.len() as u64, cut.len() as u64))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn aligned_grid_zero_and_1000_are_refused() {
    let bank = aligned_bank();
    for grid in [0u64, 65, 1000] {
        let e = refusal(&edit(&bank, |h| {
            h["aligned"]["index"]["grid"] = grid.into()
        }));
        assert_eq!(
            e,
            format!("bank.eab: aligned.index.grid = {grid} is outside 1..=64")
        );
    }
    // A grid within bounds but not matching the stored centres and histograms.
    let e = refusal(&edit(&bank, |h| h["aligned"]["index"]["grid"] = 3.into()));
    assert_eq!(
        e,
        "bank.eab: aligned.index.centres has 32 values; grid 3² × clusters 2 × channels 4 needs 72"
    );
}

#[test]
fn aligned_empty_centres_are_refused() {
    let e = refusal(&edit(&aligned_bank(), |h| {
        h["aligned"]["index"]["centres"] = Value::Array(vec![])
    }));
    assert_eq!(
        e,
        "bank.eab: aligned.index.centres has 0 values; grid 2² × clusters 2 × channels 4 needs 32"
    );
}

#[test]
fn every_aligned_field_is_checked() {
    let bank = aligned_bank();
    type Edit = fn(&mut Value);
    let cases: [(Edit, &str); 13] = [
        (
            |h| h["aligned"]["k"] = 0.into(),
            "aligned.k = 0 must be 1..=3",
        ),
        (
            |h| h["aligned"]["k"] = 4.into(),
            "aligned.k = 4 must be 1..=3",
        ),
        (|h| h["aligned"]["level"] = 0.into(), "aligned.level = 0"),
        (
            |h| h["aligned"]["windows"] = serde_json::json!([1, 2]),
            "aligned: 3 images, 2 window counts (aligned.windows) and 3 histograms",
        ),
        (
            |h| h["aligned"]["windows"] = serde_json::json!([1, 0, 3]),
            "aligned.windows[1] = 0",
        ),
        (
            |h| h["aligned"]["windows"] = serde_json::json!([1, 2, 2]),
            "level 1 rows = 8 is not a multiple of the pool's 5 windows",
        ),
        (
            |h| h["aligned"]["index"]["clusters"] = 0.into(),
            "aligned.index.clusters = 0 and aligned.index.channels = 4 must both be at least 1",
        ),
        (
            |h| h["aligned"]["index"]["clusters"] = 1.into(),
            "aligned.index.centres has 32 values; grid 2² × clusters 1 × channels 4 needs 16",
        ),
        (
            |h| h["aligned"]["index"]["channels"] = 8.into(),
            "aligned.index.channels = 8 but level 1 has 4 channels",
        ),
        (
            |h| {
                h["aligned"]["index"]["histograms"][2]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            },
            "aligned.index.histograms[2] has 31 values; 4 cells × 8 bins needs 32",
        ),
        (
            |h| h["aligned"]["index"]["temperature"] = 0.into(),
            "aligned.index.temperature = 0 must be finite and positive",
        ),
        (
            // 1e39 is out of f32 range: it parses as infinity.
            |h| h["aligned"]["index"]["temperature"] = 1e39.into(),
            "aligned.index.temperature = inf must be finite and positive",
        ),
        (
            |h| h["aligned"]["index"]["histograms"][1][5] = (-0.25).into(),
            "aligned.index.histograms[1][5] = -0.25 is non-finite or negative",
        ),
    ];
    for (f, want) in cases {
        let e = refusal(&edit(&bank, f));
        assert!(
            e.starts_with("bank.eab: ") && e.contains(want),
            "{want}\n{e}"
        );
    }
    let e = refusal(&edit(&bank, |h| {
        h["aligned"]["index"]["centres"][7] = 1e39.into()
    }));
    assert_eq!(e, "bank.eab: aligned.index.centres[7] = inf is non-finite");
}

#[test]
fn nan_and_infinite_features_are_refused() {
    let bank = plain_bank();
    // Level 2 (f32, 3 channels) starts at byte 60; element 5 is row 1, channel 2.
    let e = refusal(&edit_payload(&bank, |p| {
        p[60 + 4 * 5..60 + 4 * 6].copy_from_slice(&f32::NAN.to_le_bytes())
    }));
    assert_eq!(
        e,
        "bank.eab: level 2 row 1 channel 2: non-finite feature value NaN"
    );
    let e = refusal(&edit_payload(&bank, |p| {
        p[60..64].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes())
    }));
    assert_eq!(
        e,
        "bank.eab: level 2 row 0 channel 0: non-finite feature value -inf"
    );
    // Level 1 (f16, 5 channels): element 8 is row 1, channel 3.
    let e = refusal(&edit_payload(&bank, |p| {
        p[16..18].copy_from_slice(&f16::INFINITY.to_le_bytes())
    }));
    assert_eq!(
        e,
        "bank.eab: level 1 row 1 channel 3: non-finite feature value inf"
    );
    let e = refusal(&edit_payload(&aligned_bank(), |p| {
        p[126..128].copy_from_slice(&f16::NAN.to_le_bytes())
    }));
    assert_eq!(
        e,
        "bank.eab: level 2 row 7 channel 3: non-finite feature value NaN"
    );
}

// ---------------------------------------------------------------- fuzz

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-enough in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

const U32S: [u32; 11] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    1000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    u32::MAX,
];
const U64S: [u64; 8] = [
    0,
    1,
    1000,
    u32::MAX as u64,
    1 << 32,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

/// JSON pointers of every number (`numbers`) and every array or object (`containers`).
fn walk(v: &Value, at: String, numbers: &mut Vec<String>, containers: &mut Vec<String>) {
    match v {
        Value::Number(_) => numbers.push(at),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk(x, format!("{at}/{i}"), numbers, containers);
            }
            containers.push(at);
        }
        Value::Object(o) => {
            for (k, x) in o {
                walk(x, format!("{at}/{k}"), numbers, containers);
            }
            containers.push(at);
        }
        _ => {}
    }
}

/// A boundary value for a JSON number field.
fn json_boundary(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => 0.into(),
        1 => 1.into(),
        2 => 1000.into(),
        3 => u32::MAX.into(),
        4 => u64::MAX.into(),
        5 => (-1).into(),
        6 => i64::MIN.into(),
        7 => 0.5.into(),
        8 => 1e39.into(),
        9 => 1e308.into(),
        10 => (-1e308).into(),
        11 => 5e-324.into(),
        12 => (1u64 << 62).into(),
        _ => rng.next().into(),
    }
}

/// Edit the header as JSON (a number set to a boundary value, or a container emptied, grown,
/// shrunk or replaced) and reassemble with a correct length field and checksum, so the change
/// reaches the field validation instead of stopping at the JSON parser or the checksum.
fn mutate_json(bytes: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let hlen = u64::from_le_bytes(bytes.get(12..20)?.try_into().ok()?) as usize;
    let end = PREFIX.checked_add(hlen)?;
    let mut h: Value = serde_json::from_slice(bytes.get(PREFIX..end)?).ok()?;
    let payload = bytes.get(end..bytes.len().checked_sub(32)?)?.to_vec();
    let (mut numbers, mut containers) = (Vec::new(), Vec::new());
    walk(&h, String::new(), &mut numbers, &mut containers);
    // Half the time a scalar field (not one of the many histogram and centre values).
    let scalars: Vec<&String> = numbers
        .iter()
        .filter(|p| !p.contains("/histograms/") && !p.contains("/centres/"))
        .collect();
    if rng.below(3) > 0 && !numbers.is_empty() {
        let p = if rng.below(2) == 0 && !scalars.is_empty() {
            scalars[rng.below(scalars.len())].clone()
        } else {
            numbers[rng.below(numbers.len())].clone()
        };
        *h.pointer_mut(&p)? = json_boundary(rng);
    } else if !containers.is_empty() {
        let p = containers[rng.below(containers.len())].clone();
        let choice = rng.below(5);
        let target = h.pointer_mut(&p)?;
        match (target, choice) {
            (Value::Array(a), 0) => a.clear(),
            (Value::Array(a), 1) => a.truncate(a.len().saturating_sub(1)),
            (Value::Array(a), 2) => {
                if let Some(x) = a.first().cloned() {
                    a.push(x);
                }
            }
            (Value::Object(o), 0 | 1) => {
                let keys: Vec<String> = o.keys().cloned().collect();
                if !keys.is_empty() {
                    o.remove(&keys[rng.below(keys.len())]);
                }
            }
            (Value::Object(o), 2) => {
                let keys: Vec<String> = o.keys().cloned().collect();
                if !keys.is_empty() {
                    o.insert(keys[rng.below(keys.len())].clone(), Value::Null);
                }
            }
            (t, 3) => *t = Value::Array(vec![]),
            (t, _) => *t = 1000.into(),
        }
    }
    Some(assemble(&serde_json::to_vec(&h).ok()?, &payload))
}

/// One byte-level mutation of `m` (`donor`: bytes to splice from).
fn mutate_bytes(m: &mut Vec<u8>, donor: &[u8], rng: &mut Rng) {
    let len = m.len().max(1);
    match rng.below(10) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(len);
                if let Some(b) = m.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(len);
                let v = match rng.below(3) {
                    0 => 0x00,
                    1 => 0xff,
                    _ => rng.next() as u8,
                };
                if let Some(b) = m.get_mut(at) {
                    *b = v;
                }
            }
        }
        2 | 3 => {
            // A u32 or u64 at a random offset, or over the version / header-length fields.
            let at = if rng.below(3) == 0 {
                rng.pick(&[8usize, 12])
            } else {
                rng.below(len)
            };
            let v: Vec<u8> = if rng.below(2) == 0 {
                rng.pick(&U32S).to_le_bytes().to_vec()
            } else {
                rng.pick(&U64S).to_le_bytes().to_vec()
            };
            for (i, b) in v.into_iter().enumerate() {
                if let Some(x) = m.get_mut(at + i) {
                    *x = b;
                }
            }
        }
        4 => m.truncate(rng.below(len)),
        5 => {
            let n = 1 + rng.below(64);
            let zeros = rng.below(2) == 0;
            m.extend((0..n).map(|_| if zeros { 0 } else { rng.next() as u8 }));
        }
        6 | 7 => {
            // Splice a slice of the donor in, inserted or overwriting.
            let a = rng.below(donor.len());
            let b = a + rng.below(donor.len() - a + 1);
            let at = rng.below(m.len() + 1);
            if rng.below(2) == 0 {
                m.splice(at..at, donor[a..b].iter().copied());
            } else {
                let end = (at + b - a).min(m.len());
                m.splice(at..end, donor[a..b].iter().copied());
            }
        }
        8 => {
            let a = rng.below(len);
            let b = (a + 1 + rng.below(64)).min(m.len());
            if a < b {
                m.drain(a..b);
            }
        }
        _ => {
            // NaN, infinity or a huge value written into the data (f16 or f32 patterns).
            let pat: &[u8] = rng.pick(&[
                &[0x00, 0x7e][..],
                &[0x00, 0x7c],
                &[0x00, 0xfc],
                &[0x00, 0x00, 0xc0, 0x7f],
                &[0x00, 0x00, 0x80, 0x7f],
                &[0x00, 0x00, 0x80, 0xff],
            ]);
            let at = rng.below(len);
            for (i, &b) in pat.iter().enumerate() {
                if let Some(x) = m.get_mut(at + i) {
                    *x = b;
                }
            }
        }
    }
}

#[derive(Default, Debug)]
struct Tally {
    parses: usize,
    accepted: usize,
    truncated: usize,
    checksum: usize,
    json: usize,
    /// Refused by the field validation (the checksum held and the JSON parsed).
    deep: usize,
    aligned: usize,
    non_finite: usize,
    sizes: usize,
    /// Largest single allocation seen, and its ratio to the input for inputs of 1 KiB or more.
    largest: usize,
    largest_ratio: f64,
}

/// Parse `bytes`; fail on a panic or an oversized allocation; check what an accepted bank holds.
fn check(bytes: &[u8], what: &dyn Fn() -> String, t: &mut Tally) {
    let (r, largest) = parse(bytes);
    t.parses += 1;
    let Ok(r) = r else {
        panic!("the reader panicked on {}", what());
    };
    assert!(
        largest <= alloc_bound(bytes.len()),
        "{}: one allocation of {largest} bytes for {} bytes of input",
        what(),
        bytes.len()
    );
    t.largest = t.largest.max(largest);
    if bytes.len() >= 1024 {
        t.largest_ratio = t.largest_ratio.max(largest as f64 / bytes.len() as f64);
    }
    match r {
        Ok(bank) => {
            t.accepted += 1;
            for l in &bank.levels {
                let finite = match l {
                    LevelData::F16(v) => v.iter().all(|x| x.is_finite()),
                    LevelData::F32(v) => v.iter().all(|x| x.is_finite()),
                };
                assert!(finite, "{}: accepted a non-finite feature", what());
            }
            assert!(bank.header.threshold.value.is_finite(), "{}", what());
            // What the reader accepts, the writer writes, and it reads back.
            let again = bank
                .to_bytes()
                .unwrap_or_else(|e| panic!("{}: accepted but not writable: {e}", what()));
            BankFile::from_bytes(&again, Path::new("again.eab"))
                .unwrap_or_else(|e| panic!("{}: rewritten bank refused: {e}", what()));
        }
        Err(BankFileError::Truncated { .. }) => t.truncated += 1,
        Err(BankFileError::Checksum { .. }) => t.checksum += 1,
        Err(e) => {
            let m = e.to_string();
            assert!(m.starts_with("bank.eab: "), "{m}");
            if m.contains(": header: ") && !m.contains("levels [") {
                t.json += 1;
            } else {
                t.deep += 1;
                t.aligned += m.contains("aligned") as usize;
                t.non_finite += m.contains("non-finite") as usize;
                t.sizes += (m.contains(" left") || m.contains("overflows")) as usize;
            }
        }
    }
}

/// Cut every bank at every length, as is and with the checksum recomputed over what is left.
#[test]
fn truncation_at_every_length_never_panics() {
    let start = std::time::Instant::now();
    let mut t = Tally::default();
    for bank in [plain_bank(), aligned_bank()] {
        let bytes = bank.to_bytes().unwrap();
        for cut in 0..bytes.len() {
            let mut m = bytes[..cut].to_vec();
            check(&m, &|| format!("cut at {cut}"), &mut t);
            fix_checksum(&mut m);
            check(&m, &|| format!("cut at {cut}, checksum fixed"), &mut t);
        }
    }
    println!("{t:?} in {:.2?}", start.elapsed());
    assert_eq!(t.accepted, 0);
    // Cutting inside the level data with the checksum fixed reaches the size checks.
    assert!(t.sizes >= 200, "{t:?}");
}

/// Thousands of deterministic random mutations of both banks, each parsed as mutated and with
/// its checksum recomputed.
#[test]
fn mutated_banks_never_panic_or_over_allocate() {
    const CASES_PER_SEED: usize = 6000;
    let start = std::time::Instant::now();
    let banks = [
        plain_bank().to_bytes().unwrap(),
        aligned_bank().to_bytes().unwrap(),
    ];
    let mut t = Tally::default();
    for seed in [0x9e37_79b9_7f4a_7c15u64, 0xd1b5_4a32_d192_ed03, 42] {
        let mut rng = Rng(seed);
        for case in 0..CASES_PER_SEED {
            let which = case % 2;
            let mut m = banks[which].clone();
            let json_edits = rng.below(2);
            for _ in 0..json_edits {
                if let Some(j) = mutate_json(&m, &mut rng) {
                    m = j;
                }
            }
            let byte_edits = if json_edits == 0 {
                1 + rng.below(3)
            } else {
                rng.below(2)
            };
            for _ in 0..byte_edits {
                mutate_bytes(&mut m, &banks[rng.below(2)], &mut rng);
            }
            let what = || format!("seed {seed:#x} case {case}");
            check(&m, &what, &mut t);
            fix_checksum(&mut m);
            let what = || format!("seed {seed:#x} case {case}, checksum fixed");
            check(&m, &what, &mut t);
        }
    }
    let took = start.elapsed();
    println!("{t:?} in {took:.2?}");
    assert_eq!(t.parses, 3 * CASES_PER_SEED * 2);
    // The mutations reach the field validation, not only the checksum and the JSON parser.
    assert!(t.deep >= 1000, "{t:?}");
    assert!(
        t.aligned >= 100 && t.non_finite >= 100 && t.sizes >= 100,
        "{t:?}"
    );
    assert!(took.as_secs() < 20, "{took:?}");
}
