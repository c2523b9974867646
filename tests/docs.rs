//! The documentation names the test that proves each guarantee, as a path
//! in backticks (`worker::two_workers_race_and_exactly_one_syncs`, or
//! `store::tests::...` for a unit test in `src/`). A test renamed or removed
//! would leave the docs citing nothing, so this checks that every such path
//! in `README.md` and `docs/*.md` names a function that exists, and a test
//! function where the path points into the tests; and that every relative
//! link between the pages lands on a file and, when it names one, a heading.
//! It reads files only: no service is needed.

use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown pages that cite tests.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The lines of a page outside fenced code blocks.
fn prose(text: &str) -> String {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    prose
}

/// The code spans of a page outside fenced blocks that look like a Rust
/// path of at least two lowercase segments (`a::b`, `a::tests::c`).
fn cited_paths(text: &str) -> Vec<String> {
    prose(text)
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| is_path(span))
        .map(str::to_string)
        .collect()
}

fn is_path(span: &str) -> bool {
    let segments: Vec<&str> = span.split("::").collect();
    segments.len() >= 2
        && segments.iter().all(|s| {
            s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

/// The files a path may point into: `tests/<first>.rs` for an integration
/// test, then the deepest `src/` module its leading segments name (an inline
/// `tests` module is part of its file), with every file under that module's
/// folder, so moving a test between the files of one module keeps it found.
/// `worker::...` may be either: the integration tests come first.
fn candidate_files(path: &str) -> Vec<PathBuf> {
    let segments: Vec<&str> = path.split("::").collect();
    let module = &segments[..segments.len() - 1];
    let mut files = Vec::new();
    let integration = root().join("tests").join(format!("{}.rs", module[0]));
    if integration.is_file() && !path.contains("::tests::") {
        files.push(integration);
    }
    let module: Vec<&str> = module.iter().copied().filter(|s| *s != "tests").collect();
    for depth in (1..=module.len()).rev() {
        let base = module[..depth]
            .iter()
            .fold(root().join("src"), |dir, s| dir.join(s));
        let before = files.len();
        let file = base.with_extension("rs");
        if file.is_file() {
            files.push(file);
        }
        if base.is_dir() {
            rust_files(&base, &mut files);
        }
        if files.len() > before {
            break;
        }
    }
    files
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `source` defines `fn name`, and whether that definition carries a
/// test attribute (`#[test]`, `#[tokio::test(...)]`) among the attributes
/// and comments right above it.
fn find_fn(source: &str, name: &str) -> Option<bool> {
    let lines: Vec<&str> = source.lines().collect();
    let at = lines.iter().position(|line| {
        line.trim_start()
            .split("fn ")
            .nth(1)
            .and_then(|rest| rest.strip_prefix(name))
            .is_some_and(|rest| rest.starts_with(['(', '<']))
    })?;
    let is_test = lines[..at]
        .iter()
        .rev()
        .map(|l| l.trim())
        .take_while(|l| l.starts_with("#[") || l.starts_with("//") || l.starts_with(')'))
        .any(|l| l.starts_with("#[") && l.contains("test"));
    Some(is_test)
}

/// What is wrong with one cited path, if anything. A path into `tests/`,
/// or through a `tests` module in `src/`, must name a test function.
fn check(path: &str) -> Option<String> {
    let files = candidate_files(path);
    if files.is_empty() {
        return Some("no such module in tests/ or src/".into());
    }
    let name = path.rsplit("::").next().expect("a path has a last segment");
    let found = files.iter().find_map(|f| {
        let source = fs::read_to_string(f).ok()?;
        find_fn(&source, name).map(|is_test| (f, is_test))
    });
    match found {
        None => Some(format!("no `fn {name}` in tests/ or src/")),
        Some((file, false))
            if path.contains("::tests::") || file.starts_with(root().join("tests")) =>
        {
            Some(format!("`fn {name}` in {} is not a test", file.display()))
        }
        Some(_) => None,
    }
}

#[test]
fn every_test_the_docs_cite_exists() {
    let mut cited = 0;
    let mut wrong = Vec::new();
    for page in pages() {
        let text = fs::read_to_string(&page).expect("page readable");
        for path in cited_paths(&text) {
            cited += 1;
            if let Some(why) = check(&path) {
                let page = page.strip_prefix(root()).unwrap_or(&page).display();
                wrong.push(format!("{page}: `{path}`: {why}"));
            }
        }
    }
    assert!(
        cited > 50,
        "only {cited} cited paths found: is the scan broken?"
    );
    assert!(wrong.is_empty(), "stale citations:\n{}", wrong.join("\n"));
}

/// The anchors of a page's headings, as GitHub makes them: lowercase,
/// spaces to hyphens, punctuation dropped.
fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => {
                        Some(c.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// The targets of the page's Markdown links that are not URLs.
fn relative_links(text: &str) -> Vec<String> {
    prose(text)
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target.to_string()))
        .filter(|target| !target.contains("://") && !target.starts_with("mailto:"))
        .collect()
}

#[test]
fn every_relative_link_between_the_pages_lands() {
    let mut wrong = Vec::new();
    for page in pages() {
        let text = fs::read_to_string(&page).expect("page readable");
        let dir = page.parent().expect("a page is in a folder");
        for link in relative_links(&text) {
            let (file, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                dir.join(file)
            };
            let name = page.strip_prefix(root()).unwrap_or(&page).display();
            if !target.exists() {
                wrong.push(format!("{name}: ({link}): no such file"));
            } else if !anchor.is_empty() {
                let heads = anchors(&fs::read_to_string(&target).unwrap_or_default());
                if !heads.iter().any(|h| h == anchor) {
                    wrong.push(format!("{name}: ({link}): no such heading"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "broken links:\n{}", wrong.join("\n"));
}

#[test]
fn the_scan_finds_paths_and_only_paths() {
    let text = "a [`worker::a_test`, unit `x::tests::b_2`] `LIST \"\" \"*\"` `a::B`\n\
                ```\n`fenced::out`\n```\n`ok::c`";
    assert_eq!(
        cited_paths(text),
        ["worker::a_test", "x::tests::b_2", "ok::c"]
    );
    assert!(check("worker::two_workers_race_and_exactly_one_syncs").is_none());
    assert!(check("worker::no_such_test_at_all").is_some());
    assert!(check("no_such_module::a_test").is_some());
    assert_eq!(
        anchors("# Mixed deployments: Caliopen's `syncing` marker\n## OAuth2 (XOAUTH2)"),
        [
            "mixed-deployments-caliopens-syncing-marker",
            "oauth2-xoauth2"
        ]
    );
    assert_eq!(
        relative_links("[a](b.md#c) [d](https://e) ![f](g.svg)"),
        ["b.md#c", "g.svg"]
    );
}
