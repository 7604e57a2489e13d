//! The calibration report a person looks at before trusting a bank, written next to it:
//! `summary.txt` (what was chosen and the numbers), `histogram.png` (normal scores in blue, known
//! defects in red, the threshold as a black line marked T), `references.png` (the chosen
//! references as a contact sheet) and `normal-<n>.png` (heatmaps of the highest-scoring normal
//! images: where the bank is least sure about good parts).

use crate::error::{Error, Result};
use crate::heatmap::{self, draw_text, Scale};
use crate::inspector::CalibrationReport;
use crate::preprocess::{resize_bicubic, Rgb8};
use edge_ad_calibration::{BankHeader, ThresholdRule};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn rule_text(r: &ThresholdRule) -> String {
    match r {
        ThresholdRule::MaxTimesMargin { margin } => format!("max normal × {margin}"),
        ThresholdRule::MeanPlusKSigma { k } => format!("mean + {k} × std of the normal scores"),
        ThresholdRule::Quantile { false_reject } => {
            format!("false-reject budget {false_reject} (quantile of the normal scores)")
        }
        ThresholdRule::Conformal { reject_rate } => format!(
            "false-reject budget {}, conformal order statistic of the held-out scores",
            edge_ad_calibration::threshold::fmt_rate(*reject_rate)
        ),
    }
}

/// The text summary (also printed by `calibrate`).
pub fn summary(h: &BankHeader, r: &CalibrationReport) -> String {
    let mut s = String::new();
    let t = &r.threshold;
    let _ = writeln!(s, "model {}   fit {}", h.model_name, h.fit);
    let _ = writeln!(
        s,
        "references ({}, {}; {} backbone windows):",
        r.references.len(),
        h.selection,
        r.windows
    );
    for p in &r.references {
        let _ = writeln!(s, "  {}", p.display());
    }
    let _ = writeln!(s, "levels {:?} ({})", r.levels, r.level_choice);
    for c in r.candidates.iter().take(5) {
        let _ = writeln!(
            s,
            "  candidate {:?}: AUROC {:.3}, separation {:.2}",
            c.levels, c.auroc, c.separation
        );
    }
    let loo = r.normal_scores.iter().filter(|n| n.left_out).count();
    let held = r.normal_scores.len() - loo;
    let _ = writeln!(
        s,
        "normal scores: {held} held out (each scored against a bank chosen without it){}",
        if loo > 0 {
            format!(
                ", {loo} listed references left out ({})",
                if t.normal_count == held {
                    "biased high: not used by the rule"
                } else {
                    "biased high, used by the rule"
                }
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "the threshold rests on {}: min {:.4}  mean {:.4}  max {:.4}  std {:.4}",
        t.normal_count, t.normal_min, t.normal_mean, t.normal_max, t.normal_std
    );
    if let Some(d) = &t.defects {
        let _ = writeln!(
            s,
            "defect scores ({} images): min {:.4}  max {:.4}; gap to the highest normal {:+.4}, separation {:.2} (gap / summed std)",
            d.count, d.min, d.max, d.gap, d.separation
        );
        let place = if d.gap > 0.0 {
            "midway between the classes"
        } else {
            "where the classes overlap, at the cut with the fewest errors"
        };
        let _ = writeln!(
            s,
            "threshold {:.4}: {place} ({} false rejects, {} misses among the calibration images)",
            t.value, d.false_rejects, d.misses
        );
    } else {
        let _ = writeln!(s, "threshold {:.4} ({})", t.value, rule_text(&t.rule));
    }
    if let Some(rate) = t.expected_false_reject {
        let _ = writeln!(
            s,
            "expected false-reject rate {:.2} % for a new good part (rests on {} held-out images; no image was scored against a bank that holds it)",
            100.0 * rate,
            t.normal_count
        );
    }
    for note in &r.notes {
        let _ = writeln!(s, "note: {note}");
    }
    s
}

/// Write `img` as a PNG, atomically (temporary file renamed into place).
pub fn save_png(img: &Rgb8, path: &Path) -> Result<()> {
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .ok_or_else(|| Error::Invalid(format!("{}: image buffer size", path.display())))?;
    let tmp = path.with_extension("png.tmp");
    buf.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn fill(img: &mut Rgb8, x0: usize, y0: usize, w: usize, h: usize, c: [u8; 3]) {
    for y in y0..(y0 + h).min(img.height) {
        for x in x0..(x0 + w).min(img.width) {
            img.data[(y * img.width + x) * 3..][..3].copy_from_slice(&c);
        }
    }
}

/// The histogram's caption: what the threshold promises and what it rests on (issue 14 §4).
pub fn histogram_caption(t: &edge_ad_calibration::Threshold) -> String {
    match t.expected_false_reject {
        Some(p) => format!(
            "expected false rejects {:.2}% - {} held-out good",
            100.0 * p,
            t.normal_count
        ),
        None => format!("rule {} - no stated rate - {} good", t.rule, t.normal_count),
    }
}

/// Histogram of normal (blue) and defect (red) scores with the threshold (black, marked T) and
/// `caption` above the plot.
pub fn histogram(normal: &[f64], defects: &[f64], threshold: f64, caption: &str) -> Rgb8 {
    let (w, h) = (640usize, 320usize);
    let mut img = Rgb8 {
        width: w,
        height: h,
        data: vec![255; w * h * 3],
    };
    let all = normal
        .iter()
        .chain(defects)
        .chain(std::iter::once(&threshold));
    let lo = all.clone().copied().fold(f64::INFINITY, f64::min);
    let hi = all.copied().fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(1e-9);
    let (lo, hi) = (lo - 0.05 * span, hi + 0.05 * span);
    let bins = 40usize;
    let (left, right, top, bottom) = (40usize, 20usize, 28usize, 40usize);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let bin = |s: f64| (((s - lo) / (hi - lo) * bins as f64) as usize).min(bins - 1);
    let mut cn = vec![0usize; bins];
    let mut cd = vec![0usize; bins];
    normal.iter().for_each(|&s| cn[bin(s)] += 1);
    defects.iter().for_each(|&s| cd[bin(s)] += 1);
    let peak = cn.iter().chain(&cd).copied().max().unwrap_or(1).max(1);
    let bw = pw / bins;
    for b in 0..bins {
        let x = left + b * bw;
        let hn = cn[b] * ph / peak;
        let hd = cd[b] * ph / peak;
        // Normal bars on the left half of the bin, defect bars on the right half.
        fill(&mut img, x + 1, top + ph - hn, bw / 2, hn, [40, 90, 220]);
        fill(
            &mut img,
            x + bw / 2,
            top + ph - hd,
            bw / 2,
            hd,
            [220, 40, 40],
        );
    }
    fill(&mut img, left, top + ph, pw, 1, [0, 0, 0]);
    let tx = left + ((threshold - lo) / (hi - lo) * (bins * bw) as f64) as usize;
    for y in (top..top + ph).step_by(2) {
        fill(&mut img, tx, y, 2, 1, [0, 0, 0]);
    }
    draw_text(&mut img, "T", tx + 4, top, 2);
    draw_text(&mut img, caption, left, 4, 2);
    draw_text(&mut img, &format!("{lo:.3}"), left, top + ph + 8, 2);
    let hi_s = format!("{hi:.3}");
    draw_text(
        &mut img,
        &hi_s,
        w - right - hi_s.len() * 12,
        top + ph + 8,
        2,
    );
    draw_text(
        &mut img,
        &format!("{threshold:.3}"),
        tx.saturating_sub(20),
        top + ph + 24,
        1,
    );
    img
}

/// The references side by side, each scaled to `cell` pixels high.
pub fn contact_sheet(images: &[Rgb8], cell: usize) -> Rgb8 {
    let scaled: Vec<Rgb8> = images
        .iter()
        .map(|i| {
            let w = (i.width * cell / i.height.max(1)).max(1);
            resize_bicubic(i, w, cell)
        })
        .collect();
    let gap = 4;
    let width = scaled.iter().map(|s| s.width + gap).sum::<usize>() + gap;
    let height = cell + 2 * gap;
    let mut out = Rgb8 {
        width,
        height,
        data: vec![40; width * height * 3],
    };
    let mut x0 = gap;
    for (n, s) in scaled.iter().enumerate() {
        for y in 0..s.height {
            let dst = ((gap + y) * width + x0) * 3;
            out.data[dst..dst + s.width * 3]
                .copy_from_slice(&s.data[y * s.width * 3..(y + 1) * s.width * 3]);
        }
        draw_text(&mut out, &(n + 1).to_string(), x0 + 3, gap + 3, 2);
        x0 += s.width + gap;
    }
    out
}

/// The files a calibration report consists of (what [`write`] puts in its folder).
fn is_report_file(name: &str) -> bool {
    matches!(name, "summary.txt" | "histogram.png" | "references.png")
        || name
            .strip_prefix("normal-")
            .and_then(|r| r.strip_suffix(".png"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `dir` may take a new report: it does not exist, or it is an earlier report (a folder holding
/// only a report's files). Anything else — a file, the image pool, a folder with other files —
/// is refused naming what is there: a new report replaces the folder whole.
pub fn check_report_dir(dir: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "report folder {}: exists and is not a folder; a report would replace it: choose another path (--report)",
            dir.display()
        )));
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !(file && is_report_file(&name)) {
            return Err(Error::Invalid(format!(
                "report folder {}: holds {name}, which is not part of a calibration report; a new report replaces the whole folder: choose another path (--report) or empty it",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Write the bank to `bank_path` and its report to `report_dir` so that a bank is never left
/// beside another calibration's report, whatever moment the process is killed at: the report is
/// written whole into a temporary folder first, the old report is removed, the bank is renamed
/// into place (atomically), and only then the new report. A kill leaves either the old bank
/// with no report, or the new bank with no report (and a `.tmp-<pid>` folder), never a
/// mismatched pair.
pub fn save_with_bank(
    bank: &edge_ad_calibration::BankFile,
    bank_path: &Path,
    report_dir: &Path,
    r: &CalibrationReport,
    summary: &str,
) -> Result<()> {
    save_with(
        || bank.save(bank_path).map_err(Into::into),
        &[(report_dir, &bank.header, r, summary)],
    )
}

/// A report to write: its folder, the bank header, the report and its summary text.
pub type ReportParts<'a> = (&'a Path, &'a BankHeader, &'a CalibrationReport, &'a str);

/// [`save_with_bank`] for a bank set (`calibrate --product`): one report per product, each
/// replaced the same way around the one atomic write of the set.
pub fn save_with_set(
    set: &edge_ad_calibration::BankSet,
    set_path: &Path,
    reports: &[ReportParts<'_>],
) -> Result<()> {
    save_with(|| set.save(set_path).map_err(Into::into), reports)
}

fn save_with(save: impl FnOnce() -> Result<()>, reports: &[ReportParts<'_>]) -> Result<()> {
    let mut tmps = Vec::with_capacity(reports.len());
    let cleanup = |tmps: &[PathBuf]| {
        for t in tmps {
            let _ = std::fs::remove_dir_all(t);
        }
    };
    for (report_dir, header, r, summary) in reports {
        let parent = report_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = report_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "report".into());
        if let Err(e) = check_report_dir(report_dir) {
            cleanup(&tmps);
            return Err(e);
        }
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        tmps.push(tmp.clone());
        if let Err(e) = write(&tmp, header, r, summary) {
            cleanup(&tmps);
            return Err(e);
        }
    }
    // Old reports are moved aside and only removed once the new ones are in place; any
    // failure before the bank is written puts them back.
    let mut moved: Vec<(PathBuf, PathBuf)> = Vec::new();
    let restore = |moved: &[(PathBuf, PathBuf)]| {
        for (dir, old) in moved {
            let _ = std::fs::rename(old, dir);
        }
    };
    for (report_dir, ..) in reports {
        if report_dir.exists() {
            let parent = report_dir.parent().unwrap_or(Path::new("."));
            let name = report_dir.file_name().unwrap_or_default().to_string_lossy();
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&old);
            if let Err(e) = std::fs::rename(report_dir, &old) {
                restore(&moved);
                cleanup(&tmps);
                return Err(Error::io(*report_dir, e));
            }
            moved.push((report_dir.to_path_buf(), old));
        }
    }
    if let Err(e) = save() {
        restore(&moved);
        cleanup(&tmps);
        return Err(e);
    }
    // The bank is in place: from here a failure leaves it without (some of) its reports,
    // never beside another calibration's.
    for (_, old) in &moved {
        let _ = std::fs::remove_dir_all(old);
    }
    for (i, (tmp, (report_dir, ..))) in tmps.iter().zip(reports).enumerate() {
        if let Err(e) = std::fs::rename(tmp, report_dir) {
            cleanup(&tmps[i..]);
            return Err(Error::io(*report_dir, e));
        }
    }
    Ok(())
}

/// Write the whole report into `dir` (created if needed).
pub fn write(dir: &Path, h: &BankHeader, r: &CalibrationReport, summary: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let txt = dir.join("summary.txt");
    let mut text = summary.to_string();
    let _ = writeln!(text, "\nscores (path, score, how):");
    for n in &r.normal_scores {
        let how = if n.left_out {
            "reference, left out"
        } else {
            "held out"
        };
        let _ = writeln!(text, "  {}  {:.4}  {how}", n.path.display(), n.score);
    }
    for d in &r.defect_scores {
        let _ = writeln!(text, "  {}  {:.4}  defect", d.path.display(), d.score);
    }
    edge_ad_calibration::bankfile::write_atomic(&txt, text.as_bytes())?;
    let normal: Vec<f64> = r.normal_scores.iter().map(|s| s.score).collect();
    let defects: Vec<f64> = r.defect_scores.iter().map(|s| s.score).collect();
    save_png(
        &histogram(
            &normal,
            &defects,
            r.threshold.value,
            &histogram_caption(&r.threshold),
        ),
        &dir.join("histogram.png"),
    )?;
    let refs = r
        .references
        .iter()
        .map(|p| Rgb8::open(p))
        .collect::<Result<Vec<_>>>()?;
    save_png(&contact_sheet(&refs, 160), &dir.join("references.png"))?;
    let scale = Scale::for_threshold(r.threshold.normal_min, r.threshold.value);
    for (n, (path, insp)) in r.top_normal.iter().enumerate() {
        let img = Rgb8::open(path)?;
        let label = format!("{:.3}", insp.score);
        save_png(
            &heatmap::render(&img, insp, scale, &label),
            &dir.join(format!("normal-{}.png", n + 1)),
        )?;
    }
    let _ = h;
    Ok(())
}
