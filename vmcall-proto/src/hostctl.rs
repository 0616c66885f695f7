// SPDX-License-Identifier: MIT OR Apache-2.0
//! Host control: the wire format of the host's channel into the hypervisor (the machine's
//! second serial port, COM2), shared by the hypervisor (which parses requests and writes
//! answers) and the host tools (`cargo xtask ctl`, which write requests and parse answers).
//!
//! One request per line, ASCII, at most [`MAX_LINE`] bytes before the `\n`:
//!
//! ```text
//! <id> <op> <guest>
//! ```
//!
//! `id`: decimal, 1..=4294967295, chosen by the host (unique among its requests in flight);
//! `op`: `query`, `stop`, `start`, `restart`, `park`, or `counter:K` (K: `exits`,
//! `hypercalls`, `doorbells`); `guest`: a guest's config name. Words are separated by one
//! or more spaces; a `\r` before the `\n` is ignored.
//!
//! One answer per request, one line:
//!
//! ```text
//! <id> <outcome> <detail>
//! ```
//!
//! `id` is the request's (`-` when the line had none the hypervisor could read);
//! `outcome` is one of [`outcome`]; `detail` is the rest of the line: for `ok`, the
//! guest's state word decoded (`state=running n=2 status=0x0`) or a counter
//! (`value=1234`); otherwise a short reason. The same answer goes to the serial log as a
//! `#mkv hostctl` record (see `record::kind::HOSTCTL`).
//!
//! Before any answer, once its UART is set up, the hypervisor writes one line of its own,
//! [`READY_ON`] or [`READY_OFF`] (host control on or off in the config): the host sends no
//! request before it, since what reaches the UART before the hypervisor programs it (and
//! clears its FIFO) is lost, or worse, half of it read as another request. It is not an
//! answer ([`parse_answer`] refuses it).
//!
//! These are the operations and outcomes of `guest_control` (a `[[control]]` guest's
//! hypercall, `hypercall::control`): the host is one more controller, with its own
//! identity, under the same checks.
//!
//! Owns only the format; calls nothing but `hypercall::control`.

use crate::hypercall::control;

/// The longest request line, `\n` excluded. A longer one is answered `error` (once its
/// `\n` arrives) and not read further.
pub const MAX_LINE: usize = 80;

/// The answers' outcome words.
pub mod outcome {
    /// Done: the detail says the guest's state after it (or the counter).
    pub const OK: &str = "ok";
    /// Not allowed: host control is off, the guest is unknown or has no core, the guest
    /// cannot be started again (down for good, or kept down to stay isolated).
    pub const REFUSED: &str = "refused";
    /// Not now: the guest is already running (`start`), or a request to its core is
    /// already in flight (the host's or its core's own guest's).
    pub const BUSY: &str = "busy";
    /// No answer from the guest's core within the deadline.
    pub const TIMEOUT: &str = "timeout";
    /// The guest's core is out of the machine (fenced).
    pub const GONE: &str = "gone";
    /// The line is not a request (malformed, too long, unknown operation).
    pub const ERROR: &str = "error";
    /// Every outcome word.
    pub const ALL: [&str; 6] = [OK, REFUSED, BUSY, TIMEOUT, GONE, ERROR];
}

/// The hypervisor's first line on the port, host control on: requests may follow.
pub const READY_ON: &str = "ready host_control=on";
/// The same, host control off (requests are answered `refused`).
pub const READY_OFF: &str = "ready host_control=off";

/// Whether `line` (without its `\n`) is the ready line, and with host control on or off.
pub fn parse_ready(line: &str) -> Option<bool> {
    match line.trim_end_matches('\r') {
        READY_ON => Some(true),
        READY_OFF => Some(false),
        _ => None,
    }
}

/// The operations by name, and the `guest_control` operation each is.
pub const OPS: [(&str, u64); 8] = [
    ("query", control::QUERY),
    ("stop", control::STOP),
    ("start", control::START),
    ("restart", control::RESTART),
    ("park", control::PARK),
    ("counter:exits", control::COUNTER | control::counter::EXITS << 8),
    ("counter:hypercalls", control::COUNTER | control::counter::HYPERCALLS << 8),
    ("counter:doorbells", control::COUNTER | control::counter::DOORBELLS << 8),
];

/// The name of a `guest_control` operation (`?` for one that is not in [`OPS`]).
pub fn op_name(operation: u64) -> &'static str {
    OPS.iter().find(|(_, o)| *o == operation).map_or("?", |(n, _)| n)
}

/// One request, as read from a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub id: u32,
    /// The `guest_control` operation.
    pub operation: u64,
    pub guest: &'a str,
}

/// Why a line is not a request; with the request's id when it had a readable one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineError {
    pub id: Option<u32>,
    pub why: &'static str,
}

/// The longest guest name (as the config allows).
pub const MAX_NAME: usize = 32;

/// Reads one request line (without its `\n`).
pub fn parse(line: &[u8]) -> Result<Request<'_>, LineError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let err = |id, why| LineError { id, why };
    if line.len() > MAX_LINE {
        return Err(err(None, "line too long"));
    }
    let Ok(text) = core::str::from_utf8(line) else {
        return Err(err(None, "not ASCII"));
    };
    if !text.is_ascii() {
        return Err(err(None, "not ASCII"));
    }
    let mut words = text.split(' ').filter(|w| !w.is_empty());
    let Some(id) = words.next() else { return Err(err(None, "empty line")) };
    let id = match id.parse::<u32>() {
        Ok(n) if n >= 1 && id.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => return Err(err(None, "expected `<id> <op> <guest>` with a decimal id >= 1")),
    };
    let Some(op) = words.next() else { return Err(err(Some(id), "no operation")) };
    let Some(&(_, operation)) = OPS.iter().find(|(n, _)| *n == op) else {
        return Err(err(
            Some(id),
            "unknown operation (query, stop, start, restart, park, counter:exits, \
             counter:hypercalls, counter:doorbells)",
        ));
    };
    let Some(guest) = words.next() else { return Err(err(Some(id), "no guest name")) };
    if guest.len() > MAX_NAME || !guest.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(Some(id), "not a guest name"));
    }
    if words.next().is_some() {
        return Err(err(Some(id), "more than three words"));
    }
    Ok(Request { id, operation, guest })
}

/// A state word (`control::state_word`) as the answers' detail shows it.
pub struct StateWord(pub u64);

impl core::fmt::Display for StateWord {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let w = self.0;
        let state = match (w & 0xff) as u8 {
            control::RUNNING => "running",
            control::EXITED => "exited",
            control::STOPPED => "stopped",
            control::HELD => "held",
            control::PARKED => "parked",
            _ => "unknown",
        };
        write!(f, "state={state} n={} status={:#x}", (w >> 8) & 0xff_ffff, w >> 32)
    }
}

/// The state a word says (`control::RUNNING`...).
pub fn state_of(word: u64) -> u8 {
    (word & 0xff) as u8
}

/// One answer, as read from a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer<'a> {
    /// `None`: the `-` of a line the hypervisor could not read an id from.
    pub id: Option<u32>,
    pub outcome: &'a str,
    pub detail: &'a str,
}

/// Reads one answer line (without its `\n`); `None` if it is not one.
pub fn parse_answer(line: &str) -> Option<Answer<'_>> {
    let line = line.trim_end_matches('\r');
    let (id, rest) = line.split_once(' ')?;
    let id = match id {
        "-" => None,
        n => Some(n.parse::<u32>().ok()?),
    };
    let (outcome, detail) = rest.split_once(' ').unwrap_or((rest, ""));
    outcome::ALL.contains(&outcome).then_some(Answer { id, outcome, detail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_is_not_an_answer() {
        assert_eq!(parse_ready(READY_ON), Some(true));
        assert_eq!(parse_ready("ready host_control=off\r"), Some(false));
        assert_eq!(parse_ready("7 ok ready"), None);
        for l in [READY_ON, READY_OFF] {
            assert_eq!(parse_answer(l), None, "{l}");
            assert!(parse(l.as_bytes()).is_err(), "{l}");
        }
    }

    #[test]
    fn requests_are_read_word_by_word() {
        assert_eq!(
            parse(b"7 stop w1"),
            Ok(Request { id: 7, operation: control::STOP, guest: "w1" })
        );
        assert_eq!(
            parse(b"  12   counter:hypercalls   server \r"),
            Ok(Request { id: 12, operation: control::COUNTER | 1 << 8, guest: "server" })
        );
        for (name, op) in OPS {
            let line = format!("1 {name} g");
            assert_eq!(parse(line.as_bytes()).map(|r| r.operation), Ok(op));
            assert_eq!(op_name(op), name);
            assert!(control::valid(op), "{name} is a guest_control operation");
        }
    }

    #[test]
    fn malformed_lines_say_why_and_keep_the_id_when_they_can() {
        let why = |l: &[u8]| parse(l).unwrap_err();
        assert_eq!(why(b"").why, "empty line");
        assert_eq!(why(b"x stop w1").id, None);
        assert_eq!(why(b"0 stop w1").id, None, "ids start at 1");
        assert_eq!(why(b"+5 stop w1").id, None);
        assert_eq!(why(b"99999999999 stop w1").id, None);
        assert_eq!(why(b"5"), LineError { id: Some(5), why: "no operation" });
        assert!(why(b"5 kill w1").why.starts_with("unknown operation"));
        assert_eq!(why(b"5 counter:7 w1").id, Some(5));
        assert_eq!(why(b"5 stop").why, "no guest name");
        assert_eq!(why(b"5 stop w1 w2").why, "more than three words");
        assert_eq!(why(b"5 stop w\x01").why, "not a guest name");
        assert_eq!(why(&[b'5', b' ', 0xff]).why, "not ASCII");
        assert_eq!(why("5 stop wé".as_bytes()).why, "not ASCII");
        let long = format!("5 stop {}", "a".repeat(33));
        assert_eq!(why(long.as_bytes()).why, "not a guest name");
        assert_eq!(why(&[b'1'; MAX_LINE + 1]).why, "line too long");
    }

    #[test]
    fn answers_round_trip() {
        let w = control::state_word(control::HELD, 3, 0x102);
        let line = format!("9 ok {}", StateWord(w));
        assert_eq!(line, "9 ok state=held n=3 status=0x102");
        let a = parse_answer(&line).unwrap();
        assert_eq!((a.id, a.outcome, a.detail), (Some(9), "ok", "state=held n=3 status=0x102"));
        assert_eq!(parse_answer("- error empty line").unwrap().id, None);
        assert_eq!(parse_answer("4 busy").unwrap().detail, "");
        assert_eq!(parse_answer("4 maybe so"), None);
        assert_eq!(parse_answer("[c0] a log line"), None);
        assert_eq!(state_of(w), control::HELD);
    }
}
