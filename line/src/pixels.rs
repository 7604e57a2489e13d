//! Camera pixel formats → RGB (line-side.md §2.3): YUYV and NV12 as UVC cameras deliver them
//! (BT.601, limited range unless the driver says full range), GREY, RGB24 and MJPEG. Rows start at
//! `row × stride`; a payload shorter than the format needs is an error (the tag becomes ERR), as is
//! an MJPEG frame without the JPEG start marker.

use edge_ad::preprocess::Rgb8;

/// Pixel formats a camera may deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// 4:2:2 packed, Y0 U Y1 V.
    Yuyv,
    /// 4:2:0, Y plane then interleaved U,V at half resolution.
    Nv12,
    /// 8-bit luma.
    Grey,
    /// Packed R, G, B.
    Rgb24,
    /// Motion JPEG: one JPEG per frame.
    Mjpeg,
}

/// One captured buffer.
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    /// Format.
    pub format: PixelFormat,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Bytes per row (of the Y plane for NV12); ignored for MJPEG.
    pub stride: usize,
    /// The payload (`bytesused` bytes).
    pub data: &'a [u8],
    /// YUV in full range (JPEG-style) instead of BT.601 limited range.
    pub full_range: bool,
}

#[inline]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// BT.601 YCbCr → RGB, integer form (8-bit fixed point, within ±1 of the float formula).
#[inline]
pub fn yuv_to_rgb(y: u8, u: u8, v: u8, full_range: bool) -> [u8; 3] {
    let (d, e) = (u as i32 - 128, v as i32 - 128);
    if full_range {
        let c = (y as i32) << 8;
        [
            clamp8((c + 359 * e + 128) >> 8),
            clamp8((c - 88 * d - 183 * e + 128) >> 8),
            clamp8((c + 454 * d + 128) >> 8),
        ]
    } else {
        let c = 298 * (y as i32 - 16);
        [
            clamp8((c + 409 * e + 128) >> 8),
            clamp8((c - 100 * d - 208 * e + 128) >> 8),
            clamp8((c + 516 * d + 128) >> 8),
        ]
    }
}

fn need(f: &RawFrame, bytes: usize, min_stride: usize) -> Result<(), String> {
    if f.width == 0 || f.height == 0 {
        return Err(format!("frame of {}×{} pixels", f.width, f.height));
    }
    if f.stride < min_stride {
        return Err(format!(
            "{:?} stride {} < {} bytes for a {} px row",
            f.format, f.stride, min_stride, f.width
        ));
    }
    if f.data.len() < bytes {
        return Err(format!(
            "short {:?} frame: {} bytes, {}×{} needs {}",
            f.format,
            f.data.len(),
            f.width,
            f.height,
            bytes
        ));
    }
    Ok(())
}

/// Convert a captured frame to RGB.
pub fn to_rgb(f: &RawFrame) -> Result<Rgb8, String> {
    let (w, h, s) = (f.width, f.height, f.stride);
    let mut out = vec![0u8; w * h * 3];
    match f.format {
        PixelFormat::Yuyv => {
            if w % 2 != 0 {
                return Err(format!("YUYV width {w} is odd"));
            }
            need(f, s * h, 2 * w)?;
            for y in 0..h {
                let row = &f.data[y * s..y * s + 2 * w];
                for (x2, px) in row.chunks_exact(4).enumerate() {
                    let (y0, u, y1, v) = (px[0], px[1], px[2], px[3]);
                    let o = (y * w + 2 * x2) * 3;
                    out[o..o + 3].copy_from_slice(&yuv_to_rgb(y0, u, v, f.full_range));
                    out[o + 3..o + 6].copy_from_slice(&yuv_to_rgb(y1, u, v, f.full_range));
                }
            }
        }
        PixelFormat::Nv12 => {
            if w % 2 != 0 || h % 2 != 0 {
                return Err(format!("NV12 size {w}×{h} is odd"));
            }
            need(f, s * h + s * h / 2, w)?;
            let uv = &f.data[s * h..];
            for y in 0..h {
                for x in 0..w {
                    let luma = f.data[y * s + x];
                    let c = (y / 2) * s + (x / 2) * 2;
                    let rgb = yuv_to_rgb(luma, uv[c], uv[c + 1], f.full_range);
                    out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&rgb);
                }
            }
        }
        PixelFormat::Grey => {
            need(f, s * (h - 1) + w, w)?;
            for y in 0..h {
                for x in 0..w {
                    let g = f.data[y * s + x];
                    out[(y * w + x) * 3..(y * w + x) * 3 + 3].fill(g);
                }
            }
        }
        PixelFormat::Rgb24 => {
            need(f, s * (h - 1) + 3 * w, 3 * w)?;
            for y in 0..h {
                out[y * w * 3..(y + 1) * w * 3].copy_from_slice(&f.data[y * s..y * s + 3 * w]);
            }
        }
        PixelFormat::Mjpeg => return decode_mjpeg(f.data),
    }
    Ok(Rgb8 {
        width: w,
        height: h,
        data: out,
    })
}

/// The standard Huffman tables (JPEG spec Annex K.3) as one DHT segment: many UVC cameras omit
/// them from MJPEG frames and rely on the decoder to supply these.
const STANDARD_DHT: [u8; 420] = {
    const DC_BITS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    const DC_VALS: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    const DC_C_BITS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    const AC_BITS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
    const AC_C_BITS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
    #[rustfmt::skip]
    const AC_VALS: [u8; 162] = [
        0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
        0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0,
        0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28,
        0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
        0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
        0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
        0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
        0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5,
        0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2,
        0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
        0xf9, 0xfa,
    ];
    #[rustfmt::skip]
    const AC_C_VALS: [u8; 162] = [
        0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
        0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33, 0x52, 0xf0,
        0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26,
        0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
        0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
        0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
        0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5,
        0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3,
        0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda,
        0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
        0xf9, 0xfa,
    ];
    let mut seg = [0u8; 420];
    seg[0] = 0xFF;
    seg[1] = 0xC4;
    seg[2] = (418 >> 8) as u8;
    seg[3] = (418 & 0xFF) as u8;
    let mut at = 4;
    // (class/id, bits, values): luminance DC, chrominance DC, luminance AC, chrominance AC.
    let tables: [(u8, &[u8; 16], &[u8]); 4] = [
        (0x00, &DC_BITS, &DC_VALS),
        (0x01, &DC_C_BITS, &DC_VALS),
        (0x10, &AC_BITS, &AC_VALS),
        (0x11, &AC_C_BITS, &AC_C_VALS),
    ];
    let mut t = 0;
    while t < 4 {
        let (id, bits, vals) = tables[t];
        seg[at] = id;
        at += 1;
        let mut i = 0;
        while i < 16 {
            seg[at] = bits[i];
            at += 1;
            i += 1;
        }
        let mut j = 0;
        while j < vals.len() {
            seg[at] = vals[j];
            at += 1;
            j += 1;
        }
        t += 1;
    }
    seg
};

/// Insert the standard Huffman tables before the first SOS when the frame has no DHT segment.
fn with_huffman_tables(jpeg: &[u8]) -> Option<Vec<u8>> {
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return None;
        }
        let marker = jpeg[i + 1];
        if marker == 0xC4 {
            return None; // has tables
        }
        if marker == 0xDA {
            let mut out = Vec::with_capacity(jpeg.len() + STANDARD_DHT.len());
            out.extend_from_slice(&jpeg[..i]);
            out.extend_from_slice(&STANDARD_DHT);
            out.extend_from_slice(&jpeg[i..]);
            return Some(out);
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        i += 2 + len;
    }
    None
}

fn decode_mjpeg(data: &[u8]) -> Result<Rgb8, String> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return Err("MJPEG frame without the JPEG start marker FF D8".into());
    }
    edge_ad::preprocess::jpeg_complete(data).map_err(|e| format!("MJPEG frame: {e}"))?;
    let fixed = with_huffman_tables(data);
    let bytes = fixed.as_deref().unwrap_or(data);
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
        .map_err(|e| format!("MJPEG frame: {e}"))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok(Rgb8 {
        width: w as usize,
        height: h as usize,
        data: img.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flat colours through the float formula of line-side.md §2.3, within 1.
    #[test]
    fn integer_conversion_matches_the_bt601_formula() {
        for (y, u, v) in [
            (16u8, 128u8, 128u8),
            (235, 128, 128),
            (81, 90, 240),
            (145, 54, 34),
            (41, 240, 110),
            (128, 16, 16),
        ] {
            let (c, d, e) = (y as f64 - 16.0, u as f64 - 128.0, v as f64 - 128.0);
            let want = [
                1.164384 * c + 1.596027 * e,
                1.164384 * c - 0.391762 * d - 0.812968 * e,
                1.164384 * c + 2.017232 * d,
            ];
            let got = yuv_to_rgb(y, u, v, false);
            for k in 0..3 {
                let w = want[k].round().clamp(0.0, 255.0);
                assert!(
                    (got[k] as f64 - w).abs() <= 1.0,
                    "{y},{u},{v}: {got:?} vs {want:?}"
                );
            }
        }
        assert_eq!(yuv_to_rgb(16, 128, 128, false), [0, 0, 0]);
        assert_eq!(yuv_to_rgb(235, 128, 128, false), [255, 255, 255]);
        assert_eq!(yuv_to_rgb(200, 128, 128, true), [200, 200, 200]);
    }

    #[test]
    fn padded_rows_and_short_frames() {
        // 2×2 YUYV with 8 bytes of padding per row.
        let mut data = vec![0u8; 2 * 12];
        for row in 0..2 {
            data[row * 12..row * 12 + 4].copy_from_slice(&[235, 128, 16, 128]);
        }
        let f = RawFrame {
            format: PixelFormat::Yuyv,
            width: 2,
            height: 2,
            stride: 12,
            data: &data,
            full_range: false,
        };
        let rgb = to_rgb(&f).unwrap();
        assert_eq!(&rgb.data[..6], &[255, 255, 255, 0, 0, 0]);
        assert_eq!(&rgb.data[6..12], &[255, 255, 255, 0, 0, 0]);
        let short = RawFrame {
            data: &data[..20],
            ..f
        };
        assert!(to_rgb(&short).unwrap_err().contains("short"));
        let g = [7u8, 8, 0, 0, 9, 10];
        let grey = RawFrame {
            format: PixelFormat::Grey,
            width: 2,
            height: 2,
            stride: 4,
            data: &g,
            full_range: false,
        };
        assert_eq!(
            to_rgb(&grey).unwrap().data,
            vec![7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10, 10]
        );
        let bad = RawFrame {
            format: PixelFormat::Mjpeg,
            width: 0,
            height: 0,
            stride: 0,
            data: &[0, 1, 2, 3],
            full_range: false,
        };
        assert!(to_rgb(&bad).unwrap_err().contains("FF D8"));
    }

    #[test]
    fn standard_tables_segment_is_well_formed() {
        assert_eq!(&STANDARD_DHT[..4], &[0xFF, 0xC4, 0x01, 0xA2]);
        // Table headers at the expected offsets: 4, 4+17+12, 4+2·29, 4+2·29+17+162.
        assert_eq!(STANDARD_DHT[4], 0x00);
        assert_eq!(STANDARD_DHT[33], 0x01);
        assert_eq!(STANDARD_DHT[62], 0x10);
        assert_eq!(STANDARD_DHT[241], 0x11);
    }
}
