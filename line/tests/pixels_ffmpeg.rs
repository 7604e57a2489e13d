//! Camera pixel formats against ffmpeg (imageio-ffmpeg's static build in the `.venv`): a real image
//! made into YUYV, NV12 (BT.601 limited range, as UVC cameras deliver), GREY and MJPEG frames by
//! ffmpeg, converted back by ffmpeg as the reference and by edge-ad; also the MJPEG frame with its
//! Huffman tables stripped (cameras omit them and use the standard tables, so the frame is encoded
//! with `-huffman default`).

use edge_ad_line::pixels::{to_rgb, PixelFormat, RawFrame};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The test venv's Python (tools/setup.sh), or `None` with a SKIPPED line outside CI.
fn venv_python() -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    if py.is_file() {
        return Some(py);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        ".venv missing in CI (tools/setup.sh creates it)"
    );
    eprintln!("SKIPPED: .venv not set up (run tools/setup.sh)");
    None
}

fn ffmpeg() -> Option<PathBuf> {
    let py = venv_python()?;
    let out = Command::new(&py)
        .args([
            "-c",
            "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imageio-ffmpeg missing from the .venv (tools/setup.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

fn ff(exe: &Path, args: &[&str]) {
    let o = Command::new(exe)
        .args(["-y", "-loglevel", "error"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Max and mean absolute difference.
fn diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.len() as f64)
}

fn strip_dht(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        let marker = jpeg[i + 1];
        if marker == 0xDA {
            out.extend_from_slice(&jpeg[i..]);
            break;
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if marker != 0xC4 {
            out.extend_from_slice(&jpeg[i..i + 2 + len]);
        }
        i += 2 + len;
    }
    out
}

#[test]
fn conversions_match_ffmpeg() {
    let Some(exe) = ffmpeg() else { return };
    let t = tempfile::tempdir().unwrap();
    let d = |n: &str| t.path().join(n).to_str().unwrap().to_string();
    let src = root().join("demo/images/test/stain/plate_00.png");
    let src = src.to_str().unwrap();
    let (w, h) = (320usize, 240usize);
    let size = format!("{w}x{h}");
    let tv = format!("scale={w}:{h}:out_color_matrix=bt601:out_range=tv");
    // The frame as the camera would deliver it, in each raw format.
    let encode = |pix_fmt: &str, vf: &str, out: &str| {
        ff(
            &exe,
            &[
                "-i",
                src,
                "-vf",
                vf,
                "-pix_fmt",
                pix_fmt,
                "-f",
                "rawvideo",
                &d(out),
            ],
        )
    };
    encode("yuyv422", &tv, "f.yuyv");
    encode("nv12", &tv, "f.nv12");
    encode("gray", &format!("scale={w}:{h}"), "f.grey");
    ff(
        &exe,
        &[
            "-i",
            src,
            "-vf",
            &format!("scale={w}:{h}"),
            "-frames:v",
            "1",
            "-c:v",
            "mjpeg",
            "-huffman",
            "default",
            "-q:v",
            "2",
            &d("f.mjpg"),
        ],
    );
    // Accurate rounding and full chroma interpolation in the reference: swscale's default fast
    // path is itself 1.8 levels off the BT.601 formula on average.
    let back =
        "scale=in_color_matrix=bt601:in_range=tv:flags=accurate_rnd+full_chroma_int+bitexact";
    // ffmpeg's RGB of each raw frame: the reference.
    let decode = |pix_fmt: &str, input: &str, out: &str| {
        ff(
            &exe,
            &[
                "-f",
                "rawvideo",
                "-pix_fmt",
                pix_fmt,
                "-s",
                &size,
                "-i",
                &d(input),
                "-vf",
                back,
                "-pix_fmt",
                "rgb24",
                "-f",
                "rawvideo",
                &d(out),
            ],
        )
    };
    decode("yuyv422", "f.yuyv", "ref_yuyv.rgb");
    decode("nv12", "f.nv12", "ref_nv12.rgb");
    ff(
        &exe,
        &[
            "-f",
            "rawvideo",
            "-pix_fmt",
            "gray",
            "-s",
            &size,
            "-i",
            &d("f.grey"),
            "-pix_fmt",
            "rgb24",
            "-f",
            "rawvideo",
            &d("ref_grey.rgb"),
        ],
    );
    ff(
        &exe,
        &[
            "-i",
            &d("f.mjpg"),
            "-pix_fmt",
            "rgb24",
            "-f",
            "rawvideo",
            &d("ref_mjpg.rgb"),
        ],
    );
    let read = |n: &str| std::fs::read(t.path().join(n)).unwrap();
    let mjpg = read("f.mjpg");
    let stripped = strip_dht(&mjpg);
    assert!(stripped.len() < mjpg.len() && !stripped.windows(2).any(|x| x == [0xFF, 0xC4]));
    let cases = [
        (
            "YUYV",
            PixelFormat::Yuyv,
            2 * w,
            read("f.yuyv"),
            "ref_yuyv.rgb",
            3,
            1.0,
        ),
        (
            "NV12",
            PixelFormat::Nv12,
            w,
            read("f.nv12"),
            "ref_nv12.rgb",
            3,
            1.0,
        ),
        (
            "GREY",
            PixelFormat::Grey,
            w,
            read("f.grey"),
            "ref_grey.rgb",
            0,
            0.0,
        ),
        (
            "MJPEG",
            PixelFormat::Mjpeg,
            0,
            mjpg,
            "ref_mjpg.rgb",
            255,
            1.5,
        ),
        (
            "MJPEG without DHT",
            PixelFormat::Mjpeg,
            0,
            stripped,
            "ref_mjpg.rgb",
            255,
            1.5,
        ),
    ];
    for (name, format, stride, data, reference, max_ok, mean_ok) in cases {
        let frame = RawFrame {
            format,
            width: w,
            height: h,
            stride,
            data: &data,
            full_range: false,
        };
        let rgb = to_rgb(&frame).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((rgb.width, rgb.height), (w, h));
        let (max, mean) = diff(&rgb.data, &read(reference));
        println!("{name}: max |Δ| {max}, mean |Δ| {mean:.3} against ffmpeg");
        assert!(
            max <= max_ok && mean <= mean_ok,
            "{name}: max {max} mean {mean}"
        );
    }
}
