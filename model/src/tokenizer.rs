//! The OPT tokenizer (GPT-2 byte-level BPE), producing OPT ids: `</s>` (2) first.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::ModelError;

/// OPT's beginning-of-sequence id: `</s>`, prepended to every encoded text.
pub const OPT_BOS: u32 = 2;

pub struct OptTokenizer {
    inner: Tokenizer,
    bos: u32,
    source: PathBuf,
}

impl std::fmt::Debug for OptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OptTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl OptTokenizer {
    /// Loads `tokenizer.json` from a model folder, or else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_merges(&vocab, &merges);
        }
        Err(ModelError::Tokenizer {
            path: dir.to_path_buf(),
            message: "no tokenizer.json, nor vocab.json + merges.txt".into(),
        })
    }

    /// Loads a `tokenizers` JSON file.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Self {
            inner,
            bos: OPT_BOS,
            source: path.to_path_buf(),
        })
    }

    /// Builds the GPT-2 byte-level BPE from OPT's `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self, ModelError> {
        let fail = |message: String| ModelError::Tokenizer {
            path: vocab.to_path_buf(),
            message,
        };
        let bpe = BPE::from_file(
            &vocab.to_string_lossy(),
            &merges.to_string_lossy(),
        )
        .build()
        .map_err(|e| fail(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = ["<s>", "<pad>", "</s>", "<unk>"]
            .into_iter()
            .map(|t| AddedToken::from(t, true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            inner,
            bos: OPT_BOS,
            source: vocab.to_path_buf(),
        })
    }

    /// Token ids of `text` with `</s>` prepended, as OPT was trained.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = vec![self.bos];
        ids.extend(self.encode_plain(text)?);
        Ok(ids)
    }

    /// Token ids of `text` alone (for continuations appended to an encoded prefix).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                message: format!("cannot encode: {e}"),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens (`</s>`, `<pad>`, …) are dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.source.clone(),
                message: format!("cannot decode: {e}"),
            })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
