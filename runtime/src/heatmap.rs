//! Heatmaps a person can look at: the anomaly map colour-mapped over the original frame, in frame
//! coordinates, with the score and verdict written in the corner.

use crate::pipeline::Inspection;
use crate::preprocess::Rgb8;

/// Colour scale of a heatmap: map values at `low` are blue, at `high` red.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Value drawn blue.
    pub low: f32,
    /// Value drawn red.
    pub high: f32,
}

impl Scale {
    /// The scale used for a bank: from 0.9 × the lowest normal calibration score to 1.1 × the
    /// threshold, so colours mean the same on every image of a bank and red starts near NG.
    pub fn for_threshold(normal_min: f64, threshold: f64) -> Self {
        let low = (0.9 * normal_min) as f32;
        let high = ((1.1 * threshold) as f32).max(low + 1e-6);
        Self { low, high }
    }
}

/// Jet-like colour map on `t ∈ [0, 1]`.
fn jet(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let c = |x: f32| ((1.5 - (4.0 * t - x).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    [c(3.0), c(2.0), c(1.0)]
}

/// Draw `insp.map` over `frame` (50 % blend inside the inspected window, darkened outside it) and
/// write `label` in the top-left corner.
pub fn render(frame: &Rgb8, insp: &Inspection, scale: Scale, label: &str) -> Rgb8 {
    let (fw, fh) = (frame.width, frame.height);
    let mw = insp.map_size.1;
    let (cols, rows) = insp.frame_axes(fw, fh);
    let mut out = frame.clone();
    for (y, row) in rows.iter().enumerate() {
        for (x, col) in cols.iter().enumerate() {
            let px = &mut out.data[(y * fw + x) * 3..(y * fw + x) * 3 + 3];
            match (row, col) {
                (Some(my), Some(mx)) => {
                    let v = insp.map[my * mw + mx];
                    let c = jet((v - scale.low) / (scale.high - scale.low));
                    for (p, c) in px.iter_mut().zip(c) {
                        *p = ((*p as u16 + c as u16) / 2) as u8;
                    }
                }
                _ => px.iter_mut().for_each(|p| *p /= 3),
            }
        }
    }
    draw_text(&mut out, label, 3, 3, (fw / 160).clamp(1, 4));
    out
}

/// 5×7 bitmap glyphs for the characters a label needs.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'N' => [0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x11],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '*' => [0x00, 0x15, 0x0E, 0x1F, 0x0E, 0x15, 0x00],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        _ => [0; 7],
    }
}

/// Write `text` (digits, letters shown upper-case, `. - % / = : ( ) + * ,` and spaces) in white
/// on a black box at `(x0, y0)`.
pub fn draw_text(img: &mut Rgb8, text: &str, x0: usize, y0: usize, scale: usize) {
    let n = text.chars().count();
    let (bw, bh) = ((n * 6 + 1) * scale, 9 * scale);
    for y in y0..(y0 + bh).min(img.height) {
        for x in x0..(x0 + bw).min(img.width) {
            img.data[(y * img.width + x) * 3..(y * img.width + x) * 3 + 3].fill(0);
        }
    }
    for (i, ch) in text.chars().enumerate() {
        let g = glyph(ch);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = x0 + (1 + i * 6 + col) * scale + dx;
                        let y = y0 + (1 + row) * scale + dy;
                        if x < img.width && y < img.height {
                            img.data[(y * img.width + x) * 3..(y * img.width + x) * 3 + 3]
                                .fill(255);
                        }
                    }
                }
            }
        }
    }
}

/// `path` (`<stem>.safetensors`) with the inspection's `map` (H×W f32) and `score` ([1] f32),
/// written atomically: what `inspect --dump` writes for comparisons outside edge-ad.
pub fn write_dump(path: &std::path::Path, insp: &Inspection) -> crate::Result<()> {
    use safetensors::tensor::TensorView;
    let bad =
        |e: safetensors::SafeTensorError| crate::Error::Invalid(format!("{}: {e}", path.display()));
    let map: Vec<u8> = insp.map.iter().flat_map(|v| v.to_le_bytes()).collect();
    let score = insp.score.to_le_bytes();
    let (h, w) = insp.map_size;
    let views = [
        (
            "map",
            TensorView::new(safetensors::Dtype::F32, vec![h, w], &map).map_err(bad)?,
        ),
        (
            "score",
            TensorView::new(safetensors::Dtype::F32, vec![1], &score).map_err(bad)?,
        ),
    ];
    let bytes = safetensors::serialize(views, &None).map_err(bad)?;
    edge_ad_calibration::bankfile::write_atomic(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::Placement;

    #[test]
    fn map_lands_on_its_window_and_outside_is_darkened() {
        // Frame 8×4, stretched to a 4×4 map → the map's right half covers the frame's right half.
        let frame = Rgb8 {
            width: 8,
            height: 4,
            data: vec![90; 96],
        };
        let mut map = vec![0.0f32; 16];
        for y in 0..4 {
            map[y * 4 + 3] = 1.0;
        }
        let insp = Inspection {
            score: 1.0,
            map,
            map_size: (4, 4),
            placement: Placement {
                origin: (0, 0),
                frame: (8, 4),
                resized: (4, 4),
                offset: (0, 0),
            },
            timings: Default::default(),
        };
        let out = render(
            &frame,
            &insp,
            Scale {
                low: 0.0,
                high: 1.0,
            },
            "",
        );
        let px = |x: usize, y: usize| &out.data[(y * 8 + x) * 3..(y * 8 + x) * 3 + 3];
        assert!(px(7, 3)[0] > px(7, 3)[2], "hot column is red");
        assert!(px(0, 3)[2] > px(0, 3)[0], "cold column is blue");
        // A crop window: frame columns outside it are darkened.
        let insp2 = Inspection {
            placement: Placement {
                origin: (0, 0),
                frame: (8, 4),
                resized: (8, 4),
                offset: (2, 0),
            },
            ..insp
        };
        let out = render(
            &frame,
            &insp2,
            Scale {
                low: 0.0,
                high: 1.0,
            },
            "",
        );
        assert_eq!(&out.data[0..3], &[30, 30, 30]);
    }

    #[test]
    fn text_draws_white_glyphs_on_black() {
        let mut img = Rgb8 {
            width: 40,
            height: 12,
            data: vec![128; 40 * 12 * 3],
        };
        draw_text(&mut img, "1", 0, 0, 1);
        assert_eq!(img.data[0], 0);
        // '1' has its top pixel at column 2 of the glyph: x = 1 + 2, y = 1.
        assert_eq!(img.data[(40 + 3) * 3], 255);
    }
}
