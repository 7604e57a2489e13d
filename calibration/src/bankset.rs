//! One bank file for several products (docs/calibration.md, "Several products"): the multi-class
//! setting of RLR and Pro-AD, training-free. Each product keeps its own references and threshold;
//! the line recognises which product a frame shows and scores it against that product's bank.
//!
//! Layout: `EDGEADBS`, a u32 LE format version, a u32 LE product count, then per product a u16 LE
//! name length, the name (UTF-8), a u64 LE length and that many bytes of an ordinary bank file
//! ([`BankFile::to_bytes`], with its own checksum); last the SHA-256 of everything before it (so
//! names and framing are covered too). Every length is checked against the bytes left before
//! anything is read; each embedded bank is checked as a bank file is.

use crate::bankfile::{write_atomic, BankFile, BankFileError};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The first bytes of a bank set.
pub const SET_MAGIC: &[u8; 8] = b"EDGEADBS";
const SET_VERSION: u32 = 1;
/// Products one set holds at most (product ids on the line are 1–999).
pub const MAX_PRODUCTS: usize = 999;

/// Whether a name can be a product's: 1–32 letters, digits, `-`, `_`, `.` (it is sent in serial
/// replies and used in file names).
pub fn valid_product_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Several products' banks, in order (the line numbers them 1, 2, … in this order).
#[derive(Debug, Clone, PartialEq)]
pub struct BankSet {
    /// (product name, its bank).
    pub products: Vec<(String, BankFile)>,
}

/// Whether `bytes` start like a bank set (rather than a single bank).
pub fn is_bank_set(bytes: &[u8]) -> bool {
    bytes.get(..8) == Some(SET_MAGIC.as_slice())
}

impl BankSet {
    /// Serialise; refuses what [`BankSet::from_bytes`] would refuse (no product, too many, a bad
    /// or repeated name, a bank that could not be loaded).
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        check_names(
            self.products.iter().map(|p| p.0.as_str()),
            self.products.len(),
        )?;
        let mut out = Vec::new();
        out.extend_from_slice(SET_MAGIC);
        out.extend_from_slice(&SET_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.products.len() as u32).to_le_bytes());
        for (name, bank) in &self.products {
            let b = bank
                .to_bytes()
                .map_err(|e| format!("product {name}: {e}"))?;
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(&b);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Parse bytes read from `path` (named in messages). No input panics; every length is
    /// checked against what is there before it is used.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, BankFileError> {
        let fmt = |message: String| BankFileError::Format {
            path: path.into(),
            message,
        };
        let truncated = |expected: u64| BankFileError::Truncated {
            path: path.into(),
            expected,
            found: bytes.len() as u64,
        };
        if !is_bank_set(bytes) {
            return Err(fmt("not an edge-ad bank set (bad magic)".into()));
        }
        if bytes.len() < 8 + 8 + 32 {
            return Err(truncated(8 + 8 + 32));
        }
        let (bytes, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(bytes).as_slice() != sum {
            return Err(BankFileError::Checksum { path: path.into() });
        }
        let mut at = 8usize;
        let mut take = |n: usize| -> Result<&[u8], BankFileError> {
            let end = at.checked_add(n).ok_or_else(|| truncated(u64::MAX))?;
            let s = bytes.get(at..end).ok_or_else(|| truncated(end as u64))?;
            at = end;
            Ok(s)
        };
        let u32_at = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let version = u32_at(take(4)?);
        if version != SET_VERSION {
            return Err(fmt(format!(
                "bank set format version {version}; this edge-ad reads version {SET_VERSION}"
            )));
        }
        let count = u32_at(take(4)?) as usize;
        if count == 0 || count > MAX_PRODUCTS {
            return Err(fmt(format!(
                "product count {count} (expected 1–{MAX_PRODUCTS})"
            )));
        }
        let mut products = Vec::with_capacity(count.min(16));
        for i in 0..count {
            let nlen = {
                let s = take(2)?;
                u16::from_le_bytes([s[0], s[1]]) as usize
            };
            let name = std::str::from_utf8(take(nlen)?)
                .map_err(|_| fmt(format!("product {i}: name is not UTF-8")))?
                .to_string();
            let blen = {
                let s = take(8)?;
                u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
            };
            let blen = usize::try_from(blen).map_err(|_| truncated(u64::MAX))?;
            let inner = take(blen)?;
            let bank = BankFile::from_bytes(inner, &path.join(&name))?;
            products.push((name, bank));
        }
        if at != bytes.len() {
            return Err(fmt(format!(
                "{} bytes after the last product",
                bytes.len() - at
            )));
        }
        check_names(products.iter().map(|p| p.0.as_str()), count).map_err(fmt)?;
        Ok(Self { products })
    }

    /// Read and parse a bank set file.
    pub fn load(path: &Path) -> Result<Self, BankFileError> {
        let bytes = std::fs::read(path).map_err(|source| BankFileError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Write atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), BankFileError> {
        let bytes = self.to_bytes().map_err(|message| BankFileError::Format {
            path: path.into(),
            message,
        })?;
        write_atomic(path, &bytes)
    }
}

fn check_names<'a>(names: impl Iterator<Item = &'a str>, count: usize) -> Result<(), String> {
    if count == 0 || count > MAX_PRODUCTS {
        return Err(format!("{count} products (expected 1–{MAX_PRODUCTS})"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if !valid_product_name(n) {
            return Err(format!(
                "product name {n:?}: 1–32 letters, digits, '-', '_' or '.'"
            ));
        }
        if !seen.insert(n) {
            return Err(format!("product name {n:?} appears twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bankfile::tests::sample;

    fn two() -> BankSet {
        let mut b = sample();
        b.header.model_name = "other".into();
        BankSet {
            products: vec![("plate".into(), sample()), ("tile".into(), b)],
        }
    }

    #[test]
    fn round_trip_and_atomic_save() {
        let set = two();
        let bytes = set.to_bytes().unwrap();
        assert!(is_bank_set(&bytes));
        assert_eq!(
            BankSet::from_bytes(&bytes, Path::new("s.eab")).unwrap(),
            set
        );
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("set.eab");
        set.save(&p).unwrap();
        assert_eq!(BankSet::load(&p).unwrap(), set);
    }

    /// Every truncation, every single flipped byte and trailing garbage give an error naming the
    /// file, never a panic or a wrong set.
    #[test]
    fn damaged_sets_are_refused() {
        let bytes = two().to_bytes().unwrap();
        let p = Path::new("set.eab");
        for n in 0..bytes.len() {
            let e = BankSet::from_bytes(&bytes[..n], p).unwrap_err();
            assert!(e.to_string().contains("set.eab"), "{e}");
        }
        for i in (0..bytes.len()).step_by(3) {
            let mut b = bytes.clone();
            b[i] ^= 0x5A;
            assert!(BankSet::from_bytes(&b, p).is_err(), "byte {i} flipped");
        }
        let mut b = bytes.clone();
        b.push(0);
        assert!(BankSet::from_bytes(&b, p).is_err());
        // Trailing bytes inside the checksum are refused too.
        let mut b = bytes[..bytes.len() - 32].to_vec();
        b.push(0);
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum);
        let e = BankSet::from_bytes(&b, p).unwrap_err().to_string();
        assert!(e.contains("1 bytes after the last product"), "{e}");
    }

    #[test]
    fn names_are_checked_on_both_sides() {
        let mut s = two();
        s.products[1].0 = "plate".into();
        assert!(s.to_bytes().unwrap_err().contains("appears twice"));
        s.products[1].0 = "a,b".into();
        assert!(s.to_bytes().unwrap_err().contains("\"a,b\""));
        let empty = BankSet { products: vec![] };
        assert!(empty.to_bytes().unwrap_err().contains("0 products"));
        // A name changed in the file (checksum recomputed) to one that is not allowed is refused
        // on load.
        let full = two().to_bytes().unwrap();
        let mut bytes = full[..full.len() - 32].to_vec();
        let at = bytes.windows(5).position(|w| w == b"plate").unwrap();
        bytes[at] = b',';
        let sum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&sum);
        let e = BankSet::from_bytes(&bytes, Path::new("s"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\",late\""), "{e}");
    }
}
