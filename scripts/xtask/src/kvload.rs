// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask load`: the host's client and load generator for the sharded key-value
//! service (`kvfront` and `kvworker` guests, configs `kv-*.toml`), reached through slirp's
//! forwarding of [`vmcall_proto::kv::HOST_PORT`].
//!
//! * [`Client`]: a small blocking memcached text-protocol client (`get` of one key or
//!   several, `set`, `delete`, `incr`, `version`, `stats`) that keeps every reply exactly as
//!   it came ([`Reply`]), so a wrong byte, an extra line or a missing `END` shows. Every
//!   socket has read and write timeouts: a reply that never comes is a [`ReadError::Timeout`],
//!   never a hang.
//! * [`Model`]: what the store must hold after the replies seen so far, with the service's
//!   failure rule: after `SERVER_ERROR shard N unavailable` every key of shard N
//!   ([`vmcall_proto::kv::shard_of`]) is unknown (a miss, its last value or a value whose set
//!   failed are all accepted) until a reply shows it again. A miss where a value was set is
//!   excused only if some connection saw that key's shard down after the value was
//!   confirmed (the shard was restarted empty); otherwise it is a mismatch.
//! * [`run`]: a fixed, seeded mix (single and multi-key gets, sets of small and large values,
//!   deletes, incrs) over one or several connections, each on its own keys; every reply is
//!   checked, latencies go to an HDR histogram, and a [`LoadReport`] says what happened.
//!
//! Own client rather than the `memcache` crate: that crate turns replies into maps and typed
//! errors (order, duplicates, stray bytes and the exact error line are lost) and brings a
//! connection pool and TLS; a load generator that verifies a server needs the raw replies.
//!
//! Owns the protocol client, the model, the mix and the load report; calls `vmcall_proto::kv`
//! (key placement) and `bench` (table style) only.

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmcall_proto::kv::{shard_of, MAX_KEY};

/// Longest reply line the client accepts (a `VALUE` header, a `STAT` line, an error).
const MAX_LINE: u64 = 2048;
/// Largest value the client accepts in a reply (memcached's default item limit).
pub const MAX_VALUE: usize = 1 << 20;

/// One request of the text protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get k1 k2 ...`
    Get(Vec<String>),
    /// `set key flags 0 bytes` and the value.
    Set {
        key: String,
        flags: u32,
        value: Vec<u8>,
    },
    Delete(String),
    Incr(String, u64),
    Version,
    Stats,
}

impl Request {
    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Get(keys) => format!("get {}\r\n", keys.join(" ")).into_bytes(),
            Request::Set { key, flags, value } => {
                let mut b = format!("set {key} {flags} 0 {}\r\n", value.len()).into_bytes();
                b.extend_from_slice(value);
                b.extend_from_slice(b"\r\n");
                b
            }
            Request::Delete(k) => format!("delete {k}\r\n").into_bytes(),
            Request::Incr(k, d) => format!("incr {k} {d}\r\n").into_bytes(),
            Request::Version => b"version\r\n".to_vec(),
            Request::Stats => b"stats\r\n".to_vec(),
        }
    }

    /// The keys it touches.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Request::Get(keys) => keys.iter().map(String::as_str).collect(),
            Request::Set { key, .. } | Request::Delete(key) | Request::Incr(key, _) => vec![key],
            Request::Version | Request::Stats => vec![],
        }
    }

    /// Its kind, as the report counts requests.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Get(k) if k.len() > 1 => "get_multi",
            Request::Get(_) => "get",
            Request::Set { .. } => "set",
            Request::Delete(_) => "delete",
            Request::Incr(..) => "incr",
            Request::Version => "version",
            Request::Stats => "stats",
        }
    }
}

/// A value as stored: flags and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub flags: u32,
    pub data: Vec<u8>,
}

/// One `VALUE` of a get reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub value: Value,
}

/// A reply, as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The items of a get, up to `END`.
    Values(Vec<Item>),
    Stored,
    NotStored,
    Exists,
    Deleted,
    NotFound,
    /// An incr's new value.
    Number(u64),
    Version(String),
    Stats(Vec<(String, String)>),
    /// `ERROR`: an unknown command.
    Error,
    ClientError(String),
    ServerError(String),
}

impl Reply {
    /// The shard of a `SERVER_ERROR shard N unavailable` reply.
    pub fn shard_down(&self) -> Option<u32> {
        match self {
            Reply::ServerError(m) => {
                m.strip_prefix("shard ")?.strip_suffix(" unavailable")?.parse().ok()
            }
            _ => None,
        }
    }
}

/// Why no reply could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Nothing (or not all of it) within the read timeout.
    Timeout,
    /// The server closed the connection.
    Closed,
    /// Bytes that are not a reply to the request.
    Protocol(String),
    Io(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Timeout => write!(f, "no reply within the timeout"),
            ReadError::Closed => write!(f, "the server closed the connection"),
            ReadError::Protocol(m) => write!(f, "not a reply: {m}"),
            ReadError::Io(m) => write!(f, "{m}"),
        }
    }
}

impl ReadError {
    /// Its name among the report's errors.
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Timeout => "timeout",
            ReadError::Closed => "closed",
            ReadError::Protocol(_) => "protocol",
            ReadError::Io(_) => "io",
        }
    }
}

fn io_error(e: std::io::Error) -> ReadError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ReadError::Timeout,
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => ReadError::Closed,
        _ => ReadError::Io(e.to_string()),
    }
}

/// A reply line without its `\r\n`.
fn read_line(r: &mut impl BufRead) -> Result<String, ReadError> {
    let mut buf = Vec::new();
    r.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf).map_err(io_error)?;
    if buf.is_empty() {
        return Err(ReadError::Closed);
    }
    let Some(line) = buf.strip_suffix(b"\r\n") else {
        return Err(if buf.ends_with(b"\n") {
            ReadError::Protocol(format!("line without \\r: {:?}", String::from_utf8_lossy(&buf)))
        } else if buf.len() as u64 >= MAX_LINE {
            ReadError::Protocol(format!("a line longer than {MAX_LINE} bytes"))
        } else {
            ReadError::Closed
        });
    };
    String::from_utf8(line.to_vec())
        .map_err(|_| ReadError::Protocol(format!("not UTF-8: {:?}", String::from_utf8_lossy(line))))
}

/// The error lines any command can get.
fn error_line(line: &str) -> Option<Reply> {
    if line == "ERROR" {
        Some(Reply::Error)
    } else if let Some(m) = line.strip_prefix("CLIENT_ERROR ") {
        Some(Reply::ClientError(m.to_string()))
    } else {
        line.strip_prefix("SERVER_ERROR ").map(|m| Reply::ServerError(m.to_string()))
    }
}

fn unexpected(req: &Request, line: &str) -> ReadError {
    let shown: String = line.chars().take(80).collect();
    ReadError::Protocol(format!("`{shown}` in reply to {}", req.op()))
}

/// Reads the reply to `req` from `r`: exactly its bytes, nothing after them.
pub fn read_reply(r: &mut impl BufRead, req: &Request) -> Result<Reply, ReadError> {
    let line = read_line(r)?;
    if let Some(e) = error_line(&line) {
        return Ok(e);
    }
    let simple = |want: &[(&str, Reply)]| {
        want.iter().find(|(w, _)| *w == line).map(|(_, r)| r.clone()).ok_or(unexpected(req, &line))
    };
    match req {
        Request::Get(keys) => {
            let mut items = Vec::new();
            let mut line = line;
            while line != "END" {
                let w: Vec<&str> = line.split(' ').collect();
                let (key, flags, bytes) = match w[..] {
                    ["VALUE", k, f, n] | ["VALUE", k, f, n, _] => (k, f, n),
                    _ => return Err(unexpected(req, &line)),
                };
                let flags = flags.parse().map_err(|_| unexpected(req, &line))?;
                let n: usize = bytes.parse().map_err(|_| unexpected(req, &line))?;
                if n > MAX_VALUE || !keys.iter().any(|k| k == key) {
                    return Err(unexpected(req, &line));
                }
                let mut data = vec![0; n + 2];
                r.read_exact(&mut data).map_err(io_error)?;
                if !data.ends_with(b"\r\n") {
                    return Err(ReadError::Protocol(format!(
                        "the {n} bytes of {key} are not followed by \\r\\n"
                    )));
                }
                data.truncate(n);
                items.push(Item { key: key.to_string(), value: Value { flags, data } });
                line = read_line(r)?;
            }
            Ok(Reply::Values(items))
        }
        Request::Set { .. } => simple(&[
            ("STORED", Reply::Stored),
            ("NOT_STORED", Reply::NotStored),
            ("EXISTS", Reply::Exists),
            ("NOT_FOUND", Reply::NotFound),
        ]),
        Request::Delete(_) => {
            simple(&[("DELETED", Reply::Deleted), ("NOT_FOUND", Reply::NotFound)])
        }
        Request::Incr(..) => match line.as_str() {
            "NOT_FOUND" => Ok(Reply::NotFound),
            l if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse().map(Reply::Number).map_err(|_| unexpected(req, &line))
            }
            _ => Err(unexpected(req, &line)),
        },
        Request::Version => line
            .strip_prefix("VERSION ")
            .map(|v| Reply::Version(v.to_string()))
            .ok_or_else(|| unexpected(req, &line)),
        Request::Stats => {
            let mut stats = Vec::new();
            let mut line = line;
            while line != "END" {
                let s = line.strip_prefix("STAT ").ok_or_else(|| unexpected(req, &line))?;
                let (k, v) = s.split_once(' ').ok_or_else(|| unexpected(req, &line))?;
                stats.push((k.to_string(), v.to_string()));
                line = read_line(r)?;
            }
            Ok(Reply::Stats(stats))
        }
    }
}

/// A connection to a memcached text-protocol server.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects to `addr` (within `timeout`), with `timeout` as the read and write timeouts.
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Client> {
        let mut last = std::io::Error::other(format!("{addr}: no address"));
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    s.set_read_timeout(Some(timeout))?;
                    s.set_write_timeout(Some(timeout))?;
                    s.set_nodelay(true)?;
                    let writer = s.try_clone()?;
                    return Ok(Client { reader: BufReader::with_capacity(64 << 10, s), writer });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends `req` and reads its reply.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ReadError> {
        self.writer.write_all(&req.encode()).map_err(io_error)?;
        read_reply(&mut self.reader, req)
    }
}

/// Connects and asks `version` until the server answers, or fails at `deadline` with the
/// last error (the service is not up yet while its machine boots; slirp may accept and then
/// close while the guest is not listening).
pub fn wait_ready(addr: &str, timeout: Duration, deadline: Instant) -> Result<String> {
    loop {
        let tried = Client::connect(addr, timeout)
            .map_err(|e| e.to_string())
            .and_then(|mut c| c.call(&Request::Version).map_err(|e| e.to_string()));
        match tried {
            Ok(Reply::Version(v)) => return Ok(v),
            Ok(other) => bail!("{addr}: `version` answered {other:?}"),
            Err(e) if Instant::now() >= deadline => bail!("{addr}: not ready in time: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// What the model knows of a key.
#[derive(Debug, Clone)]
enum Slot {
    /// Its value (`None`: absent), confirmed by the reply received at `since`.
    Known { v: Option<Value>, since: Instant },
    /// Any of these (a miss always among them): after its shard failed, or after a request
    /// on it got no reply.
    Unknown(Vec<Option<Value>>),
}

/// Shard failures seen by any connection: per shard, each failed request's send and
/// receive times.
#[derive(Debug, Default)]
pub struct Outages {
    seen: Mutex<Vec<Vec<(Instant, Instant)>>>,
}

impl Outages {
    fn record(&self, shard: u32, sent: Instant, received: Instant) {
        let mut s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() <= shard as usize {
            s.resize(shard as usize + 1, Vec::new());
        }
        s[shard as usize].push((sent, received));
    }

    /// Whether shard was seen down in a request that ended after `after` and began before
    /// `before`.
    fn between(&self, shard: u32, after: Instant, before: Instant) -> bool {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.get(shard as usize)
            .is_some_and(|v| v.iter().any(|&(sent, got)| got >= after && sent <= before))
    }
}

/// A miss of a key whose value was confirmed: excused once a shard failure is seen between.
#[derive(Debug, Clone)]
struct Loss {
    shard: u32,
    since: Instant,
    at: Instant,
    what: String,
}

/// The outcome of checking one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The documented error for a shard that is down.
    ShardDown(u32),
    /// The reply contradicts the model: why.
    Mismatch(String),
}

/// What one connection's keys must hold.
#[derive(Debug)]
pub struct Model {
    workers: u32,
    keys: HashMap<String, Slot>,
    outages: Arc<Outages>,
    pending: Vec<Loss>,
    /// Misses excused by a shard failure.
    pub lost: u64,
}

fn show(v: &Option<Value>) -> String {
    match v {
        None => "a miss".into(),
        Some(v) if v.data.len() <= 24 => {
            format!("flags {} {:?}", v.flags, String::from_utf8_lossy(&v.data))
        }
        Some(v) => format!(
            "flags {} {} bytes {:?}...",
            v.flags,
            v.data.len(),
            String::from_utf8_lossy(&v.data[..24])
        ),
    }
}

fn numeric(v: &Value) -> Option<u64> {
    std::str::from_utf8(&v.data).ok()?.parse().ok()
}

impl Model {
    /// An empty store of `workers` shards, failures shared through `outages`.
    pub fn new(workers: u32, outages: Arc<Outages>) -> Model {
        assert!(workers >= 1, "at least one worker");
        Model { workers, keys: HashMap::new(), outages, pending: vec![], lost: 0 }
    }

    fn slot(&self, key: &str) -> Slot {
        self.keys.get(key).cloned().unwrap_or(Slot::Unknown(vec![None]))
    }

    fn know(&mut self, key: &str, v: Option<Value>, at: Instant) {
        self.keys.insert(key.to_string(), Slot::Known { v, since: at });
    }

    /// Marks `key` unknown, adding `also` to what it may hold.
    fn forget(&mut self, key: &str, also: &[Option<Value>]) {
        let mut cands = match self.slot(key) {
            Slot::Known { v, .. } => vec![None, v],
            Slot::Unknown(c) => c,
        };
        for a in also {
            if !cands.contains(a) {
                cands.push(a.clone());
            }
        }
        cands.dedup();
        self.keys.insert(key.to_string(), Slot::Unknown(cands));
    }

    /// What a request might have left in each key it touches, had it been carried out.
    fn effects(&self, req: &Request) -> Vec<(String, Vec<Option<Value>>)> {
        match req {
            Request::Set { key, flags, value } => {
                vec![(key.clone(), vec![Some(Value { flags: *flags, data: value.clone() })])]
            }
            Request::Delete(k) => vec![(k.clone(), vec![None])],
            Request::Incr(k, d) => {
                let now = match self.slot(k) {
                    Slot::Known { v, .. } => vec![v],
                    Slot::Unknown(c) => c,
                };
                let after = now
                    .into_iter()
                    .flatten()
                    .filter_map(|v| {
                        numeric(&v).map(|n| {
                            Some(Value {
                                flags: v.flags,
                                data: n.wrapping_add(*d).to_string().into(),
                            })
                        })
                    })
                    .collect();
                vec![(k.clone(), after)]
            }
            Request::Get(keys) => keys.iter().map(|k| (k.clone(), vec![])).collect(),
            Request::Version | Request::Stats => vec![],
        }
    }

    /// `req` got no reply (timeout, closed connection): whatever it may have done, its keys
    /// are unknown.
    pub fn no_reply(&mut self, req: &Request) {
        for (k, also) in self.effects(req) {
            self.forget(&k, &also);
        }
    }

    /// A miss (or `NOT_FOUND`) of `key` whose value the model had confirmed at `since`.
    fn miss(&mut self, key: &str, since: Instant, at: Instant, what: String) {
        let shard = shard_of(key.as_bytes(), self.workers);
        if self.outages.between(shard, since, at) {
            self.lost += 1;
        } else {
            self.pending.push(Loss { shard, since, at, what });
        }
    }

    /// Checks `reply`, received at `at` for `req` sent at `sent`, and learns from it.
    pub fn check(&mut self, req: &Request, reply: &Reply, sent: Instant, at: Instant) -> Verdict {
        if let Some(n) = reply.shard_down() {
            let keys = req.keys();
            if n >= self.workers || !keys.iter().any(|k| shard_of(k.as_bytes(), self.workers) == n)
            {
                return Verdict::Mismatch(format!(
                    "{} of {keys:?}: {reply:?} names a shard that holds none of its keys",
                    req.op()
                ));
            }
            self.outages.record(n, sent, at);
            let effects = self.effects(req);
            let lost: Vec<String> = self
                .keys
                .keys()
                .filter(|k| shard_of(k.as_bytes(), self.workers) == n)
                .cloned()
                .collect();
            for k in lost {
                self.forget(&k, &[]);
            }
            for (k, also) in effects {
                if shard_of(k.as_bytes(), self.workers) == n {
                    self.forget(&k, &also);
                }
            }
            return Verdict::ShardDown(n);
        }
        let wrong = |what: &str| Verdict::Mismatch(format!("{what}: got {reply:?}"));
        match (req, reply) {
            (Request::Get(keys), Reply::Values(items)) => {
                // Items in request order, each key at most once.
                let mut pos = 0;
                let mut found: Vec<Option<Value>> = vec![None; keys.len()];
                for it in items {
                    match keys[pos..].iter().position(|k| *k == it.key) {
                        Some(p) => {
                            found[pos + p] = Some(it.value.clone());
                            pos += p + 1;
                        }
                        None => {
                            return Verdict::Mismatch(format!(
                                "get {keys:?}: item {} out of order or repeated",
                                it.key
                            ))
                        }
                    }
                }
                let mut problems = vec![];
                for (k, got) in keys.iter().zip(found) {
                    match self.slot(k) {
                        Slot::Known { v, .. } if v == got => self.know(k, got, at),
                        Slot::Known { v: Some(_), since } if got.is_none() => {
                            self.miss(k, since, at, format!("get {k}: a miss"));
                            self.know(k, None, at);
                        }
                        // A wrong answer: the server's state is in doubt (reported once).
                        Slot::Known { v, .. } => {
                            problems.push(format!(
                                "{k}: expected {}, got {}",
                                show(&v),
                                show(&got)
                            ));
                            self.forget(k, &[got]);
                        }
                        Slot::Unknown(c) if c.contains(&got) => self.know(k, got, at),
                        Slot::Unknown(c) => {
                            let shown: Vec<String> = c.iter().map(show).collect();
                            problems.push(format!(
                                "{k}: expected one of {shown:?}, got {}",
                                show(&got)
                            ));
                            self.forget(k, &[got]);
                        }
                    }
                }
                if problems.is_empty() {
                    Verdict::Ok
                } else {
                    Verdict::Mismatch(format!("get {keys:?}: {}", problems.join("; ")))
                }
            }
            (Request::Set { key, flags, value }, Reply::Stored) => {
                self.know(key, Some(Value { flags: *flags, data: value.clone() }), at);
                Verdict::Ok
            }
            (Request::Delete(k), Reply::Deleted) => {
                let ok = match self.slot(k) {
                    Slot::Known { v, .. } => v.is_some(),
                    Slot::Unknown(c) => c.iter().any(Option::is_some),
                };
                self.know(k, None, at);
                if ok {
                    Verdict::Ok
                } else {
                    wrong(&format!("delete {k} (absent)"))
                }
            }
            (Request::Delete(k) | Request::Incr(k, _), Reply::NotFound) => {
                if let Slot::Known { v: Some(_), since } = self.slot(k) {
                    self.miss(k, since, at, format!("{} {k}: NOT_FOUND", req.op()));
                }
                self.know(k, None, at);
                Verdict::Ok
            }
            (Request::Incr(k, _), Reply::Number(n)) => {
                let [(_, after)] = &self.effects(req)[..] else { unreachable!("one key") };
                let hit = after.iter().flatten().find(|v| numeric(v) == Some(*n)).cloned();
                match hit {
                    Some(v) => {
                        self.know(k, Some(v), at);
                        Verdict::Ok
                    }
                    None => {
                        let c: Vec<String> = after.iter().map(show).collect();
                        let m = wrong(&format!("{} {k} (expected one of {c:?})", req.op()));
                        self.forget(k, &[]);
                        m
                    }
                }
            }
            (Request::Version, Reply::Version(_)) | (Request::Stats, Reply::Stats(_)) => {
                Verdict::Ok
            }
            _ => {
                let keys = req.keys();
                let v = wrong(&format!("{} {keys:?}", req.op()));
                self.no_reply(req);
                v
            }
        }
    }

    /// The misses no shard failure excuses (call once every connection is done).
    pub fn unexplained_losses(&mut self) -> Vec<String> {
        let pending = std::mem::take(&mut self.pending);
        let mut out = vec![];
        for l in pending {
            if self.outages.between(l.shard, l.since, l.at) {
                self.lost += 1;
            } else {
                out.push(format!(
                    "{} (shard {}) but its value was confirmed and no failure of the shard seen",
                    l.what, l.shard
                ));
            }
        }
        out
    }
}

/// The load's parameters.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub addr: String,
    pub workers: u32,
    /// Requests in all (split among the connections).
    pub count: u64,
    pub seed: u64,
    pub connections: u32,
    /// Small values' size.
    pub small_bytes: usize,
    /// Large values' sizes, drawn uniformly from this range (inclusive).
    pub large_bytes: (usize, usize),
    /// Share of sets that write a large value, in percent.
    pub large_percent: u32,
    /// Plain keys per connection (each connection has its own, and 8 counters).
    pub keys: u32,
    /// Read and write timeout of every socket: a reply later than this is a failure.
    #[serde(serialize_with = "as_ms")]
    pub timeout: Duration,
    /// The whole run's limit: the connections stop sending after it.
    #[serde(serialize_with = "as_ms")]
    pub deadline: Duration,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl Default for Options {
    fn default() -> Self {
        Options {
            addr: format!("127.0.0.1:{}", vmcall_proto::kv::HOST_PORT),
            workers: 2,
            count: 1000,
            seed: 1,
            connections: 1,
            small_bytes: 100,
            large_bytes: (8 << 10, 32 << 10),
            large_percent: 10,
            keys: 64,
            timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(600),
        }
    }
}

/// Counters per connection.
const COUNTERS: u32 = 8;

/// The seeded request stream of connection `conn`: the same for a given seed and options,
/// whatever the replies.
pub struct Mix {
    rng: ChaCha8Rng,
    conn: u32,
    seq: u64,
    opts: Options,
}

impl Mix {
    pub fn new(opts: &Options, conn: u32) -> Mix {
        let seed = opts.seed ^ (u64::from(conn) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Mix { rng: ChaCha8Rng::seed_from_u64(seed), conn, seq: 0, opts: opts.clone() }
    }

    fn key(&mut self) -> String {
        format!("k{}-{}", self.conn, self.rng.random_range(0..self.opts.keys.max(1)))
    }

    fn counter(&mut self) -> String {
        format!("n{}-{}", self.conn, self.rng.random_range(0..COUNTERS))
    }

    /// A value of `len` bytes that names its request (printable, position-dependent).
    fn value(&self, len: usize) -> Vec<u8> {
        let head = format!("v{}.{}.{}:", self.conn, self.seq, len);
        let mut v: Vec<u8> = head.into_bytes();
        v.truncate(len);
        let s = self.seq as usize;
        v.extend((v.len()..len).map(|i| b'a' + ((i * 7 + s) % 26) as u8));
        v
    }

    /// The next request: 30% single gets, 15% multi-key gets (2-4 keys), 30% sets (a quarter
    /// of them counters), 10% deletes, 15% incrs.
    pub fn next_request(&mut self) -> Request {
        self.seq += 1;
        let roll = self.rng.random_range(0..100);
        match roll {
            0..30 => {
                let k = if self.rng.random_range(0..5) == 0 { self.counter() } else { self.key() };
                Request::Get(vec![k])
            }
            30..45 => {
                let n = self.rng.random_range(2..=4);
                let mut keys: Vec<String> = vec![];
                while keys.len() < n {
                    let k =
                        if self.rng.random_range(0..4) == 0 { self.counter() } else { self.key() };
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
                Request::Get(keys)
            }
            45..75 => {
                let flags = self.rng.random_range(0..=0xffff);
                if self.rng.random_range(0..4) == 0 {
                    let key = self.counter();
                    let n: u64 = self.rng.random_range(0..1000);
                    return Request::Set { key, flags, value: n.to_string().into_bytes() };
                }
                let key = self.key();
                let large = self.rng.random_range(0..100) < self.opts.large_percent;
                let (lo, hi) = self.opts.large_bytes;
                let len = if large {
                    self.rng.random_range(lo.min(hi)..=hi.max(lo))
                } else {
                    self.opts.small_bytes
                };
                Request::Set { key, flags, value: self.value(len) }
            }
            75..85 => {
                let k = if self.rng.random_range(0..4) == 0 { self.counter() } else { self.key() };
                Request::Delete(k)
            }
            _ => {
                let k = self.counter();
                Request::Incr(k, self.rng.random_range(1..=100))
            }
        }
    }
}

/// A shard's outage as the load saw it: consecutive failed requests touching it, and how
/// long from the first failure until a request touching it succeeded again.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outage {
    pub shard: u32,
    pub failed: u64,
    /// From the start of the load to the first failed request's send, ms.
    pub start_ms: f64,
    /// From the first failure's send to the first success's reply, ms (`null`: never
    /// served again before the load ended).
    pub serve_again_ms: Option<f64>,
}

/// What a load did.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub options: Options,
    pub server_version: String,
    pub requests: u64,
    /// Requests whose reply the model accepted as a success.
    pub ok: u64,
    pub by_op: BTreeMap<String, u64>,
    /// Requests that did not succeed, by kind: `shard_unavailable` (the documented error),
    /// `mismatch`, `timeout`, `closed`, `protocol`, `io`.
    pub errors: BTreeMap<String, u64>,
    pub mismatches: u64,
    /// The first mismatches, described.
    pub first_mismatches: Vec<String>,
    /// Misses of confirmed values excused by a failure of their shard.
    pub lost_to_restarts: u64,
    pub outages: Vec<Outage>,
    pub reconnects: u64,
    /// Connections the server closed before their first reply (through slirp: nothing was
    /// listening in the guest at that moment), made again with the same request.
    pub refused: u64,
    pub bytes_sent: u64,
    pub bytes_received_values: u64,
    pub large_sets: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    /// Host round-trip latency in microseconds.
    pub latency_us: Latency,
    /// Emulated instructions per request, when the run's figures tell (`bench kv` fills it
    /// from the front's `bench kvfront:` line).
    pub instructions_per_request: Option<f64>,
}

impl LoadReport {
    /// Failures that make `cargo xtask load` fail: mismatches, missing replies, garbage.
    pub fn failures(&self) -> u64 {
        self.errors.iter().filter(|(k, _)| k.as_str() != "shard_unavailable").map(|(_, v)| v).sum()
    }
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

fn latency(h: &hdrhistogram::Histogram<u64>) -> Latency {
    Latency {
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        max: h.max(),
        mean: h.mean(),
    }
}

/// One connection's results.
struct ConnResult {
    model: Model,
    hist: hdrhistogram::Histogram<u64>,
    by_op: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    mismatches: Vec<String>,
    ok: u64,
    reconnects: u64,
    refused: u64,
    bytes_sent: u64,
    bytes_values: u64,
    large_sets: u64,
    /// (shard, sent, received, ok) of every request touching one shard.
    shard_events: Vec<(u32, Instant, Instant, bool)>,
    requests: u64,
}

const KEEP_MISMATCHES: usize = 20;
/// Connections closed before their first reply, in a row, before that is a failure.
const MAX_REFUSED: u32 = 50;

fn connection(
    opts: &Options,
    conn: u32,
    count: u64,
    outages: Arc<Outages>,
    end: Instant,
) -> ConnResult {
    let mut mix = Mix::new(opts, conn);
    let mut r = ConnResult {
        model: Model::new(opts.workers, outages),
        hist: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"),
        by_op: BTreeMap::new(),
        errors: BTreeMap::new(),
        mismatches: vec![],
        ok: 0,
        reconnects: 0,
        refused: 0,
        bytes_sent: 0,
        bytes_values: 0,
        large_sets: 0,
        shard_events: vec![],
        requests: 0,
    };
    let mut client: Option<Client> = None;
    let mut fresh = false;
    let fail = |r: &mut ConnResult, kind: &str, what: String| {
        *r.errors.entry(kind.to_string()).or_default() += 1;
        if r.mismatches.len() < KEEP_MISMATCHES {
            r.mismatches.push(what);
        }
    };
    for _ in 0..count {
        if Instant::now() >= end {
            fail(&mut r, "deadline", format!("connection {conn}: the run's deadline passed"));
            break;
        }
        let req = mix.next_request();
        *r.by_op.entry(req.op().to_string()).or_default() += 1;
        r.requests += 1;
        if let Request::Set { value, .. } = &req {
            if value.len() > opts.small_bytes.max(64) {
                r.large_sets += 1;
            }
        }
        // A connection slirp accepted but the guest did not (nothing listening on it at that
        // moment: the front listens on a few sockets at once) is closed before any reply:
        // made again, the same request resent, a bounded number of times.
        let mut refused = 0;
        let attempt = loop {
            let c = match client.as_mut() {
                Some(c) => c,
                None => match Client::connect(&opts.addr, opts.timeout) {
                    Ok(c) => {
                        fresh = true;
                        client.insert(c)
                    }
                    Err(e) => break Err(e),
                },
            };
            let sent = Instant::now();
            let reply = c.call(&req);
            let at = Instant::now();
            if fresh && reply == Err(ReadError::Closed) && refused < MAX_REFUSED && at < end {
                refused += 1;
                r.refused += 1;
                r.model.no_reply(&req);
                client = None;
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            break Ok((sent, reply, at));
        };
        let (sent, reply, at) = match attempt {
            Ok(a) => a,
            Err(e) => {
                fail(&mut r, "connect", format!("connection {conn}: connect: {e}"));
                r.model.no_reply(&req);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        fresh = fresh && reply.is_err();
        r.bytes_sent += req.encode().len() as u64;
        let shards: Vec<u32> = {
            let mut s: Vec<u32> =
                req.keys().iter().map(|k| shard_of(k.as_bytes(), opts.workers)).collect();
            s.sort_unstable();
            s.dedup();
            s
        };
        match reply {
            Ok(reply) => {
                r.hist.saturating_record(at.duration_since(sent).as_micros().max(1) as u64);
                if let Reply::Values(items) = &reply {
                    r.bytes_values += items.iter().map(|i| i.value.data.len() as u64).sum::<u64>();
                }
                match r.model.check(&req, &reply, sent, at) {
                    Verdict::Ok => {
                        r.ok += 1;
                        r.shard_events.extend(shards.iter().map(|&s| (s, sent, at, true)));
                    }
                    Verdict::ShardDown(n) => {
                        *r.errors.entry("shard_unavailable".into()).or_default() += 1;
                        r.shard_events.push((n, sent, at, false));
                    }
                    Verdict::Mismatch(m) => fail(&mut r, "mismatch", m),
                }
            }
            Err(e) => {
                let keys = req.keys();
                fail(&mut r, e.kind(), format!("{} {keys:?}: {e}", req.op()));
                r.model.no_reply(&req);
                // The stream is out of step (or gone): a fresh connection.
                client = None;
                r.reconnects += 1;
            }
        }
    }
    for m in r.model.unexplained_losses() {
        fail(&mut r, "mismatch", m);
    }
    r
}

/// The outages in `events` (shard, sent, received, ok), times from `t0`, in the order the
/// replies came: a run of failures touching a shard, closed by the first success sent after
/// the run's first failure came back (a success sent earlier was served before the shard
/// went down: replies on other connections overtake each other). A failure sent before the
/// closing success's reply came was in flight while the shard came back: it counts in the
/// same outage.
pub fn outages(mut events: Vec<(u32, Instant, Instant, bool)>, t0: Instant) -> Vec<Outage> {
    events.sort_by_key(|e| (e.0, e.2));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut out: Vec<Outage> = vec![];
    // The outage of the current shard still taking failures: its first send, when that
    // failure came back, and when it was closed (the success's reply).
    let mut open: Option<(Instant, Instant, Option<Instant>)> = None;
    let mut last_shard = None;
    for (shard, sent, at, ok) in events {
        if last_shard != Some(shard) {
            open = None;
            last_shard = Some(shard);
        }
        match (open, ok) {
            (Some((_, _, Some(closed))), false) if sent <= closed => {
                out.last_mut().expect("an open outage is in the list").failed += 1;
            }
            (None | Some((_, _, Some(_))), false) => {
                out.push(Outage {
                    shard,
                    failed: 1,
                    start_ms: ms(sent - t0),
                    serve_again_ms: None,
                });
                open = Some((sent, at, None));
            }
            (Some((_, _, None)), false) => out.last_mut().expect("open").failed += 1,
            (Some((first, first_back, None)), true) if sent >= first_back => {
                out.last_mut().expect("open").serve_again_ms =
                    Some(ms(at.saturating_duration_since(first)));
                open = Some((first, first_back, Some(at)));
            }
            (_, true) => {}
        }
    }
    out
}

/// Runs the load of `opts` against its server, once it answers `version` (waiting up to
/// `ready` for it).
pub fn run(opts: &Options, ready: Duration) -> Result<LoadReport> {
    if opts.workers == 0 || opts.connections == 0 {
        bail!("--workers and --connections must be at least 1");
    }
    if opts.large_bytes.0.max(opts.large_bytes.1) > MAX_VALUE || opts.small_bytes > MAX_VALUE {
        bail!("value sizes must be at most {MAX_VALUE} bytes");
    }
    let server_version = wait_ready(&opts.addr, opts.timeout, Instant::now() + ready)?;
    let outages_seen = Arc::new(Outages::default());
    let t0 = Instant::now();
    let end = t0 + opts.deadline;
    let c = u64::from(opts.connections);
    let results: Vec<ConnResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..opts.connections)
            .map(|i| {
                let n = opts.count / c + u64::from(u64::from(i) < opts.count % c);
                let o = outages_seen.clone();
                s.spawn(move || connection(opts, i, n, o, end))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a load connection panicked")).collect()
    });
    let seconds = t0.elapsed().as_secs_f64();
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut rep = LoadReport {
        options: opts.clone(),
        server_version,
        requests: 0,
        ok: 0,
        by_op: BTreeMap::new(),
        errors: BTreeMap::new(),
        mismatches: 0,
        first_mismatches: vec![],
        lost_to_restarts: 0,
        outages: vec![],
        reconnects: 0,
        refused: 0,
        bytes_sent: 0,
        bytes_received_values: 0,
        large_sets: 0,
        seconds,
        requests_per_second: 0.0,
        latency_us: Latency::default(),
        instructions_per_request: None,
    };
    let mut events = vec![];
    for r in results {
        hist.add(&r.hist).context("merging histograms")?;
        rep.requests += r.requests;
        rep.ok += r.ok;
        for (k, v) in r.by_op {
            *rep.by_op.entry(k).or_default() += v;
        }
        for (k, v) in r.errors {
            *rep.errors.entry(k).or_default() += v;
        }
        rep.first_mismatches.extend(r.mismatches);
        rep.lost_to_restarts += r.model.lost;
        rep.reconnects += r.reconnects;
        rep.refused += r.refused;
        rep.bytes_sent += r.bytes_sent;
        rep.bytes_received_values += r.bytes_values;
        rep.large_sets += r.large_sets;
        events.extend(r.shard_events);
    }
    rep.first_mismatches.truncate(KEEP_MISMATCHES);
    rep.mismatches = rep.errors.get("mismatch").copied().unwrap_or(0);
    rep.outages = outages(events, t0);
    rep.requests_per_second = rep.requests as f64 / seconds.max(1e-9);
    rep.latency_us = latency(&hist);
    Ok(rep)
}

fn fmt_ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// The load's figures as a table and lines.
pub fn render(r: &LoadReport) -> String {
    let o = &r.options;
    let mut s = format!(
        "kv load: {} requests over {} connection(s) to {} ({}), {} worker(s), seed {}; \
         values {} B and {}..={} B ({}% of sets)\n",
        r.requests,
        o.connections,
        o.addr,
        r.server_version,
        o.workers,
        o.seed,
        o.small_bytes,
        o.large_bytes.0,
        o.large_bytes.1,
        o.large_percent
    );
    let mut t = crate::bench::table(&[
        "requests",
        "ok",
        "shard errors",
        "mismatches",
        "other failures",
        "req/s (host)",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "instr/request",
    ]);
    let shard = r.errors.get("shard_unavailable").copied().unwrap_or(0);
    t.add_row([
        r.requests.to_string(),
        r.ok.to_string(),
        shard.to_string(),
        r.mismatches.to_string(),
        (r.failures() - r.mismatches).to_string(),
        format!("{:.1}", r.requests_per_second),
        fmt_ms(r.latency_us.p50),
        fmt_ms(r.latency_us.p90),
        fmt_ms(r.latency_us.p99),
        fmt_ms(r.latency_us.max),
        r.instructions_per_request.map_or("-".into(), |i| format!("{i:.0}")),
    ]);
    s += &format!("{t}\n");
    let ops: Vec<String> = r.by_op.iter().map(|(k, v)| format!("{k} {v}")).collect();
    s += &format!(
        "requests by kind: {}; large sets {}; {:.1} s; {} reconnects, {} connections refused \
         and made again\n",
        ops.join(", "),
        r.large_sets,
        r.seconds,
        r.reconnects,
        r.refused
    );
    if !r.errors.is_empty() {
        let e: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s += &format!("errors by kind: {}\n", e.join(", "));
    }
    if r.lost_to_restarts > 0 {
        s += &format!("misses of values lost with a restarted shard: {}\n", r.lost_to_restarts);
    }
    for o in &r.outages {
        s += &format!(
            "shard {} unavailable from {:.0} ms: {} request(s) failed, {}\n",
            o.shard,
            o.start_ms,
            o.failed,
            o.serve_again_ms.map_or("not served again before the end".into(), |t| format!(
                "served again after {t:.0} ms"
            ))
        );
    }
    for m in &r.first_mismatches {
        s += &format!("  {m}\n");
    }
    s
}

/// `MIN-MAX` or `N` bytes.
pub fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let num = |t: &str| {
        t.trim().parse::<usize>().map_err(|_| format!("`{s}`: expected N or MIN-MAX bytes"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(s)?, num(s)?),
    };
    if lo > hi || hi > MAX_VALUE || lo == 0 {
        return Err(format!("`{s}`: expected 1 <= MIN <= MAX <= {MAX_VALUE}"));
    }
    Ok((lo, hi))
}

/// `cargo xtask load`: the load, its table, and `--json`; false on any failure.
pub fn command(a: &crate::cli::LoadArgs) -> Result<bool> {
    let opts = Options {
        addr: a.addr.clone(),
        workers: a.workers,
        count: a.count,
        seed: a.seed,
        connections: a.connections,
        small_bytes: a.small_bytes,
        large_bytes: a.large_bytes,
        large_percent: a.large_percent,
        keys: a.keys,
        timeout: Duration::from_millis(a.timeout_ms),
        deadline: Duration::from_secs(a.deadline),
    };
    let r = run(&opts, Duration::from_secs(a.wait))?;
    print!("{}", render(&r));
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&r)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if r.failures() > 0 {
        eprintln!(
            "xtask load: {} failure(s) ({} mismatches); the first are listed above",
            r.failures(),
            r.mismatches
        );
    }
    Ok(r.failures() == 0)
}

/// Checks a key against the protocol's rules (the mix only makes valid ones).
pub fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= MAX_KEY && k.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests;
