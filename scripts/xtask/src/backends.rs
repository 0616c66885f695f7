// SPDX-License-Identifier: MIT OR Apache-2.0
//! The hardware-neutral rule (issue 24): no module of the hypervisor outside its two CPU
//! backends names a VMCS or VMCB field. Everything else reaches the guest's processor state
//! through the vCPU interface (`hypervisor/src/vcpu.rs`: `Field`, `ExitKind`, `Event`, ...).
//! `cargo xtask imports` (and so `cargo xtask test`) fails when a file breaks it.
//!
//! The backends: `hypervisor/src/vmx/`, `hypervisor/src/svm/`, and their world switches
//! `hypervisor/src/arch/vmx.rs`, `hypervisor/src/arch/svm.rs`. Every other `.rs` file under
//! `hypervisor/src` is read as Rust tokens (comments are not tokens, so prose may talk about
//! a VMCS; doc comments are string literals and are not looked at), and may not contain:
//! * an identifier `vmcs` or `vmcb` in any case (`vmx::vmcs`, `svm::vmcb`, the `x86` crate's
//!   `x86::vmx::vmcs`, the `Vmcb` type): the modules that define the fields, reached in a
//!   path, a `use` (groups, renames and globs of them included) or a macro's arguments;
//! * `vmread` or `vmwrite` (a VMCS field by its encoding), as an identifier or inside the
//!   string of an `asm!`/`global_asm!`;
//! * `exit::reason` or `exit::code`: the backends' exit numbering (VMX basic reasons, SVM
//!   exit codes); the rest dispatches on `vcpu::ExitKind`;
//! * a field access (`x.name`) to a field of the VMCB's control area, the names read from
//!   `struct Control` in `hypervisor/src/svm/vmcb.rs` (a VMCB is plain memory: a pointer to
//!   it would reach its fields with no path naming `vmcb`).
//!
//! May call: nothing of this crate (a leaf; its tests use temporary trees).

use anyhow::{Context, Result};
use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
use std::path::{Path, PathBuf};

/// The hypervisor's sources, from the workspace root.
pub const SOURCES: &str = "hypervisor/src";
/// The backends' files and folders, relative to [`SOURCES`].
pub const BACKENDS: [&str; 4] = ["vmx/", "svm/", "arch/vmx.rs", "arch/svm.rs"];
/// Where the VMCB's control area is defined, relative to [`SOURCES`].
pub const VMCB: &str = "svm/vmcb.rs";

/// One place that names a backend's field: file (relative to [`SOURCES`]), line, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub file: String,
    pub line: usize,
    pub what: String,
}

impl std::fmt::Display for Naming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.what)
    }
}

/// The names of `struct Control`'s fields in the VMCB definition (reserved padding, whose
/// names start with `_`, left out).
pub fn control_fields(vmcb_rs: &str) -> Result<Vec<String>> {
    let file = syn::parse_file(vmcb_rs).context("parsing the VMCB definition")?;
    for item in file.items {
        if let syn::Item::Struct(s) = item {
            if s.ident == "Control" {
                let names: Vec<String> = s
                    .fields
                    .iter()
                    .filter_map(|f| f.ident.as_ref().map(|i| i.to_string()))
                    .filter(|n| !n.starts_with('_'))
                    .collect();
                anyhow::ensure!(!names.is_empty(), "`struct Control` has no named field");
                return Ok(names);
            }
        }
    }
    anyhow::bail!("no `struct Control` in the VMCB definition")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Whether `rel` (relative to [`SOURCES`], `/`-separated) is a backend's file.
pub fn is_backend(rel: &str) -> bool {
    BACKENDS.iter().any(|b| if b.ends_with('/') { rel.starts_with(b) } else { rel == *b })
}

/// Every place in `src` (the text of file `rel`) that names a backend's field.
pub fn scan(rel: &str, src: &str, fields: &[String]) -> Result<Vec<Naming>> {
    let tokens: TokenStream = src.parse().map_err(|e| anyhow::anyhow!("{rel}: {e:?}"))?;
    let mut out = Vec::new();
    walk(rel, tokens, fields, false, &mut out);
    Ok(out)
}

fn walk(rel: &str, tokens: TokenStream, fields: &[String], in_asm: bool, out: &mut Vec<Naming>) {
    let toks: Vec<TokenTree> = tokens.into_iter().collect();
    let hit = |out: &mut Vec<Naming>, t: &TokenTree, what: String| {
        out.push(Naming { file: rel.to_string(), line: t.span().start().line, what })
    };
    let ident = |i: usize| match toks.get(i) {
        Some(TokenTree::Ident(x)) => Some(x.to_string()),
        _ => None,
    };
    let punct =
        |i: usize, c: char| matches!(toks.get(i), Some(TokenTree::Punct(p)) if p.as_char() == c);
    for (i, t) in toks.iter().enumerate() {
        match t {
            TokenTree::Ident(id) => {
                let name = id.to_string();
                let lower = name.to_ascii_lowercase();
                if lower == "vmcs" || lower == "vmcb" {
                    hit(out, t, format!("`{name}` (the module or type defining the fields)"));
                } else if lower == "vmread" || lower == "vmwrite" {
                    hit(out, t, format!("`{name}` (a VMCS field by its encoding)"));
                } else if (name == "reason" || name == "code")
                    && i >= 3
                    && punct(i - 1, ':')
                    && punct(i - 2, ':')
                    && ident(i - 3).as_deref() == Some("exit")
                {
                    hit(out, t, format!("`exit::{name}` (a backend's exit numbering)"));
                } else if i >= 1
                    && fields.contains(&name)
                    && matches!(&toks[i - 1], TokenTree::Punct(p)
                        if p.as_char() == '.' && p.spacing() == Spacing::Alone)
                    // `a..b` is a range, `.name` after a joint `.` is its end.
                    && !(i >= 2 && matches!(&toks[i - 2], TokenTree::Punct(p)
                        if p.as_char() == '.' && p.spacing() == Spacing::Joint))
                {
                    hit(out, t, format!("`.{name}` (a field of the VMCB's control area)"));
                }
            }
            TokenTree::Literal(l) if in_asm => {
                let s = l.to_string().to_ascii_lowercase();
                if s.contains("vmread") || s.contains("vmwrite") {
                    hit(out, t, "VMREAD/VMWRITE in assembly (a VMCS field by its encoding)".into());
                }
            }
            TokenTree::Group(g) => {
                // `asm!(..)` / `global_asm!(..)`: its strings are instructions.
                let asm = g.delimiter() != Delimiter::None
                    && i >= 2
                    && punct(i - 1, '!')
                    && matches!(ident(i - 2).as_deref(), Some("asm" | "global_asm"));
                walk(rel, g.stream(), fields, in_asm || asm, out);
            }
            _ => {}
        }
    }
}

/// Checks every file under `root`'s hypervisor sources outside the backends. Returns what
/// names a backend's field (empty: the rule holds).
pub fn check_tree(root: &Path) -> Result<Vec<Naming>> {
    let src = root.join(SOURCES);
    let vmcb = std::fs::read_to_string(src.join(VMCB))
        .with_context(|| format!("reading {}", src.join(VMCB).display()))?;
    let fields = control_fields(&vmcb)?;
    let mut files = Vec::new();
    rust_files(&src, &mut files)?;
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src)?.to_string_lossy().replace('\\', "/");
        if is_backend(&rel) {
            continue;
        }
        let text = std::fs::read_to_string(&f)?;
        out.extend(scan(&rel, &text, &fields)?);
    }
    Ok(out)
}

/// `cargo xtask imports`'s part: prints the verdict; Ok(false) when something outside the
/// backends names a VMCS or VMCB field.
pub fn check(root: &Path) -> Result<bool> {
    let naming = check_tree(root)?;
    if naming.is_empty() {
        println!(
            "hypervisor: no module outside the backends ({}) names a VMCS or VMCB field",
            BACKENDS.join(", ")
        );
        return Ok(true);
    }
    println!("hypervisor: outside the backends ({}), these name a VMCS or VMCB field; use the vCPU interface (hypervisor/src/vcpu.rs):", BACKENDS.join(", "));
    for n in &naming {
        println!("  {SOURCES}/{n}");
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMCB_RS: &str = "#[repr(C)] pub struct Control { pub intercept_misc1: u32, \
                           _reserved: [u8; 4], pub event_inj: u64, pub interrupt_shadow: u64 }\n\
                           pub struct StateSave { pub rip: u64 }";

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (f, text) in files {
            let p = d.path().join(SOURCES).join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    fn whats(n: &[Naming]) -> Vec<String> {
        n.iter().map(|n| format!("{}:{}", n.file, n.line)).collect()
    }

    #[test]
    fn the_control_area_names_come_from_the_vmcb_definition() {
        assert_eq!(
            control_fields(VMCB_RS).unwrap(),
            ["intercept_misc1", "event_inj", "interrupt_shadow"]
        );
        assert!(control_fields("pub struct Other { pub a: u8 }").is_err());
    }

    /// Each way of naming a field, planted in a module outside the backends, is found; the
    /// same text inside a backend, in comments or docs, and look-alikes are not.
    #[test]
    fn planted_violations_are_found_and_only_they() {
        let clean = "//! Talks about the VMCS and a VMCB's event_inj in prose.\n\
                     /// Doc: vmread, x.event_inj, exit::reason.\n\
                     use crate::vcpu::{Field, ExitKind};\n\
                     fn f(v: &mut impl Vcpu, r: core::ops::Range<u64>) -> u64 {\n\
                         let s = \"vmread in a plain string\";\n\
                         let _ = (s, r.start..r.end, v.percpu.vmcs_live);\n\
                         v.read(Field::Interruptibility)\n\
                     }\n";
        let d = tree(&[
            ("svm/vmcb.rs", VMCB_RS),
            (
                "svm/vcpu.rs",
                "use super::vmcb::Vmcb; fn g(v: &mut Vmcb) { v.control.event_inj = 0; }",
            ),
            ("vmx/vcpu.rs", "use crate::vmx::vmcs::g; fn h() { vmread(g::RIP) }"),
            ("arch/vmx.rs", "core::arch::global_asm!(\"vmread rax, rbx\");"),
            ("exits.rs", clean),
        ]);
        assert_eq!(check_tree(d.path()).unwrap(), Vec::<Naming>::new(), "a clean tree");

        let planted = [
            ("a.rs", "use crate::vmx::vmcs::g;"),
            ("b.rs", "use crate::svm::{exit, vmcb as v};"),
            ("c.rs", "fn f() { let x = x86::vmx::vmcs::guest::RIP; }"),
            ("d.rs", "use crate::svm::*;\nfn f(p: *mut Vmcb) {}"),
            ("e.rs", "fn f(p: &mut P) {\n    p.control.event_inj = 0;\n}"),
            ("f.rs", "fn f() { unsafe { crate::arch::vmwrite(0x681e, 0) } }"),
            ("g.rs", "fn f() { core::arch::asm!(\"vmread {0}, {1}\", in(reg) 1, out(reg) _) }"),
            ("h.rs", "fn f(r: u16) -> bool { r == crate::vmx::exit::reason::HLT }"),
            ("i.rs", "fn f(c: u64) -> bool { c == svm::exit::code::HLT }"),
            ("j.rs", "fn f(v: &V) { log::info!(\"{}\", v.interrupt_shadow); }"),
            ("instance/k.rs", "mod inner { fn f(p: &P) -> u32 { p.save_area().intercept_misc1 } }"),
        ];
        let mut files = vec![("svm/vmcb.rs", VMCB_RS), ("exits.rs", clean)];
        files.extend(planted);
        let d = tree(&files);
        let found = check_tree(d.path()).unwrap();
        let mut where_ = whats(&found);
        where_.dedup();
        assert_eq!(
            where_,
            [
                "a.rs:1",
                "b.rs:1",
                "c.rs:1",
                "d.rs:2",
                "e.rs:2",
                "f.rs:1",
                "g.rs:1",
                "h.rs:1",
                "i.rs:1",
                "instance/k.rs:1",
                "j.rs:1"
            ],
            "{found:#?}"
        );
        assert!(!check(d.path()).unwrap(), "the check fails on them");
    }

    /// The rule holds for the hypervisor as it is (the same run as `cargo xtask imports`).
    #[test]
    fn no_module_outside_the_backends_names_a_vmcs_or_vmcb_field() {
        let root = crate::workspace_root();
        let fields =
            control_fields(&std::fs::read_to_string(root.join(SOURCES).join(VMCB)).unwrap())
                .unwrap();
        assert!(fields.len() > 10 && fields.iter().any(|f| f == "event_inj"), "{fields:?}");
        let naming = check_tree(&root).unwrap();
        assert!(
            naming.is_empty(),
            "{}",
            naming.iter().map(|n| n.to_string() + "\n").collect::<String>()
        );
    }
}
