//! Calibration text: a stream of documents from a `.txt`, `.txt.xz` or JSON-lines file.
//!
//! Plain text (optionally xz-compressed) separates documents by two blank lines (three
//! newlines in a row), as the shared corpus does; paragraphs inside a document keep their
//! single blank lines. JSON lines (`.jsonl`, `.json`, optionally `.xz`) hold one document
//! per line, either a JSON string or an object with a `"text"` field. Line endings are
//! normalized to `\n` and blank documents are skipped, so document indices count only
//! documents with text.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::TrainError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    JsonLines,
}

/// Reads documents one at a time; the file is streamed, never held whole.
pub struct Documents {
    path: PathBuf,
    format: Format,
    lines: std::io::Lines<BufReader<Box<dyn Read>>>,
    line_number: usize,
    done: bool,
}

impl std::fmt::Debug for Documents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Documents").field("path", &self.path).field("format", &self.format).finish()
    }
}

/// Opens `path`; the format follows from its name (`.txt`, `.txt.xz`, `.jsonl`,
/// `.jsonl.xz`, `.json`). Anything else is an error naming the file.
pub fn open_documents(path: &Path) -> Result<Documents, TrainError> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let (stem, compressed) = match name.strip_suffix(".xz") {
        Some(stem) => (stem.to_string(), true),
        None => (name.clone(), false),
    };
    let format = if stem.ends_with(".txt") {
        Format::Text
    } else if stem.ends_with(".jsonl") || stem.ends_with(".json") {
        Format::JsonLines
    } else {
        return Err(TrainError::Input {
            path: path.to_path_buf(),
            what: "unknown text format: expected .txt, .txt.xz, .jsonl, .jsonl.xz or .json".into(),
        });
    };
    let file = File::open(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
    let reader: Box<dyn Read> = if compressed {
        Box::new(liblzma::read::XzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok(Documents {
        path: path.to_path_buf(),
        format,
        lines: BufReader::with_capacity(1 << 20, reader).lines(),
        line_number: 0,
        done: false,
    })
}

impl Documents {
    fn next_line(&mut self) -> Option<Result<String, TrainError>> {
        let line = self.lines.next()?;
        self.line_number += 1;
        Some(line.map_err(|e| TrainError::Input {
            path: self.path.clone(),
            what: format!("line {}: {e} (truncated or corrupt file?)", self.line_number),
        }))
    }

    fn next_text_document(&mut self) -> Option<Result<String, TrainError>> {
        let mut doc = String::new();
        let mut blank_run = 0usize;
        loop {
            let line = match self.next_line() {
                None => break,
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(line)) => line,
            };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                blank_run += 1;
                if blank_run >= 2 && !doc.trim().is_empty() {
                    return Some(Ok(doc.trim_end().to_string()));
                }
                continue;
            }
            if !doc.is_empty() {
                // A single blank line between paragraphs is kept as one.
                doc.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
            }
            blank_run = 0;
            doc.push_str(line);
        }
        self.done = true;
        (!doc.trim().is_empty()).then(|| Ok(doc.trim_end().to_string()))
    }

    fn next_json_document(&mut self) -> Option<Result<String, TrainError>> {
        loop {
            let line = match self.next_line()? {
                Err(e) => return Some(Err(e)),
                Ok(line) => line,
            };
            if line.trim().is_empty() {
                continue;
            }
            let bad = |what: String| TrainError::Input { path: self.path.clone(), what: format!("line {}: {what}", self.line_number) };
            let value: serde_json::Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => return Some(Err(bad(format!("not JSON: {e}")))),
            };
            let text = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Object(mut map) => match map.remove("text") {
                    Some(serde_json::Value::String(s)) => s,
                    _ => return Some(Err(bad("a JSON object without a string field \"text\"".into()))),
                },
                _ => return Some(Err(bad("expected a JSON string or an object with \"text\"".into()))),
            };
            let text = dejavu_model::text::normalize_newlines(&text);
            if !text.trim().is_empty() {
                return Some(Ok(text));
            }
        }
    }
}

impl Iterator for Documents {
    type Item = Result<String, TrainError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = match self.format {
            Format::Text => self.next_text_document(),
            Format::JsonLines => self.next_json_document(),
        };
        if next.is_none() {
            self.done = true;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(path: &Path) -> Vec<String> {
        open_documents(path).unwrap().map(|d| d.unwrap()).collect()
    }

    #[test]
    fn text_documents_split_on_two_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(&path, "a1\r\n\r\na2\n\n\nb1\nb2\n\n\n\n\nc\n").unwrap();
        assert_eq!(docs(&path), vec!["a1\n\na2", "b1\nb2", "c"]);
    }

    #[test]
    fn json_lines_take_strings_and_text_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(&path, "\"one\"\n{\"text\": \"two\", \"id\": 3}\n\n{\"text\": \"  \"}\n").unwrap();
        assert_eq!(docs(&path), vec!["one", "two"]);
        std::fs::write(&path, "{\"body\": 1}\n").unwrap();
        let err = open_documents(&path).unwrap().next().unwrap().unwrap_err().to_string();
        assert!(err.contains("c.jsonl") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn xz_text_is_streamed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt.xz");
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 6);
        std::io::Write::write_all(&mut enc, b"x\n\n\ny\n").unwrap();
        std::fs::write(&path, enc.finish().unwrap()).unwrap();
        assert_eq!(docs(&path), vec!["x", "y"]);
        let bad = dir.path().join("c.csv");
        std::fs::write(&bad, "x").unwrap();
        assert!(open_documents(&bad).unwrap_err().to_string().contains("unknown text format"));
    }
}
