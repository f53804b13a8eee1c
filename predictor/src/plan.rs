//! The [`SparsityPlan`]: for every layer, how the sparse path picks MLP neurons and
//! attention heads (top-K, a logit threshold, or dense), made from a calibrated
//! `predictors.json` and a named operating point.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::artifact::{Manifest, OutputEntry};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("the predictors were trained for another model: {0}")]
    ModelMismatch(String),
    #[error("{0}")]
    Invalid(String),
}

/// How one block of one layer is selected.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Selection {
    /// Every neuron or head: the dense block.
    Dense,
    /// The `k` outputs with the highest logits, per token.
    TopK { k: usize },
    /// Every output whose logit exceeds `threshold` (a varying number per token).
    Threshold { threshold: f32 },
}

impl Selection {
    pub fn is_dense(&self) -> bool {
        matches!(self, Selection::Dense)
    }

    /// Fraction of `width` outputs kept, where it is fixed (not for thresholds).
    pub fn fixed_density(&self, width: usize) -> Option<f64> {
        match self {
            Selection::Dense => Some(1.0),
            Selection::TopK { k } => Some(*k as f64 / width as f64),
            Selection::Threshold { .. } => None,
        }
    }
}

/// One layer of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    pub mlp: Selection,
    pub attention: Selection,
}

/// A named way of choosing every layer's selection from the calibrated manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum OperatingPoint {
    /// Top-K with each layer's calibrated K: the smallest K that reached the target recall
    /// (0.99 by default) on the validation rows.
    Calibrated,
    /// Each layer's calibrated logit threshold (same recall target; the number kept varies
    /// per token).
    Threshold,
    /// Top-K with `K = ceil(fraction × width)` in every sparse layer; a kind left out keeps
    /// its calibrated K.
    Density { mlp: Option<f64>, attention: Option<f64> },
    /// Top-K with each layer's calibrated K times `factor` (rounded up): the calibrated
    /// per-layer shape, made sparser or denser.
    Scaled { factor: f64 },
}

impl fmt::Display for OperatingPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OperatingPoint::Calibrated => write!(f, "calibrated"),
            OperatingPoint::Threshold => write!(f, "threshold"),
            OperatingPoint::Scaled { factor } => write!(f, "scale={factor}"),
            OperatingPoint::Density { mlp, attention } => {
                let parts: Vec<String> = [("mlp", mlp), ("attention", attention)]
                    .iter()
                    .filter_map(|(name, v)| v.map(|v| format!("{name}={v}")))
                    .collect();
                write!(f, "{}", parts.join(","))
            }
        }
    }
}

impl FromStr for OperatingPoint {
    type Err = PlanError;

    /// `calibrated`, `threshold`, `scale=F`, or densities such as `mlp=0.1,attention=0.5`.
    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s.trim() {
            "calibrated" => return Ok(OperatingPoint::Calibrated),
            "threshold" => return Ok(OperatingPoint::Threshold),
            _ => {}
        }
        if let Some(factor) = s.trim().strip_prefix("scale=") {
            return match factor.trim().parse::<f64>() {
                Ok(factor) if factor > 0.0 && factor.is_finite() => Ok(OperatingPoint::Scaled { factor }),
                _ => Err(PlanError::Invalid(format!("operating point {s:?}: the scale must be a positive number"))),
            };
        }
        let (mut mlp, mut attention) = (None, None);
        for part in s.split(',') {
            let bad = || {
                PlanError::Invalid(format!(
                    "operating point {s:?}: expected calibrated, threshold, scale=F or densities \
                     like mlp=0.1,attention=0.5"
                ))
            };
            let (key, value) = part.trim().split_once('=').ok_or_else(bad)?;
            let value: f64 = value.trim().parse().map_err(|_| bad())?;
            if !(value > 0.0 && value <= 1.0) {
                return Err(PlanError::Invalid(format!(
                    "operating point {s:?}: density {value} is not in (0, 1]"
                )));
            }
            match key.trim() {
                "mlp" => mlp = Some(value),
                "attention" => attention = Some(value),
                _ => return Err(bad()),
            }
        }
        Ok(OperatingPoint::Density { mlp, attention })
    }
}

/// The widths a plan is made for; compared with the model the plan is used on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
}

/// Per layer, how the sparse path selects neurons and heads. Layers whose predictor is
/// missing from the manifest (layer 0 under lookahead 1, whose input does not exist) and
/// layers named dense stay dense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparsityPlan {
    pub model_hash: String,
    pub dims: ModelDims,
    pub lookahead: usize,
    pub operating_point: String,
    pub layers: Vec<LayerPlan>,
}

/// Layers to keep dense on top of those without a predictor (the reference keeps the last
/// layers' MLP dense on OPT-66B/175B).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DenseLayers {
    pub mlp: Vec<usize>,
    pub attention: Vec<usize>,
}

fn select(
    entry: &Option<OutputEntry>,
    point: &OperatingPoint,
    density: Option<f64>,
    width: usize,
    kind: &str,
    layer: usize,
) -> Result<Selection, PlanError> {
    let Some(entry) = entry else { return Ok(Selection::Dense) };
    let missing = |what: &str| {
        PlanError::Invalid(format!(
            "layer {layer} {kind} predictor has no calibrated {what} in predictors.json (was it calibrated?)"
        ))
    };
    let calibrated_k = || entry.k.ok_or_else(|| missing("K"));
    let selection = match point {
        OperatingPoint::Calibrated => Selection::TopK { k: calibrated_k()? },
        OperatingPoint::Scaled { factor } => {
            Selection::TopK { k: ((calibrated_k()? as f64 * factor).ceil() as usize).clamp(1, width) }
        }
        OperatingPoint::Threshold => Selection::Threshold { threshold: entry.threshold.ok_or_else(|| missing("threshold"))? },
        OperatingPoint::Density { .. } => match density {
            Some(d) => Selection::TopK { k: ((d * width as f64).ceil() as usize).clamp(1, width) },
            None => Selection::TopK { k: calibrated_k()? },
        },
    };
    Ok(match selection {
        Selection::TopK { k } if k >= width => Selection::Dense,
        other => other,
    })
}

impl SparsityPlan {
    /// The plan of `point` over the calibrated predictors of `manifest`.
    pub fn new(manifest: &Manifest, point: &OperatingPoint, dense: &DenseLayers) -> Result<Self, PlanError> {
        let n = manifest.num_layers;
        for (kind, list) in [("MLP", &dense.mlp), ("attention", &dense.attention)] {
            if let Some(l) = list.iter().find(|&&l| l >= n) {
                return Err(PlanError::Invalid(format!("dense {kind} layer {l} does not exist (the model has {n} layers)")));
            }
        }
        let (mlp_density, attention_density) = match point {
            OperatingPoint::Density { mlp, attention } => (*mlp, *attention),
            _ => (None, None),
        };
        let layers = manifest
            .layers
            .iter()
            .map(|entry| {
                let l = entry.layer;
                let mlp = if dense.mlp.contains(&l) {
                    Selection::Dense
                } else {
                    select(&entry.mlp, point, mlp_density, manifest.ffn_dim, "mlp", l)?
                };
                let attention = if dense.attention.contains(&l) {
                    Selection::Dense
                } else {
                    select(&entry.attention, point, attention_density, manifest.num_heads, "attention", l)?
                };
                Ok(LayerPlan { mlp, attention })
            })
            .collect::<Result<Vec<_>, PlanError>>()?;
        let mut name = point.to_string();
        if !dense.mlp.is_empty() || !dense.attention.is_empty() {
            name += &format!(" (dense MLP {:?}, dense attention {:?})", dense.mlp, dense.attention);
        }
        Ok(Self {
            model_hash: manifest.model_hash.clone(),
            dims: ModelDims {
                hidden_size: manifest.hidden_size,
                ffn_dim: manifest.ffn_dim,
                num_heads: manifest.num_heads,
                num_layers: n,
            },
            lookahead: manifest.lookahead,
            operating_point: name,
            layers,
        })
    }

    /// An error naming what differs when the plan was made for another model: its content
    /// hash or its widths.
    pub fn check_model(&self, model_hash: &str, dims: &ModelDims) -> Result<(), PlanError> {
        if self.dims != *dims {
            return Err(PlanError::ModelMismatch(format!(
                "they expect {:?}, the model has {:?}",
                self.dims, dims
            )));
        }
        if self.model_hash != model_hash {
            return Err(PlanError::ModelMismatch(format!(
                "they were trained for the model with hash {}, this model hashes to {model_hash}",
                self.model_hash
            )));
        }
        Ok(())
    }

    /// Mean over all layers of the fraction of MLP neurons kept (dense layers count 1),
    /// where it is fixed; `None` when some layer selects by threshold.
    pub fn mlp_density(&self) -> Option<f64> {
        self.mean(|l| l.mlp.fixed_density(self.dims.ffn_dim))
    }

    /// As [`SparsityPlan::mlp_density`], for heads.
    pub fn attention_density(&self) -> Option<f64> {
        self.mean(|l| l.attention.fixed_density(self.dims.num_heads))
    }

    fn mean(&self, f: impl Fn(&LayerPlan) -> Option<f64>) -> Option<f64> {
        let values: Option<Vec<f64>> = self.layers.iter().map(f).collect();
        values.map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64)
    }

    /// True when no layer is sparse (the plan is the dense model).
    pub fn is_dense(&self) -> bool {
        self.layers.iter().all(|l| l.mlp.is_dense() && l.attention.is_dense())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::LayerEntry;

    fn manifest() -> Manifest {
        let entry = |k, outputs: usize| OutputEntry {
            rank: 4,
            k: Some(k),
            threshold: Some(-1.5),
            recall: Some(0.99),
            density: Some(k as f64 / outputs as f64),
            threshold_recall: None,
            threshold_density: None,
            true_density: None,
        };
        Manifest {
            format: 1,
            model_hash: "sha256:abc".into(),
            hidden_size: 8,
            ffn_dim: 32,
            num_heads: 4,
            num_layers: 3,
            lookahead: 1,
            layers: vec![
                LayerEntry { layer: 0, mlp: None, attention: None },
                LayerEntry { layer: 1, mlp: Some(entry(5, 32)), attention: Some(entry(3, 4)) },
                LayerEntry { layer: 2, mlp: Some(entry(9, 32)), attention: Some(entry(4, 4)) },
            ],
        }
    }

    #[test]
    fn operating_points_parse_and_print() {
        assert_eq!("calibrated".parse::<OperatingPoint>().unwrap(), OperatingPoint::Calibrated);
        assert_eq!("threshold".parse::<OperatingPoint>().unwrap(), OperatingPoint::Threshold);
        let p: OperatingPoint = "mlp=0.1, attention=0.5".parse().unwrap();
        assert_eq!(p, OperatingPoint::Density { mlp: Some(0.1), attention: Some(0.5) });
        assert_eq!(p.to_string(), "mlp=0.1,attention=0.5");
        assert_eq!("scale=0.5".parse::<OperatingPoint>().unwrap(), OperatingPoint::Scaled { factor: 0.5 });
        for bad in ["mlp=0", "mlp=1.5", "neurons=0.1", "fast", "mlp=x", "scale=-1", "scale=x"] {
            assert!(bad.parse::<OperatingPoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn calibrated_plan_uses_k_and_keeps_unpredicted_layers_dense() {
        let plan = SparsityPlan::new(&manifest(), &OperatingPoint::Calibrated, &DenseLayers::default()).unwrap();
        assert_eq!(plan.layers[0], LayerPlan { mlp: Selection::Dense, attention: Selection::Dense });
        assert_eq!(plan.layers[1], LayerPlan { mlp: Selection::TopK { k: 5 }, attention: Selection::TopK { k: 3 } });
        // K equal to the width is the dense block.
        assert_eq!(plan.layers[2].attention, Selection::Dense);
        assert!((plan.mlp_density().unwrap() - (1.0 + 5.0 / 32.0 + 9.0 / 32.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn density_threshold_and_dense_layers() {
        let point: OperatingPoint = "mlp=0.25".parse().unwrap();
        let dense = DenseLayers { mlp: vec![2], attention: vec![] };
        let plan = SparsityPlan::new(&manifest(), &point, &dense).unwrap();
        assert_eq!(plan.layers[1].mlp, Selection::TopK { k: 8 });
        assert_eq!(plan.layers[1].attention, Selection::TopK { k: 3 }, "attention keeps its calibrated K");
        assert_eq!(plan.layers[2].mlp, Selection::Dense);
        let plan = SparsityPlan::new(&manifest(), &OperatingPoint::Scaled { factor: 0.5 }, &DenseLayers::default()).unwrap();
        assert_eq!(plan.layers[1].mlp, Selection::TopK { k: 3 }, "ceil(5 × 0.5)");
        assert_eq!(plan.layers[2].attention, Selection::TopK { k: 2 });
        let plan = SparsityPlan::new(&manifest(), &OperatingPoint::Threshold, &DenseLayers::default()).unwrap();
        assert_eq!(plan.layers[1].mlp, Selection::Threshold { threshold: -1.5 });
        assert_eq!(plan.mlp_density(), None);
        let err = SparsityPlan::new(&manifest(), &point, &DenseLayers { mlp: vec![3], attention: vec![] });
        assert!(err.unwrap_err().to_string().contains("layer 3 does not exist"));
    }

    #[test]
    fn another_model_is_refused() {
        let plan = SparsityPlan::new(&manifest(), &OperatingPoint::Calibrated, &DenseLayers::default()).unwrap();
        let dims = plan.dims;
        assert!(plan.check_model("sha256:abc", &dims).is_ok());
        let err = plan.check_model("sha256:def", &dims).unwrap_err().to_string();
        assert!(err.contains("sha256:abc") && err.contains("sha256:def"), "{err}");
        let err = plan.check_model("sha256:abc", &ModelDims { num_layers: 4, ..dims }).unwrap_err();
        assert!(matches!(err, PlanError::ModelMismatch(_)));
    }
}
