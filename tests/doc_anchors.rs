//! The pages that walk through the code (`LIFECYCLE.md`, `docs/`, the
//! README) point into it with anchors written `` `Symbol` (`path.rs:LINE`) ``.
//! Code moves; this test keeps the pages from drifting: every anchor must
//! name a file that exists and a line that names the symbol, and every
//! `path.rs:LINE` in a page must be part of such an anchor.
//!
//! A path is taken relative to the page's own folder, then to the
//! repository's root. The symbol's last `::` segment must appear on the
//! line as a whole word (`Worker::accept` → a line naming `accept`).

use std::fs;
use std::path::{Path, PathBuf};

use regex::Regex;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every Markdown page of the repository outside `target/` and hidden folders.
fn pages(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            pages(&path, out);
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

fn resolve(page: &Path, rel: &str) -> Option<PathBuf> {
    let beside = page.parent().map(|d| d.join(rel));
    beside
        .into_iter()
        .chain(std::iter::once(root().join(rel)))
        .find(|p| p.is_file())
}

/// Problems found in one page's text.
fn check_page(page: &Path, text: &str) -> Vec<String> {
    let anchor =
        Regex::new(r"`([A-Za-z_][A-Za-z0-9_:]*)(?:\(\))?` \(`([A-Za-z0-9_./-]+\.rs):(\d+)`\)")
            .expect("anchor pattern");
    let any_line_ref = Regex::new(r"[A-Za-z0-9_./-]+\.rs:\d+").expect("line pattern");
    let shown = page
        .strip_prefix(root())
        .unwrap_or(page)
        .display()
        .to_string();
    let mut problems = Vec::new();
    let mut anchored = Vec::new();
    for c in anchor.captures_iter(text) {
        let (whole, symbol, rel, line) = (&c[0], &c[1], &c[2], &c[3]);
        anchored.push(c.get(2).map_or(0, |m| m.start()));
        let Some(file) = resolve(page, rel) else {
            problems.push(format!("{shown}: {whole}: no file {rel}"));
            continue;
        };
        let Ok(n) = line.parse::<usize>() else {
            problems.push(format!("{shown}: {whole}: bad line number"));
            continue;
        };
        let source = fs::read_to_string(&file).unwrap_or_default();
        let Some(at) = n.checked_sub(1).and_then(|i| source.lines().nth(i)) else {
            problems.push(format!("{shown}: {whole}: {rel} has fewer than {n} lines"));
            continue;
        };
        let name = symbol.rsplit("::").next().unwrap_or(symbol);
        let word = Regex::new(&format!(r"\b{}\b", regex::escape(name))).expect("symbol pattern");
        if !word.is_match(at) {
            problems.push(format!(
                "{shown}: {whole}: line {n} of {rel} does not name `{name}`: {}",
                at.trim()
            ));
        }
    }
    for m in any_line_ref.find_iter(text) {
        if !anchored.contains(&m.start()) {
            problems.push(format!(
                "{shown}: `{}` is not written as `Symbol` (`path.rs:LINE`), so nothing checks it",
                m.as_str()
            ));
        }
    }
    problems
}

#[test]
fn every_code_anchor_in_the_docs_names_its_symbol() {
    let mut all = Vec::new();
    pages(&root(), &mut all);
    assert!(
        all.iter().any(|p| p.ends_with("workers/LIFECYCLE.md")),
        "workers/LIFECYCLE.md not found among {} pages",
        all.len()
    );
    let mut anchors = 0;
    let mut problems = Vec::new();
    for page in &all {
        let text = fs::read_to_string(page).expect("read page");
        anchors += text.matches(".rs:").count();
        problems.extend(check_page(page, &text));
    }
    assert!(
        problems.is_empty(),
        "drifted anchors:\n{}",
        problems.join("\n")
    );
    assert!(anchors >= 20, "only {anchors} code anchors in the docs");
    println!("{anchors} anchors checked in {} pages", all.len());
}

#[test]
fn a_drifted_anchor_is_reported() {
    let page = root().join("workers/LIFECYCLE.md");
    // Line 1 of the file is a doc comment, not the symbol.
    let bad = "see `Worker::accept` (`src/event_loop.rs:1`) and `src/lib.rs:3`";
    let problems = check_page(&page, bad);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("does not name `accept`"),
        "{problems:?}"
    );
    assert!(problems[1].contains("is not written as"), "{problems:?}");
    let missing = check_page(&page, "`x` (`src/nowhere.rs:1`)");
    assert!(missing[0].contains("no file"), "{missing:?}");
}
