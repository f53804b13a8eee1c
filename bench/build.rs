//! Embeds the commit the benchmark binary was built from (`DEJAVU_BUILD_COMMIT`), so the
//! results it writes name it even where it runs without the repository's history: the GPU
//! machine runs a copy of the working tree whose git HEAD can be older than the binary it
//! was handed. "-dirty" marks a build from a tree with uncommitted changes to tracked files.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty { format!("{hash}-dirty") } else { hash }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=DEJAVU_BUILD_COMMIT={commit}");
    // Rerun when a source the binary is built from changes (the dirty mark), or HEAD moves
    // or the index changes (a commit, a checkout, an add).
    for crate_dir in ["src", "../kernels/src", "../model/src", "../predictor/src", "../runtime/src"] {
        println!("cargo:rerun-if-changed={crate_dir}");
    }
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        for file in ["HEAD", "index"] {
            println!("cargo:rerun-if-changed={dir}/{file}");
        }
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head_ref}");
        }
    }
}
