//! The OPT tokenizer: the ids `../shared/README.md` gives, round trips, and the
//! vocab.json + merges.txt path agreeing with tokenizer.json.

mod common;

use common::{fixtures, repo_root};
use dejavu_model::OptTokenizer;

fn bundled() -> OptTokenizer {
    OptTokenizer::from_dir(&repo_root().join("assets/opt-mini")).unwrap()
}

const TEXTS: [&str; 5] = [
    "Hello world",
    "The capital of France is",
    " leading space and  double  spaces\n\nand a blank line",
    "naïve café — 東京 🙂 (unicode)",
    " = Robert Boulter = \n Robert Boulter is an English film and television actor .",
];

#[test]
fn encodes_opt_ids_with_bos() {
    let t = bundled();
    assert_eq!(t.encode("Hello world").unwrap(), vec![2, 31414, 232]);
    assert_eq!(
        t.encode("The capital of France is").unwrap(),
        vec![2, 133, 812, 9, 1470, 16]
    );
    assert_eq!(t.vocab_size(), 50265);
}

#[test]
fn decode_round_trips() {
    let t = bundled();
    for text in TEXTS {
        let ids = t.encode(text).unwrap();
        assert_eq!(ids[0], 2);
        assert_eq!(t.decode(&ids).unwrap(), text, "{ids:?}");
    }
}

#[test]
fn vocab_and_merges_match_tokenizer_json() {
    let dir = fixtures().join("tokenizer");
    let from_files =
        OptTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    let from_json = bundled();
    for text in TEXTS {
        let ids = from_json.encode(text).unwrap();
        assert_eq!(from_files.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(from_files.decode(&ids).unwrap(), text);
    }
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = OptTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no tokenizer.json"), "{err}");
}
