//! Finding image files: directories are walked recursively, entries sorted by path, only files
//! with an image extension kept (so masks, READMEs and hidden files in a data folder do not count).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// File extensions read as images (lower-case).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// True when `path` has an image extension.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files under `root` (or `root` itself when it is a file), sorted.
pub fn list_images(root: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if meta.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let p = entry.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
            {
                continue;
            }
            let ft = entry.file_type().map_err(|e| Error::io(&p, e))?;
            if ft.is_dir() {
                stack.push(p);
            } else if is_image(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_recursively_sorted_images_only() {
        let d = std::env::temp_dir().join(format!("edge-ad-images-{}", std::process::id()));
        std::fs::create_dir_all(d.join("sub")).unwrap();
        for f in ["b.png", "a.JPG", "notes.txt", ".hidden.png", "sub/c.bmp"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let got: Vec<String> = list_images(&d)
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(&d).unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(got, ["a.JPG", "b.png", "sub/c.bmp"]);
        std::fs::remove_dir_all(&d).unwrap();
        assert!(list_images(&d).is_err());
    }
}
