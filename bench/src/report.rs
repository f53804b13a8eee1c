//! Facts every benchmark JSON carries: device, commit, time, command.

use std::process::Command;

/// The commit this binary was built from (`build.rs`; "-dirty" when built from a tree with
/// uncommitted changes), unless `DEJAVU_COMMIT` says otherwise. Not the git HEAD of where it
/// runs: the GPU machine's copy of the tree can be older than the binary handed to it.
pub fn commit() -> String {
    std::env::var("DEJAVU_COMMIT").unwrap_or_else(|_| env!("DEJAVU_BUILD_COMMIT").to_string())
}

/// The GPU's name from nvidia-smi, or what the caller knows.
pub fn device_name(fallback: &str) -> String {
    Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| fallback.to_string())
}

pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{secs}")
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Writes `json` pretty-printed to `path`, creating its folder.
pub fn write_json(path: &std::path::Path, json: &serde_json::Value) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(json)? + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Runs a peer script (`python script args... --json <tmp>`) and returns the JSON it
/// wrote, or `None` (with a message) when it failed: a missing peer leaves its columns
/// empty rather than losing our measurements.
pub fn run_peer_script(python: &str, script: &std::path::Path, args: &[String], what: &str) -> anyhow::Result<Option<serde_json::Value>> {
    use anyhow::Context;
    let out = std::env::temp_dir().join(format!("dejavu-peer-{}-{}.json", what.replace(' ', "-"), std::process::id()));
    let status = Command::new(python)
        .arg(script)
        .args(args)
        .arg("--json")
        .arg(&out)
        .status()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !status.success() {
        eprintln!("{what} peer failed ({status}); its columns are left empty");
        return Ok(None);
    }
    let text = std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))?))
}

/// Reads a JSON file (a peer's results saved by an earlier run).
pub fn read_json(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A benchmark JSON: which benchmark, the device, the commit, the command line and the
/// time, then the benchmark's own `fields` (an object).
/// Writes [`benchmark_json`] to `out`, by default `bench/results/<prefix>-<commit>.json`;
/// returns the path written.
pub fn write_benchmark(
    benchmark: &str,
    device: &str,
    commit: &str,
    fields: serde_json::Value,
    out: Option<&std::path::Path>,
    prefix: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let out = out.map(std::path::Path::to_path_buf).unwrap_or_else(|| format!("bench/results/{prefix}-{commit}.json").into());
    write_json(&out, &benchmark_json(benchmark, device, commit, fields))?;
    Ok(out)
}

pub fn benchmark_json(benchmark: &str, device: &str, commit: &str, fields: serde_json::Value) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert("benchmark".into(), benchmark.into());
    map.insert("device".into(), device.into());
    map.insert("commit".into(), commit.into());
    map.insert("command".into(), command_line().into());
    map.insert("unix_time".into(), now_utc().into());
    if let serde_json::Value::Object(fields) = fields {
        map.extend(fields);
    }
    serde_json::Value::Object(map)
}
