//! `crdgen`: writes the Weft CRD manifests (`crds/<plural>.weft.io.yaml`) from the Rust types.
//!
//! ```text
//! crdgen [--dir DIR]            write every CRD into DIR (default: the repository's crds/)
//! crdgen --check [--dir DIR]    write nothing; exit 1 listing files that are stale, missing or extra
//! ```
//!
//! The rendering itself lives in `weft_api::v1alpha1::render_crd_files`, which the staleness test
//! in `api/tests/crd_generated.rs` uses too.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use weft_api::v1alpha1::{REGENERATE_COMMAND, render_crd_files};

struct Args {
    check: bool,
    dir: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut check = false;
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--dir" => dir = args.next().context("--dir needs a directory")?.into(),
            "-h" | "--help" => {
                println!(
                    "usage: crdgen [--check] [--dir DIR]\n  writes the Weft CRDs into DIR (default: crds/); --check only reports stale files"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    // show crds/ rather than operator/../crds/ in messages
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    Ok(Args { check, dir })
}

fn run() -> anyhow::Result<ExitCode> {
    let args = parse_args()?;
    let files = render_crd_files()?;

    if !args.check {
        std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
        for file in &files {
            let path = args.dir.join(&file.file_name);
            let current = std::fs::read_to_string(&path).ok();
            if current.as_deref() != Some(file.content.as_str()) {
                std::fs::write(&path, &file.content)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut problems = Vec::new();
    for file in &files {
        let path = args.dir.join(&file.file_name);
        match std::fs::read_to_string(&path) {
            Ok(current) if current == file.content => {}
            Ok(_) => problems.push(format!("stale: {}", path.display())),
            Err(_) => problems.push(format!("missing: {}", path.display())),
        }
    }
    if let Ok(entries) = std::fs::read_dir(&args.dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let generated = files.iter().any(|f| f.file_name == name);
            if name.ends_with(".yaml") && !generated {
                problems.push(format!("extra (no CRD type generates it): {}", entry.path().display()));
            }
        }
    }
    if problems.is_empty() {
        println!("crds are up to date ({} files)", files.len());
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("the CRD manifests differ from the Rust types: run `{REGENERATE_COMMAND}`");
        Ok(ExitCode::FAILURE)
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("crdgen: {err:#}");
            ExitCode::from(2)
        }
    }
}
