// SPDX-License-Identifier: MIT OR Apache-2.0
//! The JSON Schemas of the run report and of the config file, generated from
//! `report::Report` and `config::Config` (schemars) and kept in the repository at
//! [`REPORT_SCHEMA`] and [`CONFIG_SCHEMA`]: the first for readers of reports in other
//! languages, the second for editors (taplo, Even Better TOML) to complete and check configs.
//! `cargo xtask schema --update` rewrites both; host tests fail while a file and its types
//! disagree, or a config of `configs/` does not validate; the system tests validate real
//! reports. Owns the files; calls only schemars on `report`'s and `config`'s types.

use anyhow::{Context, Result};

/// The schema file, relative to the workspace root.
pub const REPORT_SCHEMA: &str = "schemas/report.schema.json";

/// The config schema file, relative to the workspace root.
pub const CONFIG_SCHEMA: &str = "schemas/config.schema.json";

/// Which schema `cargo xtask schema` prints.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The run report (`run --report`).
    Report,
    /// The config file (`run --config`).
    Config,
}

/// The config file's JSON Schema (draft 2020-12), pretty-printed, with a final newline. It
/// checks the shape of a config (keys, types, the simple ranges and names); the rules that
/// relate fields to each other (one guest per core, memory that fits, channels between
/// known guests) are `cargo xtask check`'s.
pub fn config_schema() -> String {
    let mut schema = schemars::schema_for!(crate::config::Config);
    schema.insert("$id".into(), "https://mkvisor.invalid/schemas/config.schema.json".into());
    schema.insert("title".into(), "mkvisor machine config".into());
    schema.insert(
        "description".into(),
        "An mkvisor machine description (`cargo xtask run --config FILE.toml`; reference: \
         docs/config.md). The schema checks keys, types and simple ranges; `cargo xtask check \
         FILE.toml` checks everything else."
            .into(),
    );
    serde_json::to_string_pretty(&schema).expect("a schema serialises") + "\n"
}

/// The report's JSON Schema (draft 2020-12), pretty-printed, with a final newline.
pub fn report_schema() -> String {
    let mut schema = schemars::schema_for!(crate::report::Report);
    schema.insert("$id".into(), "https://mkvisor.invalid/schemas/report.schema.json".into());
    schema.insert(
        "description".into(),
        format!(
            "An mkvisor run report (`cargo xtask run --report`), schema_version {}. Every \
             field with `tsc` in its name is in the report's `tsc_unit`.",
            crate::report::SCHEMA_VERSION
        )
        .into(),
    );
    serde_json::to_string_pretty(&schema).expect("a schema serialises") + "\n"
}

/// `cargo xtask schema`: prints one schema, or rewrites both files with `update`.
pub fn command(which: Which, update: bool) -> Result<()> {
    if update {
        for (file, text) in [(REPORT_SCHEMA, report_schema()), (CONFIG_SCHEMA, config_schema())] {
            let path = crate::workspace_root().join(file);
            std::fs::create_dir_all(path.parent().expect("schemas/"))?;
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            crate::exit::note(format_args!("wrote {}", path.display()));
        }
    } else {
        print!("{}", if which == Which::Config { config_schema() } else { report_schema() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_in_the_repository_is_current() {
        let path = crate::workspace_root().join(REPORT_SCHEMA);
        let file = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            file == report_schema(),
            "{} is out of date: run `cargo xtask schema --update`",
            path.display()
        );
    }

    #[test]
    fn the_config_schema_in_the_repository_is_current() {
        let path = crate::workspace_root().join(CONFIG_SCHEMA);
        let file = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            file == config_schema(),
            "{} is out of date: run `cargo xtask schema --update`",
            path.display()
        );
    }

    fn config_validator() -> jsonschema::Validator {
        let schema: serde_json::Value = serde_json::from_str(&config_schema()).unwrap();
        jsonschema::validator_for(&schema).unwrap()
    }

    /// A TOML config as the JSON value a schema validator sees (what taplo does too).
    fn toml_as_json(src: &str) -> serde_json::Value {
        toml::from_str(src).unwrap()
    }

    /// Every `.toml` under `dir`, recursively.
    fn tomls(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                tomls(&p, out);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }

    #[test]
    fn every_config_the_tool_accepts_validates_against_the_schema() {
        let v = config_validator();
        let root = crate::workspace_root();
        let mut files = Vec::new();
        tomls(&root.join("configs"), &mut files);
        tomls(&root.join("examples"), &mut files);
        let (mut accepted, mut shape_errors) = (0, 0);
        for f in &files {
            let src = std::fs::read_to_string(f).unwrap();
            let Ok(json) = toml::from_str::<serde_json::Value>(&src) else { continue };
            // Cargo manifests and other TOML files under examples/ are not configs.
            if json.get("machine").is_none() {
                continue;
            }
            let errors: Vec<String> = v.iter_errors(&json).map(|e| e.to_string()).collect();
            // The tool's own parser (shape only: the semantic checks may refuse a config
            // on purpose, as configs/hostile/ and configs/bad-* do).
            let shape_ok = toml::from_str::<crate::config::Config>(&src).is_ok();
            if shape_ok {
                assert!(errors.is_empty(), "{}: {errors:?}", f.display());
                accepted += 1;
            } else {
                shape_errors += 1;
            }
            if crate::config::compile(&f.display().to_string(), &src).is_ok() {
                assert!(errors.is_empty(), "{}: {errors:?}", f.display());
            }
        }
        assert!(accepted >= 40, "only {accepted} configs checked ({shape_errors} malformed)");
    }

    #[test]
    fn the_config_schema_rejects_what_the_parser_rejects() {
        let v = config_validator();
        let good = "[machine]\ncpus = 2\nmemory_mib = 256\n[[guest]]\nname = \"a\"\ncore = 1\n\
                    memory_mib = 16\nworkload = \"hello\"\nrestart = \"on-fault\"\n\
                    args = { n = 3, loud = true, who = \"x\" }\n\
                    devices = [\"00:02.0\", { pci = \"8086:100e\", dma = \"unconfined\" }]\n\
                    [[nic]]\nmodel = \"e1000\"\nforward = [\"tcp:18080-80\"]\n";
        assert!(v.is_valid(&toml_as_json(good)));
        for (what, bad) in [
            ("unknown key", good.replace("core = 1", "core = 1\ncolour = 3")),
            ("a string for a count", good.replace("core = 1", "core = \"one\"")),
            ("no machine", good.replace("[machine]\ncpus = 2\nmemory_mib = 256\n", "")),
            ("restart policy", good.replace("on-fault", "sometimes")),
            ("guest name", good.replace("name = \"a\"", "name = \"a b\"")),
            ("nic model", good.replace("e1000", "rtl8139")),
            ("cpus", good.replace("cpus = 2", "cpus = 65")),
            ("memory", good.replace("memory_mib = 256", "memory_mib = 4096")),
            ("negative core", good.replace("core = 1", "core = -1")),
        ] {
            assert!(!v.is_valid(&toml_as_json(&bad)), "{what}: accepted\n{bad}");
        }
        // The schema's lists of names are the tool's.
        let schema: serde_json::Value = serde_json::from_str(&config_schema()).unwrap();
        let text = schema.to_string();
        for name in crate::config::NIC_MODELS.iter().map(|m| m.name) {
            assert!(text.contains(&format!("\"{name}\"")), "{name}");
        }
        let enums = |key: &str| -> Vec<String> {
            let mut found = Vec::new();
            fn walk(v: &serde_json::Value, key: &str, out: &mut Vec<String>) {
                match v {
                    serde_json::Value::Object(m) => {
                        if let Some(p) = m.get("properties").and_then(|p| p.get(key)) {
                            if let Some(e) = p.get("enum").and_then(|e| e.as_array()) {
                                out.extend(e.iter().filter_map(|x| x.as_str()).map(String::from));
                            }
                        }
                        m.values().for_each(|x| walk(x, key, out));
                    }
                    serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, key, out)),
                    _ => {}
                }
            }
            walk(&schema, key, &mut found);
            found
        };
        assert_eq!(enums("restart"), vmcall_proto::config::restart::NAMES);
        assert_eq!(enums("revoke"), crate::config::REVOKE_STRATEGIES);
        let models: Vec<&str> = crate::config::NIC_MODELS.iter().map(|m| m.name).collect();
        assert_eq!(enums("model"), models);
    }

    #[test]
    fn the_schema_accepts_reports_and_rejects_malformed_ones() {
        let schema: serde_json::Value = serde_json::from_str(&report_schema()).unwrap();
        let v = jsonschema::validator_for(&schema).unwrap();
        let mut c = crate::report::Console::default();
        for l in [
            "#mkv boot abi=1 tsc=100 cmdline=\"\"",
            "#mkv cpus count=1 enabled=1 used=1 bsp_apic=0 x2apic=1",
            "#mkv core index=0 apic=0 state=up vmx=on reason=\"\"",
            "#mkv ready tsc=150",
            "#mkv guest index=0 name=a core=0 state=exited exit_status=0 exits=\"vmcall:2\" fault=\"\" hypercalls=2 tsc_first_entry=160 tsc_end=200",
            "#mkv guest index=1 name=b core=1 state=not_started exit_status=0 exits=\"\" fault=\"no core\" hypercalls=0 tsc_first_entry=0 tsc_end=0",
            "#mkv end outcome=failed tsc=250",
        ] {
            c.feed(l);
        }
        let report = crate::report::for_tests(&mut c);
        let json = serde_json::to_value(&report).unwrap();
        let errors: Vec<String> = v.iter_errors(&json).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{json:#}");
        // Nulls where a guest never ran are allowed; a string where a count belongs is not,
        // nor a missing required field.
        assert!(json["guests"][1]["tsc_first_entry"].is_null());
        let mut bad = json.clone();
        bad["guests"][0]["hypercalls"] = "two".into();
        assert!(!v.is_valid(&bad));
        let mut bad = json.clone();
        bad.as_object_mut().unwrap().remove("outcome");
        assert!(!v.is_valid(&bad));
    }
}
