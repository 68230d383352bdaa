//! Every CEL and schema rule of the CRDs, tried against the real API server with kubectl.
//!
//! - `e2e/fixtures/invalid/*.yaml`: the first line is `# expect: <substring>`. The documents are
//!   applied in order; all but the last must be accepted (they set the stage, e.g. the object an
//!   immutability rule is then tried on), the last must be rejected with an error containing the
//!   substring.
//! - `e2e/fixtures/valid/*.yaml`: every document is accepted, in order.
//!
//! Objects are deleted after each file, so fixtures may reuse names. Needs root.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize as _;
use weft_e2e::cluster::{TestCluster, TestOptions, repo_root};

/// Fixtures reuse object names across files, so the two tests take turns.
static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn cluster() -> Result<TestCluster> {
    TestCluster::shared(TestOptions::default().nodes(0).weft_dev(env!("CARGO_BIN_EXE_weft-dev"))).await
}

fn fixtures(kind: &str) -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("e2e/fixtures").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The documents of a YAML file, as JSON (what `kubectl apply -f -` gets).
fn documents(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = serde_json::Value::deserialize(de).with_context(|| format!("parsing {}", path.display()))?;
        if !v.is_null() {
            docs.push(serde_json::to_string(&v)?);
        }
    }
    Ok(docs)
}

fn expectation(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)?;
    let first = text.lines().next().unwrap_or_default();
    match first.strip_prefix("# expect:") {
        Some(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => bail!("{} does not start with `# expect: <substring>`", path.display()),
    }
}

async fn apply(c: &TestCluster, doc: &str) -> Result<std::process::Output> {
    c.kubectl_output(&["apply", "-f", "-"], Some(doc)).await
}

async fn delete_all(c: &TestCluster, path: &Path) {
    let _ = c
        .kubectl_output(&["delete", "--ignore-not-found", "--wait=true", "-f", &path.to_string_lossy()], None)
        .await;
}

/// Applies the file's documents; returns a description of what went wrong, if anything.
async fn check_invalid(c: &TestCluster, path: &Path) -> Result<Option<String>> {
    let expect = expectation(path)?;
    let docs = documents(path)?;
    let Some((last, setup)) = docs.split_last() else { bail!("{} has no documents", path.display()) };
    for (i, doc) in setup.iter().enumerate() {
        let out = apply(c, doc).await?;
        if !out.status.success() {
            return Ok(Some(format!(
                "setup document {} was rejected: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    let out = apply(c, last).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Ok(Some(format!("was accepted, expected a rejection containing {expect:?}")));
    }
    if !stderr.contains(&expect) {
        return Ok(Some(format!("rejected, but without {expect:?}: {}", stderr.trim())));
    }
    Ok(None)
}

async fn check_valid(c: &TestCluster, path: &Path) -> Result<Option<String>> {
    for (i, doc) in documents(path)?.iter().enumerate() {
        let out = apply(c, doc).await?;
        if !out.status.success() {
            return Ok(Some(format!(
                "document {} was rejected: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(None)
}

#[tokio::test]
async fn each_invalid_fixture_is_rejected_with_its_message() -> Result<()> {
    let c = cluster().await?;
    let _turn = TURNS.lock().await;
    let files = fixtures("invalid")?;
    assert!(!files.is_empty(), "no fixtures in e2e/fixtures/invalid");
    let mut failures = Vec::new();
    for f in &files {
        let res = check_invalid(&c, f).await;
        delete_all(&c, f).await;
        match res {
            Ok(None) => {}
            Ok(Some(problem)) => failures.push(format!("{}: {problem}", f.display())),
            Err(e) => failures.push(format!("{}: {e:#}", f.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid fixtures:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn each_valid_fixture_is_accepted() -> Result<()> {
    let c = cluster().await?;
    let _turn = TURNS.lock().await;
    let files = fixtures("valid")?;
    assert!(!files.is_empty(), "no fixtures in e2e/fixtures/valid");
    let mut failures = Vec::new();
    for f in &files {
        let res = check_valid(&c, f).await;
        delete_all(&c, f).await;
        match res {
            Ok(None) => {}
            Ok(Some(problem)) => failures.push(format!("{}: {problem}", f.display())),
            Err(e) => failures.push(format!("{}: {e:#}", f.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} valid fixtures:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    Ok(())
}
