//! Frame preparation (spec §1): decode → RGB → Pillow-exact bicubic resize → fit (centre crop,
//! stretch or pad) → `/255` → `(x − mean) / std`, CHW f32.
//!
//! The resampler is a re-implementation of Pillow's `ImagingResample` for 8-bit images (bicubic,
//! `a = −0.5`, antialiased when shrinking, 22-bit fixed-point weights, a uint8 image between the
//! horizontal and the vertical pass). Measured difference from Pillow 13 on every conformance
//! image (12 images, up- and down-scaling): **0** — the 224×224 crops hash to the manifest's sha256
//! (`crop_rgb_u8_sha256`), checked by the conformance tests.

use crate::error::{Error, Result};
use crate::model::{Fit, Input};
use rayon::prelude::*;
use std::path::Path;

/// An 8-bit RGB image, row-major, interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

impl Rgb8 {
    /// Decode an image file; greyscale becomes three equal channels, alpha is dropped without
    /// compositing (Pillow's `convert("RGB")`).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::decode(&bytes).map_err(|message| Error::Image {
            path: path.into(),
            message,
        })
    }

    /// Decode image bytes (PNG, JPEG, BMP, TIFF). A truncated JPEG is an error: the decoder
    /// would fill the missing part with grey and the part would be scored on half a picture.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        jpeg_complete(bytes)?;
        let img =
            image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        Ok(Self {
            width: w as usize,
            height: h as usize,
            data: rgb.into_raw(),
        })
    }
}

/// A JPEG (FF D8 …) must end its last scan with the end-of-image marker FF D9. Inside entropy-
/// coded data 0xFF is always followed by 0x00 or a restart marker, so an FF D9 after the last
/// start-of-scan (FF DA) can only be the real end; any other format passes.
pub fn jpeg_complete(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Ok(());
    }
    let find_last = |m: u8| bytes.windows(2).rposition(|w| w == [0xFF, m]);
    match (find_last(0xDA), find_last(0xD9)) {
        (Some(sos), Some(eoi)) if eoi > sos => Ok(()),
        (None, _) => Err("truncated JPEG: no scan (start-of-scan marker missing)".into()),
        _ => Err(format!(
            "truncated JPEG: no end-of-image marker after the last scan ({} bytes)",
            bytes.len()
        )),
    }
}

/// Pillow's bicubic kernel (`a = −0.5`), written in Pillow's evaluation order for bit-equal weights.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point filter taps of one resampling pass: for output `i`, inputs `start[i]..` with
/// `weights[i·ksize..]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

fn coeffs(input: usize, output: usize) -> Coeffs {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut c = Coeffs {
        ksize,
        start: vec![0; output],
        len: vec![0; output],
        weights: vec![0; output * ksize],
    };
    let mut k = vec![0.0f64; ksize];
    for xx in 0..output {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` truncates toward zero; then clamp as Pillow does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0;
        for (x, kx) in k[..n].iter_mut().enumerate() {
            *kx = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *kx;
        }
        for (kx, out) in k[..n].iter().zip(&mut c.weights[xx * ksize..]) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            *out = if w < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        c.start[xx] = xmin;
        c.len[xx] = n;
    }
    c
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize with Pillow's `Image.resize(size, BICUBIC)` semantics: horizontal pass first, then
/// vertical, each only when that dimension changes.
pub fn resize_bicubic(src: &Rgb8, width: usize, height: usize) -> Rgb8 {
    resize_bicubic_window(src, (width, height), (0, 0), (width, height))
}

/// The `size` window at `origin` of [`resize_bicubic`]`(src, full)`, computing only that window
/// (each output pixel is evaluated exactly as in the full resize, so the result is bit-identical).
pub fn resize_bicubic_window(
    src: &Rgb8,
    full: (usize, usize),
    origin: (usize, usize),
    size: (usize, usize),
) -> Rgb8 {
    let (width, height) = full;
    let (x0, y0) = origin;
    let (ww, wh) = size;
    // Horizontal pass over every source row, output columns x0..x0+ww only.
    let horiz = if width != src.width {
        let c = coeffs(src.width, width);
        let mut out = vec![0u8; src.height * ww * 3];
        // Rows are independent: spread over the current rayon pool (inline outside one).
        out.par_chunks_mut(ww * 3)
            .enumerate()
            .for_each(|(y, orow)| {
                let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
                for (xo, x) in (x0..x0 + ww).enumerate() {
                    let w = &c.weights[x * c.ksize..x * c.ksize + c.len[x]];
                    for ch in 0..3 {
                        let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                        for (t, &wt) in w.iter().enumerate() {
                            acc += row[(c.start[x] + t) * 3 + ch] as i32 * wt;
                        }
                        orow[xo * 3 + ch] = clip8(acc);
                    }
                }
            });
        Rgb8 {
            width: ww,
            height: src.height,
            data: out,
        }
    } else {
        let mut data = Vec::with_capacity(src.height * ww * 3);
        for y in 0..src.height {
            data.extend_from_slice(
                &src.data[(y * src.width + x0) * 3..(y * src.width + x0 + ww) * 3],
            );
        }
        Rgb8 {
            width: ww,
            height: src.height,
            data,
        }
    };
    // Vertical pass, output rows y0..y0+wh only.
    let stride = ww * 3;
    if height != src.height {
        let c = coeffs(src.height, height);
        let mut out = vec![0u8; wh * stride];
        out.par_chunks_mut(stride)
            .enumerate()
            .for_each(|(yo, orow)| {
                let y = y0 + yo;
                let w = &c.weights[y * c.ksize..y * c.ksize + c.len[y]];
                for (i, o) in orow.iter_mut().enumerate() {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (t, &wt) in w.iter().enumerate() {
                        acc += horiz.data[(c.start[y] + t) * stride + i] as i32 * wt;
                    }
                    *o = clip8(acc);
                }
            });
        Rgb8 {
            width: ww,
            height: wh,
            data: out,
        }
    } else {
        Rgb8 {
            width: ww,
            height: wh,
            data: horiz.data[y0 * stride..(y0 + wh) * stride].to_vec(),
        }
    }
}

/// Python's `round()` on a half-integer-or-integer value `n/2`: ties to even (spec §1 step 3).
pub fn round_half_even_half(n: usize) -> usize {
    let (q, r) = (n / 2, n % 2);
    if r == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// Where the network input came from in the original frame (for drawing maps back).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Top-left corner of the fitted region in the frame (the ROI's; `(0, 0)` without one).
    pub origin: (usize, usize),
    /// Size of the fitted region `(width, height)`: the ROI, or the whole frame.
    pub frame: (usize, usize),
    /// Size after resizing `(width, height)`.
    pub resized: (usize, usize),
    /// Offset of the input window in the resized image `(left, top)`; negative for padding.
    pub offset: (i64, i64),
}

/// The network input of one frame: normalised CHW f32 and the 8-bit window it came from.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `3 × H × W` normalised values.
    pub chw: Vec<f32>,
    /// The `H × W` RGB window before normalisation (crop / stretched / padded image).
    pub window: Rgb8,
    /// Geometry, for mapping scores back onto the frame.
    pub placement: Placement,
}

/// The region of `img` that is inspected: the ROI cut out (with its origin), or the whole frame.
/// Refuses frames under `input.min_side`.
fn region<'a>(
    img: &'a Rgb8,
    input: &Input,
) -> Result<(std::borrow::Cow<'a, Rgb8>, (usize, usize)), String> {
    if img.width < input.min_side || img.height < input.min_side {
        return Err(format!(
            "image is {}×{} px, smaller than the {} px minimum side (input.min_side): too small to inspect",
            img.width, img.height, input.min_side
        ));
    }
    match input.roi {
        None => Ok((std::borrow::Cow::Borrowed(img), (0, 0))),
        Some([x, y, rw, rh]) => {
            if x + rw > img.width || y + rh > img.height {
                return Err(format!(
                    "input.roi [{x}, {y}, {rw}, {rh}] (x, y, width, height) lies outside the {}×{} image",
                    img.width, img.height
                ));
            }
            let mut data = Vec::with_capacity(rw * rh * 3);
            for row in y..y + rh {
                data.extend_from_slice(
                    &img.data[(row * img.width + x) * 3..(row * img.width + x + rw) * 3],
                );
            }
            Ok((
                std::borrow::Cow::Owned(Rgb8 {
                    width: rw,
                    height: rh,
                    data,
                }),
                (x, y),
            ))
        }
    }
}

/// One network input of a frame: a window of the resized frame.
#[derive(Debug, Clone)]
pub struct TileInput {
    /// `3 × H × W` normalised values.
    pub chw: Vec<f32>,
    /// Top-left corner of the window in the resized frame `(x, y)`; `(0, 0)` for the single
    /// window of crop, stretch and pad (whose offset is in the placement).
    pub offset: (usize, usize),
}

/// All network inputs of one frame and where they lie.
#[derive(Debug, Clone)]
pub struct PreparedFrame {
    /// The windows: one for crop, stretch and pad; one or more for tile.
    pub tiles: Vec<TileInput>,
    /// Geometry, for mapping scores back onto the frame.
    pub placement: Placement,
    /// Size `(height, width)` of the stitched score map: the input window, or for tile the whole
    /// resized frame.
    pub map_size: (usize, usize),
}

/// Window origins covering `len` pixels with the fewest windows of `win` pixels, spread evenly
/// (first at 0, last flush with the end; neighbours overlap when `len` is not a multiple of `win`).
pub fn tile_offsets(len: usize, win: usize) -> Vec<usize> {
    if len <= win {
        return vec![0];
    }
    let n = len.div_ceil(win);
    let span = (len - win) as f64;
    (0..n)
        .map(|i| (span * i as f64 / (n - 1) as f64).round() as usize)
        .collect()
}

/// Size of a frame region resized for tiling: the shorter side (relative to the input window)
/// becomes the input size, the other keeps the aspect ratio (never below the input size).
pub fn tile_resize(region: (usize, usize), input: (usize, usize)) -> (usize, usize) {
    let (w, h) = region;
    let (iw, ih) = input;
    let s = (iw as f64 / w as f64).max(ih as f64 / h as f64);
    let nw = ((w as f64 * s).round() as usize).max(iw);
    let nh = ((h as f64 * s).round() as usize).max(ih);
    (nw, nh)
}

/// Prepare a frame for the network according to `input.fit`: every window it needs.
/// For `tile`, the region is resized so that its shorter side equals the input size (aspect kept)
/// and covered by the fewest overlapping input-sized windows.
pub fn prepare_frame(img: &Rgb8, input: &Input) -> Result<PreparedFrame, String> {
    if input.fit != Fit::Tile {
        let p = prepare(img, input)?;
        return Ok(PreparedFrame {
            tiles: vec![TileInput {
                chw: p.chw,
                offset: (0, 0),
            }],
            placement: p.placement,
            map_size: (input.size[0], input.size[1]),
        });
    }
    let (ih, iw) = (input.size[0], input.size[1]);
    let (img, origin) = region(img, input)?;
    let (nw, nh) = tile_resize((img.width, img.height), (iw, ih));
    let resized = resize_bicubic(&img, nw, nh);
    let mut tiles = Vec::new();
    for &y0 in &tile_offsets(nh, ih) {
        for &x0 in &tile_offsets(nw, iw) {
            let mut data = Vec::with_capacity(iw * ih * 3);
            for y in y0..y0 + ih {
                data.extend_from_slice(&resized.data[(y * nw + x0) * 3..(y * nw + x0 + iw) * 3]);
            }
            let window = Rgb8 {
                width: iw,
                height: ih,
                data,
            };
            let mut chw = vec![0.0f32; 3 * ih * iw];
            normalise(&window, input, &mut chw);
            tiles.push(TileInput {
                chw,
                offset: (x0, y0),
            });
        }
    }
    Ok(PreparedFrame {
        tiles,
        placement: Placement {
            origin,
            frame: (img.width, img.height),
            resized: (nw, nh),
            offset: (0, 0),
        },
        map_size: (nh, nw),
    })
}

/// Prepare a frame for the network according to `input` (and its `fit`): the single window of
/// crop, stretch or pad (use [`prepare_frame`] for every fit, tile included).
pub fn prepare(img: &Rgb8, input: &Input) -> Result<Prepared, String> {
    let (ih, iw) = (input.size[0], input.size[1]);
    let (img, origin) = region(img, input)?;
    let img: &Rgb8 = &img;
    let (w, h) = (img.width, img.height);
    let (window, mut placement) = match input.fit {
        Fit::Crop => {
            // torchvision Resize(int): short side → resize, long side → int(resize·long/short).
            let (short, long) = (w.min(h), w.max(h));
            let new_long = (input.resize as f64 * long as f64 / short as f64) as usize;
            let (nw, nh) = if w <= h {
                (input.resize, new_long)
            } else {
                (new_long, input.resize)
            };
            let top = round_half_even_half(nh - ih);
            let left = round_half_even_half(nw - iw);
            // torchvision returns the image untouched when it already has the size; the window
            // resize then degenerates to a plain crop, so one call covers both.
            let data = resize_bicubic_window(img, (nw, nh), (left, top), (iw, ih)).data;
            (
                Rgb8 {
                    width: iw,
                    height: ih,
                    data,
                },
                Placement {
                    origin: (0, 0),
                    frame: (w, h),
                    resized: (nw, nh),
                    offset: (left as i64, top as i64),
                },
            )
        }
        Fit::Stretch => (
            resize_bicubic(img, iw, ih),
            Placement {
                origin: (0, 0),
                frame: (w, h),
                resized: (iw, ih),
                offset: (0, 0),
            },
        ),
        Fit::Pad => {
            let s = (iw as f64 / w as f64).min(ih as f64 / h as f64);
            let nw = ((w as f64 * s) as usize).clamp(1, iw);
            let nh = ((h as f64 * s) as usize).clamp(1, ih);
            let resized = resize_bicubic(img, nw, nh);
            let (left, top) = ((iw - nw) / 2, (ih - nh) / 2);
            let fill: Vec<u8> = input
                .mean
                .iter()
                .map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect();
            let mut data: Vec<u8> = fill.iter().copied().cycle().take(iw * ih * 3).collect();
            for y in 0..nh {
                let dst = ((top + y) * iw + left) * 3;
                data[dst..dst + nw * 3]
                    .copy_from_slice(&resized.data[y * nw * 3..(y + 1) * nw * 3]);
            }
            (
                Rgb8 {
                    width: iw,
                    height: ih,
                    data,
                },
                Placement {
                    origin: (0, 0),
                    frame: (w, h),
                    resized: (nw, nh),
                    offset: (-(left as i64), -(top as i64)),
                },
            )
        }
        Fit::Tile => return Err("fit = \"tile\" makes several windows: use prepare_frame".into()),
    };
    placement.origin = origin;
    let mut chw = vec![0.0f32; 3 * ih * iw];
    normalise(&window, input, &mut chw);
    Ok(Prepared {
        chw,
        window,
        placement,
    })
}

/// `x = u8 / 255` then `(x − mean_c) / std_c`, both in f32 (spec §1 step 4: equal to the authors'
/// tensor bit for bit).
pub fn normalise(window: &Rgb8, input: &Input, chw: &mut [f32]) {
    let plane = window.width * window.height;
    for (i, px) in window.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = px[c] as f32 / 255.0;
            chw[c * plane + i] = (x - input.mean[c]) / input.std[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L1: truncated JPEGs used to decode with the missing part filled in and be scored.
    #[test]
    fn truncated_jpegs_are_errors_and_whole_ones_decode() {
        let img =
            image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
        let mut jpg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
            .encode_image(&img)
            .unwrap();
        let whole = Rgb8::decode(&jpg).unwrap();
        assert_eq!((whole.width, whole.height), (64, 48));
        // Padding after the end marker (some cameras) is fine.
        let mut padded = jpg.clone();
        padded.extend([0u8; 32]);
        assert!(Rgb8::decode(&padded).is_ok());
        for cut in [jpg.len() - 2, jpg.len() * 3 / 4, jpg.len() / 2] {
            let e = Rgb8::decode(&jpg[..cut]).unwrap_err();
            assert!(e.contains("truncated JPEG"), "{cut}: {e}");
        }
        let e = Rgb8::decode(&jpg[..200]).unwrap_err();
        assert!(e.contains("truncated JPEG"), "{e}");
    }

    #[test]
    fn python_round_ties_to_even() {
        // (H' − 224) = 45 → 22.5 → 22; 113 → 56.5 → 56; 1 → 0.5 → 0; 3 → 1.5 → 2; 310 → 155.
        assert_eq!(round_half_even_half(45), 22);
        assert_eq!(round_half_even_half(113), 56);
        assert_eq!(round_half_even_half(1), 0);
        assert_eq!(round_half_even_half(3), 2);
        assert_eq!(round_half_even_half(310), 155);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(119, 224), (608, 224), (224, 534), (5, 3)] {
            let c = coeffs(i, o);
            for x in 0..o {
                let s: i32 = c.weights[x * c.ksize..x * c.ksize + c.len[x]].iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= 4,
                    "{i}->{o} at {x}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_and_identity_size_is_untouched() {
        let img = Rgb8 {
            width: 7,
            height: 5,
            data: vec![200; 105],
        };
        let r = resize_bicubic(&img, 13, 3);
        assert!(r.data.iter().all(|&v| v == 200));
        assert_eq!(resize_bicubic(&img, 7, 5), img);
    }

    #[test]
    fn window_resize_equals_cropping_the_full_resize() {
        let data: Vec<u8> = (0..37 * 23 * 3)
            .map(|i| ((i * 31 + i / 7) % 256) as u8)
            .collect();
        let img = Rgb8 {
            width: 37,
            height: 23,
            data,
        };
        for (full, origin, size) in [
            ((50, 31), (3, 4), (40, 20)),
            ((37, 60), (0, 9), (37, 37)),
            ((20, 23), (2, 0), (10, 23)),
        ] {
            let whole = resize_bicubic(&img, full.0, full.1);
            let win = resize_bicubic_window(&img, full, origin, size);
            for y in 0..size.1 {
                let a = &whole.data[((origin.1 + y) * full.0 + origin.0) * 3..][..size.0 * 3];
                assert_eq!(
                    &win.data[y * size.0 * 3..(y + 1) * size.0 * 3],
                    a,
                    "{full:?} {origin:?} row {y}"
                );
            }
        }
    }

    #[test]
    fn too_small_image_is_refused_with_sizes() {
        let input = Input {
            name: None,
            size: [224, 224],
            resize: 224,
            fit: Fit::Crop,
            mean: [0.5; 3],
            std: [0.5; 3],
            min_side: 32,
            roi: None,
        };
        let e = prepare(
            &Rgb8 {
                width: 10,
                height: 40,
                data: vec![0; 1200],
            },
            &input,
        )
        .unwrap_err();
        assert!(e.contains("10×40") && e.contains("min_side"), "{e}");
    }

    #[test]
    fn roi_is_cut_first_and_recorded() {
        let mut input = Input {
            name: None,
            size: [4, 4],
            resize: 4,
            fit: Fit::Stretch,
            mean: [0.0; 3],
            std: [1.0; 3],
            min_side: 1,
            roi: Some([2, 1, 4, 4]),
        };
        // 10×6 frame, bright only inside x 2..6, y 1..5.
        let mut data = vec![0u8; 10 * 6 * 3];
        for y in 1..5 {
            for x in 2..6 {
                data[(y * 10 + x) * 3..(y * 10 + x) * 3 + 3].fill(255);
            }
        }
        let img = Rgb8 {
            width: 10,
            height: 6,
            data,
        };
        let p = prepare(&img, &input).unwrap();
        assert!(p.window.data.iter().all(|&v| v == 255));
        assert_eq!((p.placement.origin, p.placement.frame), ((2, 1), (4, 4)));
        input.roi = Some([8, 0, 4, 4]);
        let e = prepare(&img, &input).unwrap_err();
        assert!(e.contains("input.roi") && e.contains("10×6"), "{e}");
    }

    #[test]
    fn pad_keeps_whole_frame_centred() {
        let input = Input {
            name: None,
            size: [8, 8],
            resize: 8,
            fit: Fit::Pad,
            mean: [0.0; 3],
            std: [1.0; 3],
            min_side: 1,
            roi: None,
        };
        let p = prepare(
            &Rgb8 {
                width: 8,
                height: 4,
                data: vec![255; 96],
            },
            &input,
        )
        .unwrap();
        assert_eq!(p.placement.offset, (0, -2));
        assert_eq!(p.window.data[0], 0);
        assert_eq!(p.window.data[(2 * 8) * 3], 255);
    }

    #[test]
    fn tiles_cover_the_frame_with_the_fewest_windows() {
        assert_eq!(tile_offsets(224, 224), vec![0]);
        assert_eq!(tile_offsets(448, 224), vec![0, 224]);
        // 500 px: 3 tiles, last flush with the end, even overlap.
        assert_eq!(tile_offsets(500, 224), vec![0, 138, 276]);
        assert_eq!(tile_offsets(225, 224), vec![0, 1]);
        // Portrait 114×300 → 224 wide, 589 high; landscape keeps the height.
        assert_eq!(tile_resize((114, 300), (224, 224)), (224, 589));
        assert_eq!(tile_resize((600, 300), (224, 224)), (448, 224));
        // A frame already smaller than the input is enlarged to at least the input.
        assert_eq!(tile_resize((100, 100), (224, 224)), (224, 224));
    }

    #[test]
    fn tile_frames_cut_windows_of_the_resized_frame() {
        let input = Input {
            name: None,
            size: [4, 4],
            resize: 4,
            fit: Fit::Tile,
            mean: [0.0; 3],
            std: [1.0; 3],
            min_side: 1,
            roi: None,
        };
        // 10×4 frame (already at the input height): a horizontal ramp, 3 tiles at 0, 3, 6.
        let data: Vec<u8> = (0..4)
            .flat_map(|_| (0..10u8).flat_map(|x| [x * 20; 3]))
            .collect();
        let img = Rgb8 {
            width: 10,
            height: 4,
            data,
        };
        let f = prepare_frame(&img, &input).unwrap();
        assert_eq!(f.map_size, (4, 10));
        assert_eq!(f.placement.resized, (10, 4));
        let offs: Vec<_> = f.tiles.iter().map(|t| t.offset).collect();
        assert_eq!(offs, vec![(0, 0), (3, 0), (6, 0)]);
        for t in &f.tiles {
            // First pixel of each window is the ramp value at its offset (red plane, row 0).
            assert_eq!(t.chw[0], (t.offset.0 as f32 * 20.0) / 255.0);
            assert_eq!(t.chw.len(), 3 * 16);
        }
        // Other fits give one window with the input-sized map.
        let single = prepare_frame(
            &img,
            &Input {
                fit: Fit::Stretch,
                ..input.clone()
            },
        )
        .unwrap();
        assert_eq!((single.tiles.len(), single.map_size), (1, (4, 4)));
        assert!(prepare(&img, &input).unwrap_err().contains("prepare_frame"));
    }
}
