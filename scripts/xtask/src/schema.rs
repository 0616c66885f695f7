// SPDX-License-Identifier: MIT OR Apache-2.0
//! The JSON Schema of the run report, generated from `report::Report` (schemars) and kept in
//! the repository at [`REPORT_SCHEMA`] for readers in other languages. `cargo xtask schema
//! --update` rewrites it; a host test fails while the file and the types disagree, and the
//! system tests validate real reports against the file. Owns the file; calls only schemars
//! on `report`'s types.

use anyhow::{Context, Result};

/// The schema file, relative to the workspace root.
pub const REPORT_SCHEMA: &str = "schemas/report.schema.json";

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

/// `cargo xtask schema`: prints the schema, or rewrites the file with `update`.
pub fn command(update: bool) -> Result<()> {
    let text = report_schema();
    if update {
        let path = crate::workspace_root().join(REPORT_SCHEMA);
        std::fs::create_dir_all(path.parent().expect("schemas/"))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("xtask schema: wrote {}", path.display());
    } else {
        print!("{text}");
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
