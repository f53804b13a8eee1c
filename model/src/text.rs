//! Reading text files to score.

use std::path::Path;

use crate::error::ModelError;

/// Reads a UTF-8 text file with line endings normalized to `\n` (`\r\n` and lone `\r`),
/// as Python's text mode reads it: evaluation text is the same string whichever platform
/// wrote the file (the WikiText-2 copy in the shared assets has CRLF endings; read raw it
/// tokenizes to 303,607 tokens instead of the reference 287,645). A name ending in `.xz`
/// is decompressed (the shared corpus splits are xz). An empty or whitespace-only file is
/// an error.
pub fn read_text(path: &Path) -> Result<String, ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = if path.extension().is_some_and(|e| e == "xz") {
        use std::io::Read;
        let mut bytes = Vec::new();
        liblzma::read::XzDecoder::new(std::fs::File::open(path).map_err(io)?)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        bytes
    } else {
        std::fs::read(path).map_err(io)?
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        ModelError::InvalidInput(format!("{} is not UTF-8 text: {e}", path.display()))
    })?;
    if text.trim().is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "{} is empty: there is no text to score",
            path.display()
        )));
    }
    Ok(normalize_newlines(&text))
}

/// `\r\n` → `\n`, then lone `\r` → `\n`.
pub fn normalize_newlines(text: &str) -> String {
    if !text.contains('\r') {
        return text.to_string();
    }
    text.replace("\r\n", "\n").replace('\r', "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_are_normalized_like_python_text_mode() {
        assert_eq!(normalize_newlines("a\r\n\r\nb\rc\n"), "a\n\nb\nc\n");
        assert_eq!(normalize_newlines("plain\n"), "plain\n");
    }

    #[test]
    fn empty_and_non_utf8_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("dejavu-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, " \r\n").unwrap();
        assert!(read_text(&empty).unwrap_err().to_string().contains("empty.txt is empty"));
        let binary = dir.join("bin.txt");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        assert!(read_text(&binary).unwrap_err().to_string().contains("not UTF-8"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
