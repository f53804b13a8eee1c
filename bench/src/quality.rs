//! `dejavu-bench quality`: what sparsity costs in quality, on one model with its trained
//! predictors. Perplexity of WikiText-2 test and of the corpus valid split, dense and across
//! sparsity levels (MLP alone, attention alone, named operating points, optionally the
//! oracle MLP), then the zero-shot tasks dense against one operating point. Every token is
//! sparse (the masked path, equal to the kernels token by token; see
//! `dejavu_model::sparse`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use dejavu_runtime::{dispatch, tasks_or_all, BackendKind, BackendTask, Precision, SparseKernels, TaskArg};
use dejavu_model::zeroshot::{self, Task, TaskReport};
use dejavu_model::{
    generate, load_model, perplexity, Dense, GenerateOptions, Opt, OptTokenizer, PerplexityMethod,
    Sampling, SparseModel, SparseOptions,
};
use dejavu_predictor::{DenseLayers, OperatingPoint};
use serde::Serialize;
use serde_json::json;

use crate::report::{benchmark_json, commit, device_name, write_json};

#[derive(clap::Args, Debug, Clone)]
pub struct QualityArgs {
    /// Model folder [default: the bundled assets/opt-mini]
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Its predictor folder [default: the bundled assets/opt-mini-predictors]
    #[arg(long, value_name = "DIR")]
    predictors: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
    /// MLP densities to sweep (top-K of every sparse layer's neurons; attention dense;
    /// `--mlp-densities` with no value: none)
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0.02,0.04,0.06,0.08,0.1,0.15,0.2,0.3")]
    mlp_densities: Vec<f64>,
    /// Attention densities to sweep (top-K of every sparse layer's heads; MLP dense;
    /// `--attention-densities` with no value: none)
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0.25,0.5,0.75")]
    attention_densities: Vec<f64>,
    /// Named operating points, separated by `;` (see `dejavu perplexity --help`; `--points`
    /// with no value: none)
    #[arg(long, value_delimiter = ';', num_args = 0.., default_value = "calibrated;threshold;scale=0.5;scale=0.75;mlp=0.1,attention=0.5")]
    points: Vec<OperatingPoint>,
    /// Also the oracles at each density: the MLP's (true top-K pre-activations) and the
    /// attention's (the K heads of largest true output norm)
    #[arg(long)]
    oracle: bool,
    /// Operating points whose zero-shot accuracy is compared with dense, separated by `;`
    /// ("none": no zero-shot)
    #[arg(long, value_delimiter = ';', default_value = "calibrated")]
    zero_shot_points: Vec<String>,
    /// Skip the perplexity sweep (zero-shot only)
    #[arg(long)]
    skip_perplexity: bool,
    /// Also generate greedily from each line of this file, dense and through the sparse
    /// path at --generate-point (prompt dense, decode through the gathered kernels), and
    /// record the tokens: the cross-backend check compares them
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    #[arg(long, default_value = "calibrated")]
    generate_point: OperatingPoint,
    /// New tokens per prompt (</s> does not stop them)
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Zero-shot tasks (comma-separated) [default: all]
    #[arg(long, value_enum, value_delimiter = ',')]
    tasks: Vec<TaskArg>,
    /// Only the first N examples of each task
    #[arg(long, value_name = "N")]
    task_limit: Option<usize>,
    /// Texts to score [default: $DEJAVU_ASSETS/text/wikitext2-test.txt and corpus-valid.txt.xz]
    #[arg(long, value_delimiter = ',', value_name = "FILES")]
    texts: Vec<PathBuf>,
    /// Score only the first N tokens of each text
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Strided windows (Hugging Face guide): length
    #[arg(long, default_value_t = 1024)]
    window: usize,
    #[arg(long, default_value_t = 512)]
    stride: usize,
    /// Where to write the JSON [default: bench/results/quality-<model>-<backend>-<commit>.json]
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One configuration's perplexities.
#[derive(Debug, Serialize, Clone)]
struct Row {
    name: String,
    kind: &'static str,
    /// What the plan keeps: mean over all layers (dense layers count 1); `None` for
    /// thresholds (see `kept_*`).
    plan_mlp_density: Option<f64>,
    plan_attention_density: Option<f64>,
    /// What was kept per token, measured, mean over all layers.
    kept_mlp_density: f64,
    kept_attention_density: f64,
    /// The same over the layers that ran sparse only.
    kept_mlp_density_sparse_layers: Option<f64>,
    kept_attention_density_sparse_layers: Option<f64>,
    perplexity: Vec<f64>,
    /// perplexity / dense perplexity − 1, per text.
    relative: Vec<f64>,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct GenerationRow {
    prompt: String,
    prompt_tokens: Vec<u32>,
    dense_tokens: Vec<u32>,
    sparse_tokens: Vec<u32>,
    dense_text: String,
    sparse_text: String,
}

#[derive(Debug, Serialize)]
struct ZeroShotRow {
    point: String,
    task: Task,
    examples: usize,
    dense: TaskReport,
    sparse: TaskReport,
    difference: f64,
    /// |difference| ≤ 2·sqrt(se_dense² + se_sparse²): within noise.
    within_noise: bool,
}

struct QualityTask {
    args: QualityArgs,
    model_dir: PathBuf,
    predictors: PathBuf,
    texts: Vec<(PathBuf, Vec<u32>)>,
    tasks: Vec<(Task, Vec<zeroshot::Example>)>,
    zero_shot_points: Vec<OperatingPoint>,
    /// Rows so far are written here after each one, so a run cut short keeps them.
    partial: PathBuf,
    prompts: Vec<String>,
}

struct Config {
    name: String,
    kind: &'static str,
    point: Option<OperatingPoint>,
    /// Every layer's MLP (or attention) dense: sweeps one kind at a time.
    dense_mlp: bool,
    dense_attention: bool,
    oracle_mlp: bool,
    oracle_attention: bool,
}

impl Config {
    fn new(name: String, kind: &'static str, point: Option<OperatingPoint>) -> Self {
        Self { name, kind, point, dense_mlp: false, dense_attention: false, oracle_mlp: false, oracle_attention: false }
    }
}

fn mean_sparse(v: &[Option<f64>]) -> Option<f64> {
    let sparse: Vec<f64> = v.iter().flatten().copied().collect();
    (!sparse.is_empty()).then(|| sparse.iter().sum::<f64>() / sparse.len() as f64)
}

impl QualityTask {
    fn configs(&self) -> Vec<Config> {
        // The most telling rows first: a run cut short keeps them.
        let mut configs = vec![Config::new("dense".into(), "dense", None)];
        for p in &self.args.points {
            configs.push(Config::new(p.to_string(), "point", Some(p.clone())));
        }
        for &d in &self.args.mlp_densities {
            let point = OperatingPoint::Density { mlp: Some(d), attention: None };
            configs.push(Config { dense_attention: true, ..Config::new(format!("mlp={d}"), "mlp", Some(point)) });
        }
        for &d in &self.args.attention_densities {
            let point = OperatingPoint::Density { mlp: None, attention: Some(d) };
            configs.push(Config { dense_mlp: true, ..Config::new(format!("attention={d}"), "attention", Some(point)) });
        }
        if self.args.oracle {
            for &d in &self.args.mlp_densities {
                let point = OperatingPoint::Density { mlp: Some(d), attention: None };
                let name = format!("oracle mlp={d}");
                configs.push(Config { dense_attention: true, oracle_mlp: true, ..Config::new(name, "oracle", Some(point)) });
            }
            for &d in &self.args.attention_densities {
                let point = OperatingPoint::Density { mlp: None, attention: Some(d) };
                let name = format!("oracle attention={d}");
                configs.push(Config { dense_mlp: true, oracle_attention: true, ..Config::new(name, "oracle", Some(point)) });
            }
        }
        configs
    }
}

impl BackendTask for QualityTask {
    type Output = (Vec<Row>, Vec<ZeroShotRow>, Vec<GenerationRow>);

    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<Self::Output> {
        let (config, model) = load_model::<B>(&self.model_dir, self.args.dtype.dtype(), &device)
            .with_context(|| format!("loading the model from {}", self.model_dir.display()))?;
        let layers = config.num_hidden_layers;
        let method = PerplexityMethod::Strided { window: self.args.window, stride: self.args.stride };
        let sparse_model = |c: &Config, model: &Opt<B>| -> anyhow::Result<Option<SparseModel<B>>> {
            let Some(point) = &c.point else { return Ok(None) };
            let all = |yes: bool| if yes { (0..layers).collect() } else { Vec::new() };
            let dense = DenseLayers { mlp: all(c.dense_mlp), attention: all(c.dense_attention) };
            let options = SparseOptions { every_token: true, oracle_mlp: c.oracle_mlp, oracle_attention: c.oracle_attention, ..Default::default() };
            Ok(Some(SparseModel::load(model, &self.model_dir, &self.predictors, point, &dense, options)?))
        };
        let mut rows: Vec<Row> = Vec::new();
        let configs = if self.args.skip_perplexity { Vec::new() } else { self.configs() };
        for c in configs {
            let started = Instant::now();
            let sparse = sparse_model(&c, &model)?;
            // None: dense.
            let mut hooks = sparse.as_ref().map(|s| s.hooks());
            let mut perplexities = Vec::new();
            for (path, ids) in &self.texts {
                let report = perplexity(&model, &mut hooks, ids, method, |_, _| {})
                    .with_context(|| format!("{}: scoring {}", c.name, path.display()))?;
                perplexities.push(report.perplexity);
            }
            let stats = hooks.as_ref().map(|h| h.stats());
            let plan = sparse.as_ref().map(|s| s.plan());
            let dense_ppl = rows.first().map(|r| r.perplexity.clone()).unwrap_or_else(|| perplexities.clone());
            let row = Row {
                name: c.name.clone(),
                kind: c.kind,
                plan_mlp_density: plan.map_or(Some(1.0), |p| p.mlp_density()),
                plan_attention_density: plan.map_or(Some(1.0), |p| p.attention_density()),
                kept_mlp_density: stats.as_ref().map_or(1.0, |s| s.mean_mlp_density()),
                kept_attention_density: stats.as_ref().map_or(1.0, |s| s.mean_attention_density()),
                kept_mlp_density_sparse_layers: stats.as_ref().and_then(|s| mean_sparse(&s.mlp)),
                kept_attention_density_sparse_layers: stats.as_ref().and_then(|s| mean_sparse(&s.attention)),
                relative: perplexities.iter().zip(&dense_ppl).map(|(p, d)| p / d - 1.0).collect(),
                perplexity: perplexities,
                seconds: started.elapsed().as_secs_f64(),
            };
            eprintln!(
                "{:<28} MLP kept {:5.1}%  heads kept {:5.1}%  perplexity {:?}  ({:.1} s)",
                row.name,
                row.kept_mlp_density * 100.0,
                row.kept_attention_density * 100.0,
                row.perplexity.iter().map(|p| format!("{p:.3}")).collect::<Vec<_>>(),
                row.seconds
            );
            rows.push(row);
            write_json(&self.partial, &json!({ "rows": rows }))?;
        }

        let tokenizer = OptTokenizer::from_dir(&self.model_dir)?;
        let mut generations = Vec::new();
        if !self.prompts.is_empty() {
            // Prompt dense, decode sparse through the kernels: the latency path.
            let decode_sparse = SparseModel::load(
                &model,
                &self.model_dir,
                &self.predictors,
                &self.args.generate_point,
                &DenseLayers::default(),
                SparseOptions::default(),
            )?;
            let options = GenerateOptions { max_new_tokens: self.args.new_tokens, sampling: Sampling::Greedy, eos_token: None };
            for prompt in &self.prompts {
                let ids = tokenizer.encode(prompt)?;
                let dense = generate(&model, &mut Dense, &ids, &options, |_| true)?.tokens;
                let sparse = generate(&model, &mut decode_sparse.hooks(), &ids, &options, |_| true)?.tokens;
                eprintln!("{prompt:?}: sparse {:?} {sparse:?}", tokenizer.decode(&sparse)?);
                generations.push(GenerationRow {
                    prompt: prompt.clone(),
                    prompt_tokens: ids,
                    dense_text: tokenizer.decode(&dense)?,
                    sparse_text: tokenizer.decode(&sparse)?,
                    dense_tokens: dense,
                    sparse_tokens: sparse,
                });
                write_json(&self.partial, &json!({ "rows": rows, "generations": generations }))?;
            }
        }

        let mut zero_shot = Vec::new();
        let mut dense_reports: Vec<TaskReport> = Vec::new();
        for point in &self.zero_shot_points {
            let c = Config::new(point.to_string(), "point", Some(point.clone()));
            let sparse = sparse_model(&c, &model)?.expect("a point");
            for (i, (task, examples)) in self.tasks.iter().enumerate() {
                let started = Instant::now();
                if dense_reports.len() <= i {
                    dense_reports.push(zeroshot::evaluate(&model, &mut Dense, &tokenizer, *task, examples, |_| {})?);
                }
                let dense = dense_reports[i].clone();
                let mut hooks = sparse.hooks();
                let sparse = zeroshot::evaluate(&model, &mut hooks, &tokenizer, *task, examples, |_| {})?;
                let difference = sparse.accuracy - dense.accuracy;
                let noise = 2.0 * (dense.accuracy_stderr.powi(2) + sparse.accuracy_stderr.powi(2)).sqrt();
                eprintln!(
                    "{:<11} dense {:.4} ± {:.4}  {point} {:.4} ± {:.4}  ({:.1} s)",
                    task.name(),
                    dense.accuracy,
                    dense.accuracy_stderr,
                    sparse.accuracy,
                    sparse.accuracy_stderr,
                    started.elapsed().as_secs_f64()
                );
                zero_shot.push(ZeroShotRow {
                    point: point.to_string(),
                    task: *task,
                    examples: examples.len(),
                    within_noise: difference.abs() <= noise,
                    difference,
                    dense,
                    sparse,
                });
                write_json(&self.partial, &json!({ "rows": rows, "generations": generations, "zero_shot": zero_shot }))?;
            }
        }
        Ok((rows, zero_shot, generations))
    }
}

pub fn run(args: QualityArgs) -> anyhow::Result<()> {
    // CubeCL's default autotuning times every candidate for each new matmul shape (up to
    // ~40 s each on the H100), and perplexity's last window of each text is a new shape:
    // keep it minimal unless told otherwise. Quality does not depend on it.
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
        std::env::set_var("CUBECL_AUTOTUNE_LEVEL", "minimal");
    }
    let model_dir = dejavu_runtime::model_dir(args.model.as_deref())?;
    let predictors = args.predictors.clone().unwrap_or_else(dejavu_model::default_predictors_dir);
    let shared = dejavu_model::shared_assets_dir();
    let text_paths = if args.texts.is_empty() {
        vec![shared.join("text/wikitext2-test.txt"), shared.join("text/corpus-valid.txt.xz")]
    } else {
        args.texts.clone()
    };
    let tokenizer = OptTokenizer::from_dir(&model_dir)?;
    let mut texts = Vec::new();
    for path in text_paths {
        let text = dejavu_model::text::read_text(&path)?;
        let mut ids = tokenizer.encode(&text)?;
        if let Some(n) = args.max_tokens {
            ids.truncate(n);
        }
        texts.push((path, ids));
    }
    let zero_shot_points = args
        .zero_shot_points
        .iter()
        .filter(|p| p.as_str() != "none")
        .map(|p| p.parse::<OperatingPoint>())
        .collect::<Result<Vec<_>, _>>()?;
    let mut tasks = Vec::new();
    if !zero_shot_points.is_empty() {
        let names = tasks_or_all(&args.tasks);
        for t in names {
            let mut examples = t.load(&shared.join("tasks").join(t.file_name()))?;
            if let Some(n) = args.task_limit {
                examples.truncate(n);
            }
            tasks.push((t, examples));
        }
    }
    let text_names: Vec<String> = texts.iter().map(|(p, ids)| format!("{} ({} tokens)", p.display(), ids.len())).collect();
    let started = Instant::now();
    let commit = commit();
    let backend = format!("{:?}", args.backend).to_lowercase();
    let model_name = model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench/results/quality-{model_name}-{backend}-{commit}.json")));
    let partial = out.with_extension("partial.json");
    let task = QualityTask {
        args: args.clone(),
        model_dir: model_dir.clone(),
        predictors: predictors.clone(),
        texts,
        tasks,
        zero_shot_points,
        partial: partial.clone(),
        prompts: match &args.prompts {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        },
    };
    let (rows, zero_shot, generations) = dispatch(args.backend, args.dtype, task)?;

    println!("\nperplexity (every token sparse; strided {}/{}): {}", args.window, args.stride, text_names.join(", "));
    println!("{:<28} {:>8} {:>8} {:>11} {:>11} {:>9} {:>9}", "configuration", "MLP kept", "heads", "ppl text 1", "ppl text 2", "Δ text 1", "Δ text 2");
    for r in &rows {
        let at = |v: &Vec<f64>, i: usize| v.get(i).copied().unwrap_or(f64::NAN);
        println!(
            "{:<28} {:>7.1}% {:>7.1}% {:>11.3} {:>11.3} {:>+8.2}% {:>+8.2}%",
            r.name,
            r.kept_mlp_density * 100.0,
            r.kept_attention_density * 100.0,
            at(&r.perplexity, 0),
            at(&r.perplexity, 1),
            at(&r.relative, 0) * 100.0,
            at(&r.relative, 1) * 100.0
        );
    }
    if !zero_shot.is_empty() {
        println!("\nzero-shot, dense vs sparse operating points (noise: 2·sqrt(se_dense² + se_sparse²))");
        println!("{:<28} {:<11} {:>8} {:>15} {:>15} {:>8} {:>7}", "point", "task", "examples", "dense", "sparse", "Δ", "noise?");
        for z in &zero_shot {
            println!(
                "{:<28} {:<11} {:>8} {:>8.4}±{:.4} {:>8.4}±{:.4} {:>+8.4} {:>7}",
                z.point,
                z.task.name(),
                z.examples,
                z.dense.accuracy,
                z.dense.accuracy_stderr,
                z.sparse.accuracy,
                z.sparse.accuracy_stderr,
                z.difference,
                if z.within_noise { "within" } else { "OUTSIDE" }
            );
        }
    }

    let device = if args.backend == BackendKind::Cpu { "CPU (the development machine)".to_string() } else { device_name("unknown GPU") };
    let value = benchmark_json(
        "quality",
        &device,
        &commit,
        json!({
            "model": model_dir,
            "model_hash": dejavu_model::content_hash(&model_dir)?,
            "predictors": predictors,
            "backend": backend,
            "dtype": args.dtype,
            "texts": text_names,
            "method": format!("strided, window {}, stride {}; every token sparse (masked path)", args.window, args.stride),
            "seconds": started.elapsed().as_secs_f64(),
            "rows": rows,
            "zero_shot_points": args.zero_shot_points,
            "zero_shot": zero_shot,
            "generate_point": args.generate_point.to_string(),
            "generations": generations,
        }),
    );
    write_json(&out, &value)?;
    let _ = std::fs::remove_file(&partial);
    println!("\nwrote {}", out.display());
    Ok(())
}
