// SPDX-License-Identifier: MIT OR Apache-2.0
//! The documentation: the README (the front door) and the pages under `docs/`, and a check
//! that every relative link in them leads somewhere: to a file that exists and, with an
//! anchor, to a heading of that page (GitHub's anchors). External links are not followed.
//! The generated parts of the pages are `workloads` (the workload list in
//! [`crate::workloads::PAGE`]). May call: nothing of this crate.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The pages: `README.md`, then `docs/*.md` in name order.
pub fn pages(root: &Path) -> Result<Vec<PathBuf>> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .with_context(|| format!("reading {}", root.join("docs").display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root.join("README.md"));
    Ok(docs)
}

/// GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces
/// to `-`.
pub fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fence = false;
    text.lines().enumerate().filter(move |(_, l)| {
        if l.starts_with("```") {
            fence = !fence;
            return false;
        }
        !fence
    })
}

/// The anchors of a page's headings.
pub fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .filter_map(|(_, l)| {
            let h = l.trim_start_matches('#');
            (h.len() < l.len() && h.starts_with(' ')).then(|| anchor(h))
        })
        .collect()
}

/// The relative links of a page (`[text](target)`, images too), with their line (from 1):
/// neither `http(s):` nor `mailto:`, nor in a code block.
pub fn relative_links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in prose(text) {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let target = &after[..end];
            if !target.contains("://") && !target.starts_with("mailto:") && !target.is_empty() {
                out.push((i + 1, target.to_string()));
            }
            rest = &after[end..];
        }
    }
    out
}

/// Every relative link of every page that leads nowhere: `page:line: target: why`.
pub fn broken_links(root: &Path) -> Result<Vec<String>> {
    let mut broken = Vec::new();
    for page in pages(root)? {
        let text = std::fs::read_to_string(&page)?;
        let shown = page.strip_prefix(root).unwrap_or(&page).display().to_string();
        for (line, target) in relative_links(&text) {
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().expect("a folder").join(file)
            };
            let why = if !path.exists() {
                Some("no such file".to_string())
            } else if !anchor.is_empty() {
                let dest = std::fs::read_to_string(&path).unwrap_or_default();
                (!anchors(&dest).iter().any(|a| a == anchor))
                    .then(|| format!("no heading with anchor #{anchor}"))
            } else {
                None
            };
            if let Some(why) = why {
                broken.push(format!("{shown}:{line}: {target}: {why}"));
            }
        }
    }
    Ok(broken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_githubs() {
        assert_eq!(
            anchor("Revoke at scale: broadcast or tree"),
            "revoke-at-scale-broadcast-or-tree"
        );
        assert_eq!(anchor(" The `guest_info` word "), "the-guest_info-word");
        assert_eq!(anchors("# A\n```\n# not a heading\n```\n## B-c (d)\n#nope"), ["a", "b-c-d"]);
    }

    #[test]
    fn a_broken_link_is_named_with_its_line() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("docs")).unwrap();
        std::fs::write(
            d.path().join("README.md"),
            "# Top\n[ok](docs/a.md#part) [web](https://x.org/y)\n```\n[code](nowhere.md)\n```\n\
             [gone](docs/b.md) [bad](docs/a.md#whole) [here](#top)\n",
        )
        .unwrap();
        std::fs::write(d.path().join("docs/a.md"), "# A\n## Part\n[back](../README.md#nope)\n")
            .unwrap();
        let b = broken_links(d.path()).unwrap();
        assert_eq!(
            b,
            [
                "README.md:6: docs/b.md: no such file",
                "README.md:6: docs/a.md#whole: no heading with anchor #whole",
                "docs/a.md:3: ../README.md#nope: no heading with anchor #nope",
            ]
        );
    }

    #[test]
    fn every_relative_link_of_the_documentation_leads_somewhere() {
        let broken = broken_links(&crate::workspace_root()).unwrap();
        assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    }
}
