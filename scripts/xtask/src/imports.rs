// SPDX-License-Identifier: MIT OR Apache-2.0
//! The module import graph of each of our crates, and its cycles. A module (a file: `a.rs`,
//! `a/mod.rs`; an inline `mod x { .. }` counts as part of its file) imports another when it
//! names it: a `use`, or a path through `crate::`, `super::`, `self::`, a child module or a
//! name a `use` brought in (also inside macro arguments that parse as expressions). Declaring
//! a child (`mod x;`) is not an import, nor is a path through a name the crate root took
//! from another crate (`use guestkernel::arch;` at the root, `crate::arch::x` below). The files are read with syn, every `cfg` included, so
//! test modules count. `cargo xtask imports` prints the graph; `cargo xtask test` fails when
//! any crate has a cycle, printing it with the line that makes each step.
//! May call: nothing of this crate (a leaf; its tests use the crate root's `workspace_root`).

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// The crates checked: a name and its root files (a library and a binary are two crates).
pub const CRATES: &[(&str, &str)] = &[
    ("vmcall-proto", "vmcall-proto/src/lib.rs"),
    ("hypervisor", "hypervisor/src/main.rs"),
    ("guestkernel (lib)", "guestkernel/src/lib.rs"),
    ("guestkernel (workloads)", "guestkernel/src/main.rs"),
    ("xtask (lib)", "scripts/xtask/src/lib.rs"),
    ("xtask (bin)", "scripts/xtask/src/main.rs"),
];

/// One crate's modules and who imports whom.
#[derive(Debug)]
pub struct Graph {
    /// Module names (`crate`, `caps::proto`), one per file, in discovery order.
    pub modules: Vec<String>,
    /// The files, same order as `modules`.
    pub files: Vec<PathBuf>,
    /// (from, to) -> the first place that makes the edge (`file: path`).
    pub edges: BTreeMap<(usize, usize), String>,
}

type ModPath = Vec<String>;
/// The names a scope's `use`s bind: to a path of this crate, or (None) of another crate.
type Aliases = BTreeMap<String, Option<ModPath>>;

/// What one scope (a file's module or an inline module in it) declares.
#[derive(Default, Debug)]
struct Scope {
    node: usize,
    children: BTreeSet<String>,
    /// The use trees written in this scope (also inside its functions), expanded to
    /// (path as written, the name it binds if any).
    uses: Vec<(Vec<String>, Option<String>)>,
    /// `#[macro_export]` macros defined here (they live at the crate root by name).
    macros: Vec<String>,
}

/// Pass 1: the scopes and child modules of one file.
struct Collect<'a> {
    stack: ModPath,
    node: usize,
    scopes: &'a mut BTreeMap<ModPath, Scope>,
    /// Child file modules found: (module path, the folder its own children live in).
    child_files: Vec<(ModPath, PathBuf)>,
    /// The folder of this file's own children, per scope depth.
    dir: PathBuf,
    base_depth: usize,
    error: Option<String>,
}

fn expand_use(
    tree: &syn::UseTree,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, Option<String>)>,
) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            expand_use(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) if n.ident == "self" => {
            out.push((prefix.clone(), prefix.last().cloned()));
        }
        syn::UseTree::Name(n) => {
            let mut p = prefix.clone();
            p.push(n.ident.to_string());
            out.push((p, Some(n.ident.to_string())));
        }
        syn::UseTree::Rename(r) => {
            let mut p = prefix.clone();
            if r.ident != "self" {
                p.push(r.ident.to_string());
            }
            out.push((p, Some(r.rename.to_string())));
        }
        syn::UseTree::Glob(_) => out.push((prefix.clone(), None)),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                expand_use(t, prefix, out);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collect<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let name = m.ident.to_string();
        self.scopes.get_mut(&self.stack).expect("scope").children.insert(name.clone());
        if m.attrs.iter().any(|a| a.path().is_ident("path")) {
            self.error = Some(format!("`#[path]` on `mod {name}` is not supported"));
            return;
        }
        let mut path = self.stack.clone();
        path.push(name.clone());
        // The folder a module's children live in: inline modules nest below this file's.
        let rel: PathBuf = self.stack[self.base_depth..].iter().collect();
        let dir = self.dir.join(rel).join(&name);
        match &m.content {
            None => self.child_files.push((path, dir)),
            Some((_, items)) => {
                self.scopes.insert(path.clone(), Scope { node: self.node, ..Scope::default() });
                self.stack.push(name);
                for i in items {
                    self.visit_item(i);
                }
                self.stack.pop();
            }
        }
    }
    fn visit_item_macro(&mut self, m: &'ast syn::ItemMacro) {
        if let Some(name) = &m.ident {
            if m.attrs.iter().any(|a| a.path().is_ident("macro_export")) {
                let s = self.scopes.get_mut(&self.stack).expect("scope");
                s.macros.push(name.to_string());
            }
        }
    }
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut out = Vec::new();
        let mut prefix = Vec::new();
        if u.leading_colon.is_some() {
            return; // `::name`: another crate.
        }
        expand_use(&u.tree, &mut prefix, &mut out);
        self.scopes.get_mut(&self.stack).expect("scope").uses.extend(out);
    }
}

/// Pass 2: the paths of one file, resolved to modules.
struct Resolve<'a> {
    stack: ModPath,
    scopes: &'a BTreeMap<ModPath, Scope>,
    /// Module path -> file node (inline modules map to their file).
    modules: &'a BTreeMap<ModPath, usize>,
    /// `#[macro_export]` macro name -> the file defining it.
    macros: &'a BTreeMap<String, usize>,
    /// Per scope: bound name -> absolute path (None: another crate's).
    aliases: &'a BTreeMap<ModPath, Aliases>,
    from: usize,
    file: String,
    edges: &'a mut BTreeMap<(usize, usize), String>,
}

/// The absolute path `segs` names from `scope`, when it is one of this crate's.
fn absolute(
    scope: &[String],
    segs: &[String],
    scopes: &BTreeMap<ModPath, Scope>,
    aliases: Option<&BTreeMap<String, Option<ModPath>>>,
) -> Option<ModPath> {
    let first = segs.first()?;
    let mut rest = segs;
    let mut base: ModPath = match first.as_str() {
        "crate" => {
            rest = &segs[1..];
            Vec::new()
        }
        "self" => {
            rest = &segs[1..];
            scope.to_vec()
        }
        "super" => {
            let mut b = scope.to_vec();
            while rest.first().is_some_and(|s| s == "super") {
                b.pop()?;
                rest = &rest[1..];
            }
            b
        }
        name if scopes.get(scope).is_some_and(|s| s.children.contains(name)) => scope.to_vec(),
        name => {
            // A name bound to another crate's item (`None`) is not ours.
            let a = aliases?.get(name)?.as_ref()?;
            rest = &segs[1..];
            a.clone()
        }
    };
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The file that holds the module `path` names, and how many segments name that module.
fn longest_prefix(modules: &BTreeMap<ModPath, usize>, path: &[String]) -> (usize, usize) {
    (0..=path.len()).rev().find_map(|n| modules.get(&path[..n]).map(|&m| (m, n))).unwrap_or((0, 0))
}

impl Resolve<'_> {
    fn note(&mut self, segs: &[String], what: &str) {
        let Some(abs) = absolute(&self.stack, segs, self.scopes, self.aliases.get(&self.stack))
        else {
            return;
        };
        let (mut to, depth) = longest_prefix(self.modules, &abs);
        // `crate::probe` names an exported macro: an import of the file that defines it.
        if let (0, Some(m)) = (depth, abs.first().and_then(|n| self.macros.get(n))) {
            to = *m;
        }
        // `crate::log::info` where the root has `use log;` (or `use other_crate::x`): another
        // crate reached through the root's shorthand, not an import of the root. (Through any
        // other module, `m::x` names `m`, whatever `m` re-exports.)
        if let (0, Some(name)) = (depth, abs.first()) {
            if matches!(self.aliases.get(&abs[..0]).and_then(|a| a.get(name)), Some(None)) {
                return;
            }
        }
        if to != self.from {
            let file = &self.file;
            self.edges
                .entry((self.from, to))
                .or_insert_with(|| format!("{file}: {what}{}", segs.join("::")));
        }
    }
}

impl<'ast> Visit<'ast> for Resolve<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if let Some((_, items)) = &m.content {
            self.stack.push(m.ident.to_string());
            for i in items {
                self.visit_item(i);
            }
            self.stack.pop();
        }
    }
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if u.leading_colon.is_some() {
            return;
        }
        let mut out = Vec::new();
        expand_use(&u.tree, &mut Vec::new(), &mut out);
        for (p, _) in out {
            self.note(&p, "use ");
        }
    }
    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() && p.segments.len() > 1 {
            let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            self.note(&segs, "");
        }
        syn::visit::visit_path(self, p);
    }
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        use syn::punctuated::Punctuated;
        self.visit_path(&m.path);
        // `format!("..", crate::x())`, `vec![..]`, `assert!(..)`: arguments that parse as
        // expressions are visited; other macro bodies (asm!, macro_rules!) are not.
        if let Ok(args) =
            m.parse_body_with(Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated)
        {
            for e in &args {
                self.visit_expr(e);
            }
        }
    }
}

/// The graph of the crate whose root file is `root_file`; `shown` is how files are named in
/// the output (relative to the workspace).
pub fn graph(root_file: &Path, shown: &Path) -> Result<Graph> {
    let mut scopes: BTreeMap<ModPath, Scope> = BTreeMap::new();
    let mut modules: BTreeMap<ModPath, usize> = BTreeMap::new();
    let mut names = Vec::new();
    let mut files = Vec::new();
    let mut asts = Vec::new();
    let root_dir = root_file.parent().context("root file has a folder")?.to_path_buf();
    // (module path, file, folder of its children)
    let mut queue = vec![(Vec::new(), root_file.to_path_buf(), root_dir.clone())];
    while let Some((path, file, dir)) = queue.pop() {
        let node = names.len();
        let src = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let ast = syn::parse_file(&src).with_context(|| format!("parsing {}", file.display()))?;
        names.push(if path.is_empty() { "crate".to_string() } else { path.join("::") });
        files.push(file.clone());
        scopes.insert(path.clone(), Scope { node, ..Scope::default() });
        let mut c = Collect {
            stack: path.clone(),
            node,
            scopes: &mut scopes,
            child_files: Vec::new(),
            dir,
            base_depth: path.len(),
            error: None,
        };
        c.visit_file(&ast);
        if let Some(e) = c.error {
            bail!("{}: {e}", file.display());
        }
        for (child, child_dir) in c.child_files.into_iter().rev() {
            let name = child.last().expect("child has a name").clone();
            let parent = child_dir.parent().expect("a folder").to_path_buf();
            let flat = parent.join(format!("{name}.rs"));
            let folder = parent.join(&name).join("mod.rs");
            let f = if flat.exists() {
                flat
            } else if folder.exists() {
                folder
            } else {
                bail!(
                    "{}: `mod {name};` has neither {} nor {}",
                    file.display(),
                    flat.display(),
                    folder.display()
                );
            };
            queue.push((child, f, child_dir));
        }
        asts.push((path, ast));
    }
    let mut macros = BTreeMap::new();
    for (p, s) in &scopes {
        modules.insert(p.clone(), s.node);
        for m in &s.macros {
            macros.insert(m.clone(), s.node);
        }
    }
    // The names each scope's `use`s bind, in order (a `use` may start from an earlier one).
    let mut aliases: BTreeMap<ModPath, Aliases> = BTreeMap::new();
    for (p, s) in &scopes {
        let mut bound = Aliases::new();
        for (segs, name) in &s.uses {
            if let Some(name) = name {
                let abs = absolute(p, segs, &scopes, Some(&bound));
                bound.insert(name.clone(), abs);
            }
        }
        aliases.insert(p.clone(), bound);
    }
    let mut edges = BTreeMap::new();
    for (i, (path, ast)) in asts.iter().enumerate() {
        let rel = files[i].strip_prefix(&root_dir).unwrap_or(&files[i]);
        let mut r = Resolve {
            stack: path.clone(),
            scopes: &scopes,
            modules: &modules,
            macros: &macros,
            aliases: &aliases,
            from: i,
            file: shown.join(rel).display().to_string(),
            edges: &mut edges,
        };
        r.visit_file(ast);
    }
    Ok(Graph { modules: names, files, edges })
}

impl Graph {
    /// The strongly connected components with more than one module (Tarjan), each sorted.
    pub fn cycles(&self) -> Vec<Vec<usize>> {
        let n = self.modules.len();
        let mut adj = vec![Vec::new(); n];
        for &(a, b) in self.edges.keys() {
            adj[a].push(b);
        }
        struct T<'a> {
            adj: &'a [Vec<usize>],
            index: Vec<Option<usize>>,
            low: Vec<usize>,
            on: Vec<bool>,
            stack: Vec<usize>,
            next: usize,
            out: Vec<Vec<usize>>,
        }
        fn strong(t: &mut T<'_>, v: usize) {
            t.index[v] = Some(t.next);
            t.low[v] = t.next;
            t.next += 1;
            t.stack.push(v);
            t.on[v] = true;
            for &w in &t.adj[v] {
                match t.index[w] {
                    None => {
                        strong(t, w);
                        t.low[v] = t.low[v].min(t.low[w]);
                    }
                    Some(iw) if t.on[w] => t.low[v] = t.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(t.low[v]) == t.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = t.stack.pop() {
                    t.on[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort_unstable();
                    t.out.push(comp);
                }
            }
        }
        let mut t = T {
            adj: &adj,
            index: vec![None; n],
            low: vec![0; n],
            on: vec![false; n],
            stack: Vec::new(),
            next: 0,
            out: Vec::new(),
        };
        for v in 0..n {
            if t.index[v].is_none() {
                strong(&mut t, v);
            }
        }
        t.out.sort();
        t.out
    }

    /// One shortest circle through the first module of `comp` (a component from `cycles`).
    pub fn circle(&self, comp: &[usize]) -> Vec<usize> {
        let start = comp[0];
        let inside: BTreeSet<usize> = comp.iter().copied().collect();
        let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
        let mut frontier = vec![start];
        while !frontier.is_empty() {
            let mut next = Vec::new();
            for &v in &frontier {
                for &(a, b) in self.edges.keys() {
                    if a != v || !inside.contains(&b) {
                        continue;
                    }
                    if b == start {
                        let mut path = vec![v];
                        let mut at = v;
                        while at != start {
                            at = prev[&at];
                            path.push(at);
                        }
                        path.reverse();
                        return path;
                    }
                    if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(b) {
                        e.insert(v);
                        next.push(b);
                    }
                }
            }
            frontier = next;
        }
        comp.to_vec()
    }

    /// The cycles, each as a circle with the line that makes each step; empty when none.
    pub fn describe_cycles(&self) -> String {
        let mut out = String::new();
        for comp in self.cycles() {
            let names: Vec<&str> = comp.iter().map(|&i| self.modules[i].as_str()).collect();
            let _ = writeln!(out, "  cycle among {} modules: {}", comp.len(), names.join(", "));
            let circle = self.circle(&comp);
            for (k, &a) in circle.iter().enumerate() {
                let b = circle[(k + 1) % circle.len()];
                let _ = writeln!(
                    out,
                    "    {} -> {}  ({})",
                    self.modules[a],
                    self.modules[b],
                    self.edges[&(a, b)]
                );
            }
        }
        out
    }

    /// The graph, one module a line with what it imports.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.modules.iter().enumerate() {
            let to: Vec<&str> = self
                .edges
                .keys()
                .filter(|(a, _)| *a == i)
                .map(|&(_, b)| self.modules[b].as_str())
                .collect();
            let _ = writeln!(
                out,
                "  {m} -> {}",
                if to.is_empty() { "(nothing)".into() } else { to.join(", ") }
            );
        }
        out
    }
}

/// Crates whose cycles `cargo xtask test` prints without failing: none (the hypervisor's
/// last three, `caps`/`caps::control`, `instance`/its parts and `exits`/`fastexit`, are
/// gone). A crate listed here would be checked but not failed.
pub const TOLERATED: &[&str] = &[];

/// Checks every crate in `CRATES` under `root`; prints each crate's cycles (and its whole
/// graph when `verbose`). Ok(false) when any crate not in `tolerated` has a cycle.
pub fn check(root: &Path, verbose: bool, tolerated: &[&str]) -> Result<bool> {
    let mut clean = true;
    for (name, file) in CRATES {
        let path = root.join(file);
        let shown = Path::new(file).parent().expect("a folder");
        let g = graph(&path, shown)?;
        let cycles = g.describe_cycles();
        if verbose {
            println!("{name}: {} modules, {} imports", g.modules.len(), g.edges.len());
            print!("{}", g.describe());
        }
        if cycles.is_empty() {
            println!("{name}: no import cycle");
        } else if tolerated.contains(name) {
            println!("{name}: import cycles (known, not failing this check)\n{cycles}");
        } else {
            clean = false;
            println!("{name}: import cycles\n{cycles}");
        }
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (f, src) in files {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, src).unwrap();
        }
    }

    fn names(g: &Graph) -> Vec<Vec<&str>> {
        g.cycles().iter().map(|c| c.iter().map(|&i| g.modules[i].as_str()).collect()).collect()
    }

    #[test]
    fn finds_a_circle_through_every_kind_of_path() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            &[
                ("lib.rs", "mod a; mod b; pub mod c; fn root() {}"),
                // a -> b by `use crate::`, b -> c/mod.rs by a module alias, c -> c::d by a
                // child path, d -> a by `super::super` inside a format! argument.
                ("a.rs", "use crate::b::f; pub fn g() { f() }"),
                ("b.rs", "use crate::c; pub fn f() { c::h() }"),
                ("c/mod.rs", "mod d; pub fn h() { d::k() }"),
                ("c/d.rs", "pub fn k() { let _ = format!(\"{}\", super::super::a::g()); }"),
            ],
        );
        let g = graph(&d.path().join("lib.rs"), Path::new("x")).unwrap();
        assert_eq!(names(&g), vec![vec!["a", "b", "c", "c::d"]]);
        let text = g.describe_cycles();
        assert!(text.contains("a -> b  (x/a.rs: use crate::b::f)"), "{text}");
        assert!(text.contains("c::d -> a"), "{text}");
    }

    #[test]
    fn declarations_inline_modules_and_other_crates_are_not_imports() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            &[
                // The root declares both and a reaches b; b names std, the root only by
                // `crate::` (the root imports nobody), and its own inline test module.
                ("lib.rs", "mod a; mod b; pub fn root() {}"),
                ("a.rs", "use crate::b; pub fn g() { b::f() }"),
                (
                    "b.rs",
                    "use std::fmt; pub fn f() { crate::root() }\n\
                     mod tests { use super::*; fn t() { self::inner::x(); super::f(); } mod inner { pub fn x() {} } }",
                ),
            ],
        );
        let g = graph(&d.path().join("lib.rs"), Path::new("x")).unwrap();
        assert!(g.cycles().is_empty(), "{}", g.describe_cycles());
        assert_eq!(g.edges.len(), 2, "{}", g.describe());
    }

    #[test]
    fn a_missing_module_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), &[("lib.rs", "mod gone;")]);
        let e = graph(&d.path().join("lib.rs"), Path::new("x")).unwrap_err();
        assert!(format!("{e:#}").contains("mod gone;"), "{e:#}");
    }

    /// Our own crates, except the hypervisor (its cycles are reported by `cargo xtask
    /// test` and `cargo xtask imports`).
    #[test]
    fn our_crates_have_no_import_cycle() {
        let root = crate::workspace_root();
        for (name, file) in CRATES.iter().filter(|(n, _)| !TOLERATED.contains(n)) {
            let g = graph(&root.join(file), Path::new(file).parent().unwrap()).unwrap();
            let cycles = g.describe_cycles();
            assert!(cycles.is_empty(), "{name} has import cycles:\n{cycles}");
        }
    }
}
