//! Where the host's time goes while it enqueues decode steps: a sampling profile (SIGPROF
//! through `pprof`, so it runs where `perf` does not, as on the GPU machine) of a few
//! decode runs, summarized per function — inclusive and self samples — into a text file.
//! Built only with the `host-profile` feature.

#[cfg(feature = "host-profile")]
use std::collections::HashMap;
#[cfg(feature = "host-profile")]
use std::io::Write;
use std::path::Path;

/// Samples per second: at ~3 ms a step, a few thousand samples over a few runs.
#[cfg(feature = "host-profile")]
const FREQUENCY: i32 = 4000;

/// Runs `work` under the sampler and appends the summary, headed by `label`, to `out`.
#[cfg(feature = "host-profile")]
pub fn profile<T>(out: &Path, label: &str, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(|e| anyhow::anyhow!("starting the host profiler: {e}"))?;
    let value = work()?;
    let report = guard.report().build().map_err(|e| anyhow::anyhow!("reading the host profile: {e}"))?;
    let stacks: Vec<(String, Vec<String>, usize)> = report
        .data
        .iter()
        .map(|(frames, &count)| {
            // Leaf first; an inlined frame holds several symbols, innermost first.
            let names = frames.frames.iter().flat_map(|f| f.iter().map(|s| short_name(&s.name()))).collect();
            (frames.thread_name_or_id(), names, count.max(0) as usize)
        })
        .collect();
    write_summary(out, label, &stacks)?;
    write_folded(out, label, &stacks)?;
    Ok(value)
}

#[cfg(not(feature = "host-profile"))]
pub fn profile<T>(_out: &Path, _label: &str, _work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    anyhow::bail!("--host-profile needs dejavu-bench built with the host-profile feature")
}

/// The entries of `m`, most samples first.
#[cfg(feature = "host-profile")]
fn sorted(m: HashMap<&str, usize>) -> Vec<(&str, usize)> {
    let mut v: Vec<(&str, usize)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v
}

/// A demangled name without its hash suffix, generic arguments shortened.
#[cfg(feature = "host-profile")]
fn short_name(name: &str) -> String {
    let name = match name.rfind("::h") {
        Some(i) if name.len() - i == 19 && name[i + 3..].chars().all(|c| c.is_ascii_hexdigit()) => &name[..i],
        _ => name,
    };
    // Keep the path, drop what is inside the outermost angle brackets past 60 characters.
    let mut out = String::new();
    let mut depth = 0usize;
    for c in name.chars() {
        match c {
            '<' => {
                depth += 1;
                if depth == 1 || out.len() < 60 {
                    out.push(c);
                }
            }
            '>' => {
                if depth == 1 || out.len() < 60 {
                    out.push(c);
                }
                depth = depth.saturating_sub(1);
            }
            _ if depth > 1 && out.len() >= 60 => {}
            _ => out.push(c),
        }
    }
    out.chars().take(200).collect()
}

/// Appends the stacks to `out` with `.folded` added to its name, one line each — `label`,
/// thread, then the frames from the root, separated by `;`, and the sample count — the
/// input of flame-graph tools, for any grouping the summary does not show.
#[cfg(feature = "host-profile")]
fn write_folded(out: &Path, label: &str, stacks: &[(String, Vec<String>, usize)]) -> anyhow::Result<()> {
    let mut path = out.as_os_str().to_owned();
    path.push(".folded");
    let mut f = std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
    let label = label.replace([';', ' '], "_");
    for (thread, names, count) in stacks {
        let frames: Vec<&str> = names.iter().rev().map(String::as_str).collect();
        writeln!(f, "{label};{thread};{} {count}", frames.join(";").replace(' ', ""))?;
    }
    f.flush()?;
    Ok(())
}

/// Per thread, then the 60 functions with the most inclusive samples and the 40 with the
/// most self samples, as percentages of all samples.
#[cfg(feature = "host-profile")]
fn write_summary(out: &Path, label: &str, stacks: &[(String, Vec<String>, usize)]) -> anyhow::Result<()> {
    let total: usize = stacks.iter().map(|s| s.2).sum();
    let mut threads: HashMap<&str, usize> = HashMap::new();
    let mut inclusive: HashMap<&str, usize> = HashMap::new();
    let mut leaf: HashMap<&str, usize> = HashMap::new();
    for (thread, names, count) in stacks {
        *threads.entry(thread).or_default() += count;
        if let Some(first) = names.first() {
            *leaf.entry(first).or_default() += count;
        }
        let mut seen = std::collections::HashSet::new();
        for n in names {
            if seen.insert(n.as_str()) {
                *inclusive.entry(n).or_default() += count;
            }
        }
    }
    let pct = |c: usize| 100.0 * c as f64 / total.max(1) as f64;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(out)?;
    writeln!(f, "## {label}: {total} samples")?;
    for (t, c) in sorted(threads) {
        writeln!(f, "thread {t}: {:.1}%", pct(c))?;
    }
    writeln!(f, "### inclusive")?;
    for (n, c) in sorted(inclusive).into_iter().take(60) {
        writeln!(f, "{:6.2}%  {n}", pct(c))?;
    }
    writeln!(f, "### self")?;
    for (n, c) in sorted(leaf).into_iter().take(40) {
        writeln!(f, "{:6.2}%  {n}", pct(c))?;
    }
    writeln!(f)?;
    Ok(())
}
