// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of the sharded key-value service (`vmcall_proto::kv`, workloads
//! `kvfront` and `kvworker`) in Bochs, reached from the host through slirp's forwarding of
//! 127.0.0.1:21211, with a small memcached text-protocol client of our own (std
//! `TcpStream`) that keeps a model of the store and checks every reply against it:
//!
//! * `configs/kv-2.toml`: a few hundred requests, values below and above the inline size
//!   (so by ring and by capability), several keys per `get`, pipelined requests, the
//!   protocol's error lines; the report shows the channel and capability traffic; the
//!   same with `configs/kv-2-copy.toml` (large values copied through the ring, no
//!   capability);
//! * `configs/kv-crash.toml`: worker 1 dies in the middle of the load; its keys get only
//!   `SERVER_ERROR shard 1 unavailable` while it is down, promptly, the connection stays,
//!   shard 0 serves throughout; after the restart shard 1 serves again, empty;
//! * `configs/kv-hostile.toml`: workers answering garbage, never answering, or hoarding a
//!   granted buffer are fenced (timed out, the buffer revoked) while shard 0 keeps serving;
//! * `configs/kv-mute.toml`: a silent worker is fenced and restarted by the front, which
//!   controls its workers; its shard comes back empty.
//!
//! Each run ends with the client's `shutdown`. Figures (host time, the front's bench line)
//! are printed, never asserted.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use systests::{boot_config, Boot};
use vmcall_proto::kv;
use xtask::cli::Emulator;

const ADDR: &str = "127.0.0.1:21211";

/// A memcached text-protocol client.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

/// A `get`'s hits: key, flags, value.
type Hits = Vec<(String, u32, Vec<u8>)>;

impl Client {
    /// Connects once the service answers `version` (building the image, Bochs and the
    /// guests take a while to come up: minutes on a busy machine), retrying until
    /// `deadline`.
    fn connect(deadline: Instant) -> Client {
        loop {
            let attempt =
                TcpStream::connect_timeout(&ADDR.parse().unwrap(), Duration::from_secs(5))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(60)))?;
                        s.set_write_timeout(Some(Duration::from_secs(60)))?;
                        s.set_nodelay(true)?;
                        let mut c = Client { r: BufReader::new(s.try_clone()?), w: s };
                        c.send(b"version\r\n");
                        let l = c.try_line()?;
                        Ok((c, l))
                    });
            match attempt {
                Ok((c, l)) if l == kv::VERSION.trim_end() => return c,
                Ok((_, l)) => panic!("version: {l:?}"),
                Err(e) => {
                    assert!(Instant::now() < deadline, "the service never answered on {ADDR}: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).expect("send");
    }

    fn try_line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        assert!(l.ends_with("\r\n"), "a line not ended by CRLF: {l:?}");
        l.truncate(l.len() - 2);
        Ok(l)
    }

    fn line(&mut self) -> String {
        self.try_line().expect("a reply line")
    }

    /// Reads a `get`'s answer: the hits, or the error line that replaced it.
    fn read_get(&mut self) -> Result<Hits, String> {
        let mut hits = Vec::new();
        loop {
            let l = self.line();
            if l == "END" {
                return Ok(hits);
            }
            let Some(rest) = l.strip_prefix("VALUE ") else {
                assert!(hits.is_empty(), "{l:?} after hits");
                return Err(l);
            };
            let f: Vec<&str> = rest.split(' ').collect();
            assert_eq!(f.len(), 3, "{l:?}");
            let n: usize = f[2].parse().unwrap();
            let mut v = vec![0; n + 2];
            self.r.read_exact(&mut v).unwrap();
            assert_eq!(&v[n..], b"\r\n", "value of {} not ended by CRLF", f[0]);
            v.truncate(n);
            hits.push((f[0].to_string(), f[1].parse().unwrap(), v));
        }
    }

    fn get(&mut self, keys: &[&str]) -> Result<Hits, String> {
        self.send(format!("get {}\r\n", keys.join(" ")).as_bytes());
        self.read_get()
    }

    fn set(&mut self, key: &str, flags: u32, v: &[u8]) -> String {
        let mut m = format!("set {key} {flags} 0 {}\r\n", v.len()).into_bytes();
        m.extend_from_slice(v);
        m.extend_from_slice(b"\r\n");
        self.send(&m);
        self.line()
    }

    fn cmd(&mut self, c: &str) -> String {
        self.send(format!("{c}\r\n").as_bytes());
        self.line()
    }

    /// `stats` as a map.
    fn stats(&mut self) -> HashMap<String, u64> {
        self.send(b"stats\r\n");
        let mut m = HashMap::new();
        loop {
            let l = self.line();
            if l == "END" {
                return m;
            }
            let f: Vec<&str> = l.split(' ').collect();
            assert!(f.len() == 3 && f[0] == "STAT", "{l:?}");
            m.insert(f[1].to_string(), f[2].parse().unwrap());
        }
    }

    fn shutdown(&mut self) {
        assert_eq!(self.cmd("shutdown"), "OK");
    }
}

/// A value of `n` bytes for key `k`, version `ver`: every byte depends on all three.
fn value(k: &str, ver: u64, n: usize) -> Vec<u8> {
    let seed = kv::fnv1a32(k.as_bytes()) as u64 ^ ver << 32;
    (0..n)
        .map(|i| b'!' + ((seed.wrapping_mul(31) + i as u64 * 7 + (i as u64 >> 8)) % 90) as u8)
        .collect()
}

/// Keys of shard `s` of `workers`, named `prefix` and a number.
fn keys_of(prefix: &str, s: u32, workers: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| kv::shard_of(k.as_bytes(), workers) == s)
        .take(n)
        .collect()
}

fn unavailable(s: u32) -> String {
    let mut b = [0; 48];
    let n = kv::unavailable_line(s, &mut b);
    String::from_utf8_lossy(&b[..n - 2]).into_owned()
}

/// The front's `bench kvfront:` lines (figures, then traffic), joined.
fn bench_line(b: &Boot) -> String {
    let line = |p: &str| {
        b.serial
            .lines()
            .find_map(|l| l.strip_prefix(p))
            .unwrap_or_else(|| panic!("no {p:?} line\n{}", b.serial))
            .to_string()
    };
    format!(
        "{}; {}",
        line("[front@c0] bench kvfront: "),
        line("[front@c0] bench kvfront traffic: ")
    )
}

/// The number just before `what` in `line` (`"12 capabilities granted"`).
fn figure(line: &str, what: &str) -> u64 {
    let (before, _) = line.split_once(what).unwrap_or_else(|| panic!("{what:?} in {line:?}"));
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Held by each run: they all forward host port 21211, and `cargo xtask test` runs two
/// tests of a file at once.
static PORT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `client` against `config` in Bochs; the client must end with `shutdown`.
fn run<T: Send + 'static>(config: &str, client: impl FnOnce() -> T + Send + 'static) -> (Boot, T) {
    run_on(Emulator::Bochs, "", config, client)
}

/// [`run`] on `emulator` with the hypervisor command line `cmdline`.
fn run_on<T: Send + 'static>(
    emulator: Emulator,
    cmdline: &str,
    config: &str,
    client: impl FnOnce() -> T + Send + 'static,
) -> (Boot, T) {
    let _port = PORT.lock().unwrap_or_else(|e| e.into_inner());
    // A service still listening there (a run not yet gone) would take our client's requests.
    if let Err(e) = std::net::TcpListener::bind(ADDR) {
        panic!("host port {ADDR} is taken ({e}): is another key-value run still up?");
    }
    let t = std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(client));
        if r.is_err() {
            // End the run now rather than at its timeout: the report still helps.
            if let Ok(mut s) = TcpStream::connect(ADDR) {
                let _ = s.write_all(b"shutdown\r\n");
                let _ = s.read(&mut [0; 8]);
            }
        }
        r
    });
    let b = boot_config(emulator, None, None, cmdline, Some(config));
    let r = match t.join().expect("the client thread") {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", b.serial);
            std::panic::resume_unwind(e)
        }
    };
    assert_eq!(b.report.outcome, "ok", "{:?}\n{}", b.report.problems, b.serial);
    let f = b.guest("front");
    assert_eq!((f.state.as_str(), f.exit_status), ("exited", 0), "{f:?}\n{}", b.serial);
    (b, r)
}

/// Sizes the load cycles through: around one ring message, around the inline limit, and
/// up to the largest value.
const SIZES: &[usize] = &[0, 1, 7, 55, 56, 57, 300, 1023, 1024, 1025, 4096, 20_000, kv::MAX_VALUE];

#[test]
fn two_workers_serve_hundreds_of_verified_requests() {
    verified_load(Emulator::Bochs, "", "configs/kv-2.toml", false);
}

/// The same service on QEMU/SVM: the front owns QEMU's e1000 (user-mode networking, the
/// same forwarded port), the capability protocol and the channels run over the SVM backend.
/// Host time there: the capability deadline and the failure detector get room for a loaded
/// host's starved vCPUs (docs/svm.md, "Time under QEMU").
#[test]
fn two_workers_serve_hundreds_of_verified_requests_on_qemu_svm() {
    verified_load(Emulator::Qemu, "caps_deadline_ms=5000 probe_ms=500", "configs/kv-2.toml", false);
}

/// The same load with large values copied through the ring (`large = "copy"`): no
/// capability moves.
#[test]
fn large_values_by_copy_through_the_ring() {
    verified_load(Emulator::Bochs, "", "configs/kv-2-copy.toml", true);
}

/// A few hundred requests on `config` (two workers), every reply checked against a model.
fn verified_load(emulator: Emulator, cmdline: &str, config: &'static str, copy: bool) {
    let (b, (requests, secs)) = run_on(emulator, cmdline, config, move || {
        let mut c = Client::connect(Instant::now() + Duration::from_secs(900));
        let t0 = Instant::now();
        let mut model: HashMap<String, (u32, Vec<u8>)> = HashMap::new();
        let mut requests = 0u64;
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let keys: Vec<String> = (0..24).map(|i| format!("key{i}")).collect();
        for step in 0..320u64 {
            let k = &keys[rnd(keys.len() as u64) as usize];
            requests += 1;
            match rnd(10) {
                0..=3 => {
                    let n = SIZES[rnd(SIZES.len() as u64) as usize];
                    let v = value(k, step, n);
                    let flags = rnd(1 << 16) as u32;
                    assert_eq!(c.set(k, flags, &v), "STORED", "set {k} ({n} bytes)");
                    model.insert(k.clone(), (flags, v));
                }
                4..=6 => {
                    let got = c.get(&[k]).unwrap_or_else(|e| panic!("get {k}: {e}"));
                    let want: Vec<_> =
                        model.get(k).map(|(f, v)| (k.clone(), *f, v.clone())).into_iter().collect();
                    assert!(got == want, "get {k}: {} hit(s), model {}", got.len(), want.len());
                }
                7 => {
                    let ks: Vec<&str> =
                        (0..4).map(|_| keys[rnd(keys.len() as u64) as usize].as_str()).collect();
                    let got = c.get(&ks).unwrap_or_else(|e| panic!("get {ks:?}: {e}"));
                    let want: Vec<_> = ks
                        .iter()
                        .filter_map(|k| model.get(*k).map(|(f, v)| (k.to_string(), *f, v.clone())))
                        .collect();
                    assert!(got == want, "get {ks:?}");
                }
                8 => {
                    let want = if model.remove(k).is_some() { "DELETED" } else { "NOT_FOUND" };
                    assert_eq!(c.cmd(&format!("delete {k}")), want);
                }
                _ => {
                    let ctr = format!("ctr{}", rnd(3));
                    let d = rnd(1000);
                    let cur = model
                        .get(&ctr)
                        .map(|(_, v)| String::from_utf8_lossy(v).parse::<u64>().unwrap());
                    let (cmd, next) = if rnd(2) == 0 {
                        ("incr", cur.map(|c| c.wrapping_add(d)))
                    } else {
                        ("decr", cur.map(|c| c.saturating_sub(d)))
                    };
                    let got = c.cmd(&format!("{cmd} {ctr} {d}"));
                    match next {
                        Some(n) => {
                            assert_eq!(got, n.to_string(), "{cmd} {ctr} {d}");
                            let flags = model[&ctr].0;
                            model.insert(ctr, (flags, n.to_string().into_bytes()));
                        }
                        None => {
                            assert_eq!(got, "NOT_FOUND", "{cmd} {ctr}");
                            assert_eq!(c.set(&ctr, 5, b"100"), "STORED");
                            model.insert(ctr, (5, b"100".to_vec()));
                            requests += 1;
                        }
                    }
                }
            }
        }
        // Pipelined: twenty requests in one write, then their answers in order.
        let mut burst = Vec::new();
        for k in &keys[..20] {
            burst.extend_from_slice(format!("get {k}\r\n").as_bytes());
        }
        c.send(&burst);
        for k in &keys[..20] {
            let got = c.read_get().unwrap();
            assert_eq!(got.len(), model.contains_key(k) as usize, "pipelined get {k}");
        }
        requests += 20;
        // noreply: no answer, but stored.
        c.send(b"set quiet 3 0 2 noreply\r\nok\r\n");
        assert_eq!(c.get(&["quiet"]).unwrap(), vec![("quiet".into(), 3, b"ok".to_vec())]);
        model.insert("quiet".into(), (3, b"ok".to_vec()));
        // The protocol's error lines; the connection survives each.
        assert_eq!(c.cmd("bogus command"), "ERROR");
        assert_eq!(c.cmd("set k 0 0 abc"), "CLIENT_ERROR bad command line format");
        assert_eq!(
            c.cmd(&format!("get {}", "x".repeat(251))),
            "CLIENT_ERROR bad command line format"
        );
        c.send(format!("set huge 0 0 {}\r\n", kv::MAX_VALUE + 1).as_bytes());
        c.send(&vec![b'h'; kv::MAX_VALUE + 1]);
        c.send(b"\r\n");
        assert_eq!(c.line(), kv::TOO_LARGE.trim_end());
        c.send(b"set chunk 0 0 2\r\nabcd\r\n");
        assert_eq!(c.line(), "CLIENT_ERROR bad data chunk");
        // As memcached: the declared length and two bytes were the block; what follows
        // (here the real end of line) is read as the next command.
        assert_eq!(c.line(), "ERROR");
        assert_eq!(c.set("word", 0, b"abc"), "STORED");
        model.insert("word".into(), (0, b"abc".to_vec()));
        assert_eq!(
            c.cmd("incr word 1"),
            "CLIENT_ERROR cannot increment or decrement non-numeric value"
        );
        assert_eq!(c.cmd("incr word x"), "CLIENT_ERROR invalid numeric delta argument");
        assert_eq!(c.cmd("version"), kv::VERSION.trim_end());
        requests += 12;
        // Everything the model holds, in one multi-key get.
        let all: Vec<&str> = model.keys().map(String::as_str).collect();
        let got = c.get(&all).unwrap();
        assert_eq!(got.len(), all.len());
        for (k, f, v) in got {
            assert!(model[&k] == (f, v), "{k}");
        }
        let st = c.stats();
        assert_eq!(st["curr_items"], model.len() as u64, "{st:?}");
        assert_eq!(st["shard_0:items"] + st["shard_1:items"], model.len() as u64);
        assert_eq!(st["caps_granted"] > 0, !copy, "{st:?}");
        assert_eq!(st["caps_granted"], st["caps_revoked"], "{st:?}");
        assert_eq!(st["unavailable_errors"], 0);
        let secs = t0.elapsed().as_secs_f64();
        c.shutdown();
        (requests + 2, secs)
    });
    for w in ["w0", "w1"] {
        let g = b.guest(w);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
        assert_eq!(g.incarnations.len(), 1);
    }
    // The traffic that carried it: both channels both ways, and the capability protocol.
    for ch in &b.report.channels {
        assert!(ch.a_sent > 0 && ch.b_sent > 0 && ch.a_sent == ch.b_received, "{ch:?}");
        eprintln!("channel {}: front sent {}, worker sent {}", ch.name, ch.a_sent, ch.b_sent);
    }
    let bench = bench_line(&b);
    eprintln!("guest: {bench}");
    let granted = figure(&bench, " capabilities granted");
    assert_eq!(figure(&bench, " revoked;"), granted, "{bench}");
    let by_cap = figure(&bench, " value bytes by capability");
    let by_ring = figure(&bench, " by ring;");
    let f = b.guest("front");
    let from_front: u64 =
        ["w0", "w1"].iter().map(|w| b.guest(w).requests_from.get("0").copied().unwrap_or(0)).sum();
    if copy {
        assert_eq!((granted, by_cap), (0, 0), "{bench}");
        assert!(by_ring > kv::MAX_VALUE as u64, "{bench}");
    } else {
        assert!(granted > 0 && by_cap > 0, "{bench}");
        assert!(by_ring < by_cap, "{bench}");
        assert!(f.xmsgs > 0, "the front's core sent no capability messages: {f:?}");
        assert!(from_front > 0, "no capability requests from the front's core");
    }
    eprintln!(
        "host: {requests} requests in {secs:.2} s ({:.0} per second, {:.2} ms each); front's core \
         sent {} capability messages, the workers' cores took {from_front} requests from it",
        requests as f64 / secs,
        secs * 1000.0 / requests as f64,
        f.xmsgs
    );
}

#[test]
fn a_worker_that_dies_costs_only_its_shard_and_comes_back_empty() {
    let (b, (errors, down_for)) = run("configs/kv-crash.toml", || {
        let mut c = Client::connect(Instant::now() + Duration::from_secs(900));
        let k0 = keys_of("a", 0, 2, 8);
        let k1 = keys_of("b", 1, 2, 8);
        let mut errors = 0u64;
        let mut seen_down: Option<Instant> = None;
        let mut back = false;
        let deadline = Instant::now() + Duration::from_secs(120);
        // Until shard 1 is down and back: a set and a get on each shard per round. The
        // worker of shard 1 dies on its 31st request.
        let mut round = 0u64;
        while !back {
            assert!(
                Instant::now() < deadline,
                "shard 1 never came back: round {round}, {errors} errors, down since {seen_down:?}"
            );
            let (a, bk) = (&k0[round as usize % 8], &k1[round as usize % 8]);
            let va = value(a, round, 100 + round as usize * 97 % 3000);
            assert_eq!(c.set(a, 1, &va), "STORED", "shard 0 must serve throughout");
            assert_eq!(c.get(&[a]).unwrap(), vec![(a.clone(), 1, va)]);
            let vb = value(bk, round, 50 + round as usize * 131 % 3000);
            let t = Instant::now();
            let stored = c.set(bk, 2, &vb);
            let got = c.get(&[bk]);
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "a set and a get took {:?}",
                t.elapsed()
            );
            // What a client may see: the error line while the shard is down, the value it
            // just stored, or nothing if the shard came back (empty) between the two.
            let mut down = false;
            for r in [stored.as_str(), got.as_ref().err().map_or("", String::as_str)] {
                if !r.is_empty() && r != "STORED" {
                    assert_eq!(r, unavailable(1), "the only error a client may see");
                    errors += 1;
                    down = true;
                }
            }
            match &got {
                Ok(h) if stored == "STORED" => assert_eq!(h, &vec![(bk.clone(), 2, vb)]),
                Ok(h) => assert_eq!(h, &vec![], "shard 1 came back with a value it refused"),
                Err(_) => {}
            }
            if down {
                if seen_down.is_none() {
                    eprintln!("host: round {round}: shard 1 down ({stored}; {got:?})");
                    seen_down = Some(Instant::now());
                }
                // A multi-key get touching the down shard: its error line, whole.
                match c.get(&[a, bk]) {
                    Err(l) => assert_eq!(l, unavailable(1)),
                    Ok(h) => assert!(h.len() <= 2),
                }
                std::thread::sleep(Duration::from_millis(20));
            } else if let Some(t) = seen_down {
                eprintln!("host: round {round}: shard 1 back after {:?}", t.elapsed());
                back = true;
                // Back, and empty: the keys stored before the death are gone.
                let old: Vec<&str> = k1.iter().map(String::as_str).filter(|k| *k != bk).collect();
                assert_eq!(c.get(&old).unwrap(), vec![], "shard 1 came back with keys");
            }
            round += 1;
        }
        let down_for = seen_down.unwrap().elapsed();
        let st = c.stats();
        assert_eq!(st["shard_1:restarts"], 1, "{st:?}");
        assert!(st["shard_1:errors"] >= errors && st["shard_0:errors"] == 0, "{st:?}");
        c.shutdown();
        (errors, down_for)
    });
    let w1 = b.guest("w1");
    assert_eq!(w1.incarnations.len(), 2, "{w1:?}");
    assert_eq!(w1.incarnations[0].ending, "stopped", "{w1:?}");
    assert_eq!((w1.state.as_str(), w1.exit_status), ("exited", 0));
    assert!(b.serial.contains("kvfront: shard 1 down: its worker is gone"), "{}", b.serial);
    assert!(b.serial.contains("kvfront: shard 1 back (epoch"), "{}", b.serial);
    eprintln!("guest: {}", bench_line(&b));
    eprintln!("host: {errors} requests answered `{}` while worker 1 was down; down for at most {down_for:?} of host time", unavailable(1));
}

#[test]
fn hostile_workers_are_fenced_and_the_other_shard_keeps_serving() {
    let (b, timings) = run("configs/kv-hostile.toml", || {
        let mut c = Client::connect(Instant::now() + Duration::from_secs(900));
        let keys: Vec<Vec<String>> = (0..4).map(|s| keys_of("h", s, 4, 4)).collect();
        // Four good requests to each worker (its `after`): two sets, two gets.
        for (s, ks) in keys.iter().enumerate() {
            for k in &ks[..2] {
                assert_eq!(c.set(k, s as u32, k.as_bytes()), "STORED");
                assert_eq!(c.get(&[k]).unwrap().len(), 1);
            }
        }
        let mut timings = Vec::new();
        // The fifth: garbage, silence, a hoarded buffer (a value over the inline size goes
        // by capability). Each gets the shard's error line; shard 0 serves between them.
        for s in 1..4u32 {
            let v = value(&keys[s as usize][2], 0, if s == 3 { 5000 } else { 10 });
            let t = Instant::now();
            assert_eq!(c.set(&keys[s as usize][2], 0, &v), unavailable(s), "shard {s}");
            timings.push((s, t.elapsed()));
            let k0 = &keys[0][0];
            assert_eq!(c.get(&[k0]).unwrap(), vec![(k0.clone(), 0, k0.as_bytes().to_vec())]);
            // Fenced: the next request fails at once (the hoarder may already be back,
            // empty: it is stopped at its next look at the revoked buffer).
            match c.get(&[&keys[s as usize][0]]) {
                Ok(h) if s == 3 => assert_eq!(h, vec![]),
                r => assert_eq!(r, Err(unavailable(s))),
            }
        }
        // The hoarder touched the revoked buffer and was stopped; its restart brings
        // shard 3 back, empty.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "shard 3 never came back");
            match c.get(&[&keys[3][0]]) {
                Ok(h) => {
                    assert_eq!(h, vec![], "shard 3 came back with its keys");
                    break;
                }
                Err(l) => assert_eq!(l, unavailable(3)),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(c.set(&keys[3][1], 9, b"again"), "STORED");
        // Garbage and silence stay fenced (those workers live on).
        for s in 1..3u32 {
            assert_eq!(c.set(&keys[s as usize][3], 0, b"x"), unavailable(s));
        }
        let st = c.stats();
        assert_eq!(
            (st["shard_1:garbage"], st["shard_2:timeouts"], st["shard_3:timeouts"]),
            (1, 1, 1),
            "{st:?}"
        );
        assert_eq!(
            (st["shard_0:up"], st["shard_1:up"], st["shard_2:up"], st["shard_3:up"]),
            (1, 0, 0, 1)
        );
        assert_eq!(st["caps_granted"], st["caps_revoked"], "{st:?}");
        c.shutdown();
        timings
    });
    let w3 = b.guest("w3");
    assert_eq!(w3.incarnations.len(), 2, "{w3:?}");
    let fault = w3.incarnations[0].fault.clone().unwrap_or_default();
    assert!(fault.contains("0xc0000000"), "the hoarder was stopped at its revoked buffer: {fault}");
    for w in ["w0", "w1", "w2", "w3"] {
        let g = b.guest(w);
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{w}: {g:?}");
    }
    for (what, s) in [("garbage", 1), ("timeout", 2), ("timeout", 3)] {
        let l = format!("kvfront: shard {s} fenced ({what})");
        assert!(b.serial.contains(&l), "{l}\n{}", b.serial);
    }
    eprintln!("guest: {}", bench_line(&b));
    for (s, t) in timings {
        eprintln!("host: shard {s}'s misbehaviour answered with its error line in {t:?}");
    }
}

#[test]
fn a_silent_worker_is_restarted_by_its_controlling_front() {
    let (b, waited) = run("configs/kv-mute.toml", || {
        let mut c = Client::connect(Instant::now() + Duration::from_secs(900));
        let keys: Vec<Vec<String>> = (0..2).map(|s| keys_of("m", s, 2, 4)).collect();
        // Four good requests to each worker (the silent one's `after`).
        for ks in &keys {
            for k in &ks[..2] {
                assert_eq!(c.set(k, 1, k.as_bytes()), "STORED");
                assert_eq!(c.get(&[k]).unwrap().len(), 1);
            }
        }
        let t = Instant::now();
        assert_eq!(c.set(&keys[1][2], 0, b"lost"), unavailable(1));
        let waited = t.elapsed();
        // The front restarted it: shard 1 comes back, empty; shard 0 kept its keys.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "shard 1 never came back");
            match c.get(&[&keys[1][0]]) {
                Ok(h) => {
                    assert_eq!(h, vec![], "shard 1 came back with its keys");
                    break;
                }
                Err(l) => assert_eq!(l, unavailable(1)),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(c.set(&keys[1][3], 4, b"again"), "STORED");
        assert_eq!(
            c.get(&[&keys[1][3]]).unwrap(),
            vec![(keys[1][3].clone(), 4, b"again".to_vec())]
        );
        let k0 = &keys[0][0];
        assert_eq!(c.get(&[k0]).unwrap(), vec![(k0.clone(), 1, k0.as_bytes().to_vec())]);
        let st = c.stats();
        assert_eq!(
            (st["controller_restarts"], st["shard_1:timeouts"], st["shard_1:restarts"]),
            (1, 1, 1),
            "{st:?}"
        );
        assert_eq!((st["shard_0:restarts"], st["shard_1:up"]), (0, 1), "{st:?}");
        c.shutdown();
        waited
    });
    let w1 = b.guest("w1");
    assert_eq!(w1.incarnations.len(), 2, "{w1:?}");
    assert_eq!((w1.state.as_str(), w1.exit_status), ("exited", 0), "{w1:?}");
    assert!(
        b.serial.contains("kvfront: shard 1: restarting its worker (control slot"),
        "{}",
        b.serial
    );
    eprintln!("guest: {}", bench_line(&b));
    eprintln!(
        "host: the silent worker's request answered with the error line after {waited:?}; its \
         first incarnation ended {:?}",
        w1.incarnations[0].ending
    );
}
