// SPDX-License-Identifier: MIT OR Apache-2.0
//! Serial records: the machine-readable half of the hypervisor's console.
//!
//! Human-readable log lines and records share COM1. A record is one line:
//!
//! ```text
//! #mkv <kind> <key>=<value> <key>="a quoted value" ...
//! ```
//!
//! Values are bare tokens without spaces, or double-quoted strings in which `"` and `\`
//! are escaped with `\`. The hypervisor writes records with [`Quoted`] and plain
//! `Display` values; host tools read them with [`parse`]. A line that is not a well-formed
//! record is ignored by [`parse`] (it is log text), never half-read: a malformed field
//! makes the whole record `None`.

use core::fmt;

/// Every record line starts with this prefix.
pub const PREFIX: &str = "#mkv ";

/// Record kinds written by the hypervisor.
pub mod kind {
    /// The hypervisor is running: `abi`, `tsc` (time-stamp counter at entry), `cmdline`.
    pub const BOOT: &str = "boot";
    /// The processors the firmware lists: `count`, `bsp_apic`, `x2apic`, `capped`.
    pub const CPUS: &str = "cpus";
    /// A core reached long mode and its own state: `index`, `apic`.
    pub const ONLINE: &str = "online";
    /// Every started core has reported its bring-up (the BSP's collection is over):
    /// `tsc`. From hypervisor entry to here is the hypervisor's own boot; guests may
    /// already run on cores that came up earlier, but no guest time is added after it.
    pub const READY: &str = "ready";
    /// One core's final state: `index`, `apic`, `state` (see [`super::core_state`]),
    /// `vmx` (`on`, `off`, `failed`: the core's virtualization, whichever backend),
    /// `backend` (`vmx` or `svm`), optionally `reason`.
    pub const CORE: &str = "core";
    /// One guest's end: `index`, `name`, `core`, `state` (see [`super::guest_state`]),
    /// `exit_status`, `exits` (quoted `reason:count` words), `fault` (quoted, when stopped),
    /// `hypercalls`, `tsc_first_entry`, `tsc_end`; then its core's counters (`xmsgs`, `nmis`,
    /// ...), among them the revoke protocol's own traffic through its core (`rv_sent`,
    /// `rv_received`: `REVOKE`/`REVOKE_REPLY` ring messages; `rv_mc_named`, `rv_mc_served`,
    /// `rv_mc_taken`: multicast requests and answers; `rv_exits`: guest exits that served
    /// revoke work; `rv_own`, `rv_rounds`: its own revokes and the last one's rounds), and
    /// its membership failure detector's (`mb_pings_sent`, `mb_pings_received`,
    /// `mb_pongs_sent`, `mb_pongs_received`, `mb_probe_exits`: guest exits after which it
    /// counted one; `mb_unattributed`: view-change messages no `vchange` record had room for).
    pub const GUEST: &str = "guest";
    /// One incarnation of a guest ended (printed by its core when it does): `guest`, `n`
    /// (1 for the first start), `ending` (`exited`/`stopped`), `exit_status`, `fault`
    /// (quoted), `tsc_start` (setup began), `tsc_first_entry`, `tsc_end`,
    /// `frames_at_start` (private frames in use when it was entered: equal for every
    /// incarnation, or something leaked), `caps_revoked`, `caps_unconfirmed`, `caps_dropped`
    /// (its clean death), `caps_live`, `link_resets`, `link_lost`, `exits` (quoted
    /// `reason:count` words, this incarnation's), `hypercalls`.
    pub const INCARNATION: &str = "incarnation";
    /// An incarnation of a guest is about to be entered for the first time (printed by its
    /// core once its setup is done): `guest`, `n` (1 for the first start), `core`, `tsc`.
    pub const START: &str = "start";
    /// A running incarnation's figures so far (command-line word `stats_ms=N`: at most every
    /// N ms, at its core's membership probes): `guest`, `n`, `core`, `tsc`, `exits` (quoted
    /// `reason:count` words), `hypercalls`, `traffic` (quoted `channel:sent:received` words,
    /// as its status page last copied them).
    pub const STATS: &str = "stats";
    /// A membership view installed on a core: `core num members by tsc` (`members`: the
    /// core indices, space-separated; `by`: the core that coordinated it).
    pub const VIEW: &str = "view";
    /// What one core sent and handled for one membership view change (printed when it
    /// installs the view; at its end for a change it never installed, `installed=0`):
    /// `core num installed sent received rounds exits tsc_first tsc_last` (`sent`,
    /// `received`: quoted `kind:count` words of the view-change messages, zeros left out;
    /// `rounds`: ballots it tried as the coordinator; `exits`: its guest's exits after which
    /// it counted one; `tsc_first`, `tsc_last`: its first and last such message). A message
    /// counts for the change after the view its core had installed then.
    pub const VCHANGE: &str = "vchange";
    /// A core's failure detector (or a round's deadline) fenced another: `core target tsc`.
    pub const SUSPECT: &str = "suspect";
    /// `inject=hung-core:N` fired: `core tsc` (the moment it stopped answering).
    pub const HANG: &str = "hang";
    /// A request from the host's control channel answered (`vmcall_proto::hostctl`):
    /// `id`, `op`, `guest` (quoted), `outcome` (`hostctl::outcome`), `detail` (quoted),
    /// `tsc`. Written by the core that serves the channel.
    pub const HOSTCTL: &str = "hostctl";
    /// A channel's counters at the end, as its guests left them: `name`, `a`, `b`, `slots`,
    /// `a_sent`, `b_received`, `b_sent`, `a_received`.
    pub const CHANNEL: &str = "channel";
    /// Part of one core's exit trace (cmdline word `trace`), written by that core when its
    /// guest has ended: `core`, `base` (TSC of the first listed exit's entry), `ev` (quoted
    /// [`super::trace`] words, oldest first). A guest's trace is its core's records in order.
    pub const TRACE: &str = "trace";
    /// One core's trace totals, after its `trace` records: `core`, `exits` (all traced),
    /// `kept` (in the records; the ring keeps the newest), `guest_tsc` (summed entry-to-exit
    /// time), `hv_tsc` (summed exit-to-next-entry time).
    pub const TRACE_SUM: &str = "tracesum";
    /// A PCI function found at boot: `bdf`, `id` (`vendor:device`), `class`, `header`,
    /// `pin`, `line`, `bars` (quoted `index:kind:base+size` words, hex).
    pub const PCI: &str = "pci";
    /// A PCI function given to a guest: `guest` (index), `name`, `bdf`, `id`, `vector`,
    /// `line`, `dma` (`unconfined` or `off`), `bars` (quoted `index:kind:gpa->base+size`).
    pub const DEVICE: &str = "device";
    /// A required feature is missing: `missing` (what, in one phrase).
    pub const REFUSED: &str = "refused";
    /// The run is over: `outcome` (see [`super::outcome`]), `cores`, `vmx_on`, `tsc`.
    pub const END: &str = "end";
}

/// Values of the `state` field of a [`kind::CORE`] record.
pub mod core_state {
    /// The core reported in and finished its bring-up.
    pub const UP: &str = "up";
    /// INIT-SIPI-SIPI was sent but the core never answered.
    pub const SILENT: &str = "silent";
    /// The core answered but hit an error during its bring-up.
    pub const FAILED: &str = "failed";
    /// The core was left out by the `cpus=` cap or is disabled in the MADT.
    pub const SKIPPED: &str = "skipped";
}

/// Values of the `state` field of a [`kind::GUEST`] record.
pub mod guest_state {
    /// The guest called the exit hypercall; `exit_status` is its status.
    pub const EXITED: &str = "exited";
    /// The hypervisor stopped it; `fault` says why and where.
    pub const STOPPED: &str = "stopped";
    /// It never ran; `fault` says why (no such core, no memory, core failed).
    pub const NOT_STARTED: &str = "not_started";
    /// Its core stopped answering and the others fenced it out of the membership view.
    pub const FENCED: &str = "fenced";
    /// Still running when the run's length (`duration_ms`) was over: stopped there.
    pub const ENDED: &str = "ended";
}

/// Values of the `outcome` field of a [`kind::END`] record.
pub mod outcome {
    pub const OK: &str = "ok";
    pub const FAILED: &str = "failed";
    pub const REFUSED: &str = "refused";
}

/// The exit words of a [`kind::TRACE`] record: `reason:gap:guest` each, where `gap` is the
/// time from the previous exit to this exit's VM entry (0 for a record's first word, whose
/// entry is the record's `base`) and `guest` the time from that entry to the exit, in TSC
/// ticks. Written by the hypervisor with [`Word`], read by host tools with [`events`].
pub mod trace {
    use core::fmt;

    /// Exit words per record line: short lines, so a console reader never waits long.
    pub const WORDS_PER_RECORD: usize = 16;

    /// One exit as written: its reason's name and the two intervals.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Word<'a> {
        pub reason: &'a str,
        pub gap: u64,
        pub guest: u64,
    }

    impl fmt::Display for Word<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}:{}:{}", self.reason, self.gap, self.guest)
        }
    }

    /// One exit as read back: reason, VM entry and exit TSC (absolute).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Event<'a> {
        pub reason: &'a str,
        pub entry: u64,
        pub exit: u64,
    }

    /// The exits of one record's `ev` value (unescaped: it holds no quotes) with its `base`;
    /// `None` for a malformed word (the reader drops the whole record).
    pub fn events(ev: &str, base: u64) -> impl Iterator<Item = Option<Event<'_>>> + '_ {
        let mut cursor = base;
        ev.split_ascii_whitespace().map(move |w| {
            let mut parts = w.split(':');
            let reason = parts.next().filter(|r| !r.is_empty())?;
            let gap: u64 = parts.next()?.parse().ok()?;
            let guest: u64 = parts.next()?.parse().ok()?;
            if parts.next().is_some() {
                return None;
            }
            let entry = cursor.checked_add(gap)?;
            let exit = entry.checked_add(guest)?;
            cursor = exit;
            Some(Event { reason, entry, exit })
        })
    }
}

/// A `Display` wrapper that writes its content as a quoted record value.
#[derive(Debug, Clone, Copy)]
pub struct Quoted<T>(pub T);

impl<T: fmt::Display> fmt::Display for Quoted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Escaper<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Escaper<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for c in s.chars() {
                    match c {
                        '"' | '\\' => {
                            self.0.write_str("\\")?;
                            fmt::Write::write_char(self.0, c)?;
                        }
                        // A record is one line: newlines inside a value become spaces.
                        '\n' | '\r' => self.0.write_str(" ")?,
                        c => fmt::Write::write_char(self.0, c)?,
                    }
                }
                Ok(())
            }
        }
        f.write_str("\"")?;
        fmt::write(&mut Escaper(f), format_args!("{}", self.0))?;
        f.write_str("\"")
    }
}

/// A parsed record: its kind and the raw field text, read lazily with [`Record::fields`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: &'a str,
    rest: &'a str,
}

/// One field value. Quoted values keep their escapes until [`Value::unescape_into`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value<'a> {
    raw: &'a str,
    quoted: bool,
}

impl<'a> Value<'a> {
    /// The value as written between the quotes (escapes still in place), or the bare token.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// Appends the unescaped value to `out` through a callback, so no allocation is needed.
    pub fn unescape_into(&self, mut out: impl FnMut(char)) {
        let mut escaped = false;
        for c in self.raw.chars() {
            if self.quoted && !escaped && c == '\\' {
                escaped = true;
                continue;
            }
            escaped = false;
            out(c);
        }
    }
}

/// Why a line that starts with [`PREFIX`] is not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// No kind after the prefix.
    NoKind,
    /// A field without `=`, or with an empty key, at this byte offset of the line.
    BadField(usize),
    /// A quoted value that never ends, starting at this byte offset.
    Unterminated(usize),
}

/// Parses one console line. `Ok(None)` when the line is not a record at all.
pub fn parse(line: &str) -> Result<Option<Record<'_>>, ParseError> {
    let line = line.trim_end_matches(['\r', '\n']);
    let Some(body) = line.strip_prefix(PREFIX) else {
        return Ok(None);
    };
    let body = body.trim_start_matches(' ');
    let (kind, rest) = body.split_once(' ').unwrap_or((body, ""));
    if kind.is_empty() {
        return Err(ParseError::NoKind);
    }
    let record = Record { kind, rest };
    // Validate every field up front so that callers never see half a record.
    let base = line.len() - rest.len();
    let mut fields = record.fields_raw(base);
    for f in &mut fields {
        f?;
    }
    Ok(Some(record))
}

impl<'a> Record<'a> {
    /// The fields in order. Only valid records are handed out by [`parse`], so this cannot fail.
    pub fn fields(&self) -> impl Iterator<Item = (&'a str, Value<'a>)> + 'a {
        self.fields_raw(0).map_while(Result::ok)
    }

    /// The first field called `key`.
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        self.fields().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    fn fields_raw(&self, base: usize) -> Fields<'a> {
        Fields { rest: self.rest, offset: base }
    }
}

struct Fields<'a> {
    rest: &'a str,
    offset: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(&'a str, Value<'a>), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let trimmed = self.rest.trim_start_matches(' ');
        self.offset += self.rest.len() - trimmed.len();
        self.rest = trimmed;
        if self.rest.is_empty() {
            return None;
        }
        let start = self.offset;
        let Some(eq) = self.rest.find('=') else {
            self.rest = "";
            return Some(Err(ParseError::BadField(start)));
        };
        let key = &self.rest[..eq];
        if key.is_empty() || key.contains(' ') {
            self.rest = "";
            return Some(Err(ParseError::BadField(start)));
        }
        let after = &self.rest[eq + 1..];
        let (value, consumed) = if let Some(q) = after.strip_prefix('"') {
            let mut escaped = false;
            let mut end = None;
            for (i, c) in q.char_indices() {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    end = Some(i);
                    break;
                }
            }
            let Some(end) = end else {
                self.rest = "";
                return Some(Err(ParseError::Unterminated(start)));
            };
            (Value { raw: &q[..end], quoted: true }, eq + 1 + 1 + end + 1)
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (Value { raw: &after[..end], quoted: false }, eq + 1 + end)
        };
        self.rest = &self.rest[consumed..];
        self.offset += consumed;
        Some(Ok((key, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unescape(v: Value<'_>) -> String {
        let mut s = String::new();
        v.unescape_into(|c| s.push(c));
        s
    }

    #[test]
    fn plain_lines_are_not_records() {
        assert_eq!(parse("[c0] hello"), Ok(None));
        assert_eq!(parse("#mkvx core"), Ok(None));
    }

    #[test]
    fn parses_bare_and_quoted_fields() {
        let r = parse("#mkv core index=1 apic=2 vmx=on reason=\"no \\\"EPT\\\" here\"\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.kind, "core");
        let f: Vec<_> = r.fields().map(|(k, v)| (k, unescape(v))).collect();
        assert_eq!(
            f,
            [
                ("index", "1".to_string()),
                ("apic", "2".into()),
                ("vmx", "on".into()),
                ("reason", "no \"EPT\" here".into())
            ]
        );
        assert_eq!(r.get("apic").unwrap().raw(), "2");
        assert!(r.get("missing").is_none());
    }

    #[test]
    fn trace_words_round_trip_to_absolute_times() {
        use trace::{events, Event, Word};
        let words = [
            Word { reason: "vmcall", gap: 0, guest: 50 },
            Word { reason: "hlt", gap: 7, guest: 1000 },
        ];
        let mut ev = String::new();
        for w in words {
            ev += &format!("{w} ");
        }
        let line = format!("{PREFIX}{} core=1 base=100 ev={}", kind::TRACE, Quoted(ev.trim()));
        let r = parse(&line).unwrap().unwrap();
        let got: Vec<_> = events(r.get("ev").unwrap().raw(), 100).collect();
        assert_eq!(
            got,
            [
                Some(Event { reason: "vmcall", entry: 100, exit: 150 }),
                Some(Event { reason: "hlt", entry: 157, exit: 1157 })
            ]
        );
        for bad in ["vmcall:1", "vmcall:x:1", ":1:2", "a:1:2:3", "a:18446744073709551615:2"] {
            assert_eq!(events(bad, 1).next(), Some(None), "{bad}");
        }
    }

    #[test]
    fn malformed_records_are_rejected_whole() {
        assert_eq!(parse("#mkv "), Err(ParseError::NoKind));
        assert_eq!(parse("#mkv core index=1 junk"), Err(ParseError::BadField(18)));
        assert_eq!(parse("#mkv core =1"), Err(ParseError::BadField(10)));
        assert_eq!(parse("#mkv core a=\"open"), Err(ParseError::Unterminated(10)));
    }

    proptest! {
        /// Whatever the hypervisor writes with `Quoted` reads back unchanged (newlines aside).
        #[test]
        fn quoted_round_trip(s in "[ -~\u{e9}\u{3bb}]{0,40}", key in "[a-z_]{1,8}") {
            let line = format!("{PREFIX}test {key}={} after=1", Quoted(&s));
            let r = parse(&line).unwrap().unwrap();
            let (k, v) = r.fields().next().unwrap();
            prop_assert_eq!(k, key.as_str());
            prop_assert_eq!(unescape(v), s);
            prop_assert_eq!(r.get("after").unwrap().raw(), "1");
        }

        /// No input line makes the parser panic.
        #[test]
        fn never_panics(s in ".{0,80}") {
            let _ = parse(&format!("{PREFIX}{s}"));
            let _ = parse(&s);
        }
    }
}
