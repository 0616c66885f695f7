// SPDX-License-Identifier: MIT OR Apache-2.0
//! Tests of the load generator: the reply parser on bytes, the model on replies (the
//! shard-down rule among them), the mix, and whole loads against a small in-process
//! memcached text server with injectable faults (a wrong value, a shard down for a while, a
//! reply never sent, garbage, a shard emptied without a word). The load against a real
//! memcached is a system test (`tests/kv_load.rs`: the package comes with the test set).

use super::*;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

fn parse(req: &Request, bytes: &[u8]) -> Result<Reply, ReadError> {
    let mut r = std::io::Cursor::new(bytes.to_vec());
    let reply = read_reply(&mut r, req)?;
    assert_eq!(r.position() as usize, bytes.len(), "bytes left after the reply");
    Ok(reply)
}

fn get(keys: &[&str]) -> Request {
    Request::Get(keys.iter().map(|k| k.to_string()).collect())
}

fn set(k: &str, flags: u32, v: &str) -> Request {
    Request::Set { key: k.into(), flags, value: v.as_bytes().to_vec() }
}

fn val(flags: u32, v: &str) -> Value {
    Value { flags, data: v.as_bytes().to_vec() }
}

fn item(k: &str, flags: u32, v: &str) -> Item {
    Item { key: k.into(), value: val(flags, v) }
}

#[test]
fn requests_encode_as_the_text_protocol() {
    assert_eq!(get(&["a", "b"]).encode(), b"get a b\r\n");
    assert_eq!(set("k", 5, "xy").encode(), b"set k 5 0 2\r\nxy\r\n");
    assert_eq!(Request::Delete("k".into()).encode(), b"delete k\r\n");
    assert_eq!(Request::Incr("n".into(), 7).encode(), b"incr n 7\r\n");
    assert_eq!(Request::Version.encode(), b"version\r\n");
    assert_eq!(Request::Stats.encode(), b"stats\r\n");
    assert_eq!((get(&["a"]).op(), get(&["a", "b"]).op()), ("get", "get_multi"));
}

#[test]
fn replies_parse() {
    let g = get(&["a", "b", "c"]);
    assert_eq!(
        parse(&g, b"VALUE a 3 2\r\nhi\r\nVALUE c 0 4 99\r\nx\r\ny\r\nEND\r\n"),
        Ok(Reply::Values(vec![item("a", 3, "hi"), item("c", 0, "x\r\ny")]))
    );
    assert_eq!(parse(&g, b"END\r\n"), Ok(Reply::Values(vec![])));
    assert_eq!(parse(&set("a", 0, "x"), b"STORED\r\n"), Ok(Reply::Stored));
    assert_eq!(parse(&set("a", 0, "x"), b"NOT_STORED\r\n"), Ok(Reply::NotStored));
    let d = Request::Delete("a".into());
    assert_eq!(parse(&d, b"DELETED\r\n"), Ok(Reply::Deleted));
    assert_eq!(parse(&d, b"NOT_FOUND\r\n"), Ok(Reply::NotFound));
    let i = Request::Incr("n".into(), 1);
    assert_eq!(parse(&i, b"18446744073709551615\r\n"), Ok(Reply::Number(u64::MAX)));
    assert_eq!(parse(&i, b"NOT_FOUND\r\n"), Ok(Reply::NotFound));
    assert_eq!(
        parse(&Request::Version, b"VERSION 1.6.21\r\n"),
        Ok(Reply::Version("1.6.21".into()))
    );
    assert_eq!(
        parse(&Request::Stats, b"STAT pid 1\r\nSTAT curr_items 0\r\nEND\r\n"),
        Ok(Reply::Stats(vec![("pid".into(), "1".into()), ("curr_items".into(), "0".into())]))
    );
    // The error lines, for any request.
    assert_eq!(parse(&g, b"ERROR\r\n"), Ok(Reply::Error));
    assert_eq!(parse(&i, b"CLIENT_ERROR bad\r\n"), Ok(Reply::ClientError("bad".into())));
    let e = parse(&g, b"SERVER_ERROR shard 3 unavailable\r\n").unwrap();
    assert_eq!(e.shard_down(), Some(3));
    assert_eq!(Reply::ServerError("out of memory".into()).shard_down(), None);
    assert_eq!(Reply::ServerError("shard x unavailable".into()).shard_down(), None);
}

#[test]
fn malformed_replies_are_refused() {
    let g = get(&["a"]);
    let protocol = |req: &Request, b: &[u8]| {
        let mut r = std::io::Cursor::new(b.to_vec());
        matches!(read_reply(&mut r, req), Err(ReadError::Protocol(_)))
    };
    for bad in [
        &b"STORED\r\n"[..],              // not a get's reply
        b"VALUE b 0 1\r\nx\r\nEND\r\n",  // a key not asked for
        b"VALUE a 0 1\r\nxy\r\nEND\r\n", // longer than said
        b"VALUE a x 1\r\nx\r\nEND\r\n",  // bad flags
        b"VALUE a 0 99999999\r\n",       // beyond the value limit
        b"VALUE a 0\r\nEND\r\n",         // too few words
        b"END\n",                        // no \r
    ] {
        assert!(protocol(&g, bad), "{:?}", String::from_utf8_lossy(bad));
    }
    assert!(protocol(&Request::Incr("n".into(), 1), b"-1\r\n"));
    assert!(protocol(&Request::Incr("n".into(), 1), b"99999999999999999999999\r\n"));
    assert!(protocol(&Request::Delete("n".into()), b"STORED\r\n"));
    assert!(protocol(&Request::Version, b"1.6\r\n"));
    assert!(protocol(&Request::Stats, b"pid 1\r\nEND\r\n"));
    assert!(protocol(&g, &[b'x'; 3000]));
    // Cut short: the server closed.
    let mut r = std::io::Cursor::new(b"VALUE a 0 5\r\nab".to_vec());
    assert_eq!(read_reply(&mut r, &g), Err(ReadError::Closed));
    let mut r = std::io::Cursor::new(b"STOR".to_vec());
    assert_eq!(read_reply(&mut r, &set("a", 0, "x")), Err(ReadError::Closed));
    let mut r = std::io::Cursor::new(vec![]);
    assert_eq!(read_reply(&mut r, &g), Err(ReadError::Closed));
}

fn model(workers: u32) -> Model {
    Model::new(workers, Arc::new(Outages::default()))
}

/// Checks `reply` to `req` now.
fn check(m: &mut Model, req: &Request, reply: Reply) -> Verdict {
    let t = Instant::now();
    m.check(req, &reply, t, t)
}

fn mismatch(v: Verdict) -> bool {
    matches!(v, Verdict::Mismatch(_))
}

/// Two keys on different shards of 2.
fn two_shards() -> (&'static str, &'static str) {
    let keys = ["a", "b", "c", "d", "e", "f"];
    let a = keys.iter().find(|k| shard_of(k.as_bytes(), 2) == 0).unwrap();
    let b = keys.iter().find(|k| shard_of(k.as_bytes(), 2) == 1).unwrap();
    (a, b)
}

#[test]
fn the_model_follows_sets_gets_deletes_and_incrs() {
    let mut m = model(1);
    assert_eq!(check(&mut m, &get(&["a"]), Reply::Values(vec![])), Verdict::Ok);
    assert!(mismatch(check(&mut m, &get(&["a"]), Reply::Values(vec![item("a", 0, "x")]))));
    let mut m = model(1);
    assert_eq!(check(&mut m, &set("a", 7, "one"), Reply::Stored), Verdict::Ok);
    assert!(mismatch(check(&mut m, &set("a", 7, "two"), Reply::NotStored)));
    let mut m = model(1);
    check(&mut m, &set("a", 7, "one"), Reply::Stored);
    assert_eq!(check(&mut m, &get(&["a"]), Reply::Values(vec![item("a", 7, "one")])), Verdict::Ok);
    // Wrong flags, wrong data, a miss with no failure seen (pending, then a mismatch).
    assert!(mismatch(check(&mut m, &get(&["a"]), Reply::Values(vec![item("a", 8, "one")]))));
    let mut m = model(1);
    check(&mut m, &set("a", 7, "one"), Reply::Stored);
    assert!(mismatch(check(&mut m, &get(&["a"]), Reply::Values(vec![item("a", 7, "onf")]))));
    let mut m = model(1);
    check(&mut m, &set("a", 7, "one"), Reply::Stored);
    assert_eq!(check(&mut m, &get(&["a"]), Reply::Values(vec![])), Verdict::Ok);
    assert_eq!(m.unexplained_losses().len(), 1);
    // Multi-key: request order, misses skipped, nothing repeated or reordered.
    let mut m = model(1);
    check(&mut m, &set("a", 1, "A"), Reply::Stored);
    check(&mut m, &set("c", 3, "C"), Reply::Stored);
    let abc = get(&["a", "b", "c"]);
    let ok = Reply::Values(vec![item("a", 1, "A"), item("c", 3, "C")]);
    assert_eq!(check(&mut m, &abc, ok), Verdict::Ok);
    assert!(mismatch(check(
        &mut m,
        &abc,
        Reply::Values(vec![item("c", 3, "C"), item("a", 1, "A")])
    )));
    let mut m = model(1);
    check(&mut m, &set("a", 1, "A"), Reply::Stored);
    assert!(mismatch(check(
        &mut m,
        &abc,
        Reply::Values(vec![item("a", 1, "A"), item("a", 1, "A")])
    )));
    // Delete: DELETED only for a present key; then absent.
    let mut m = model(1);
    let del = Request::Delete("a".into());
    assert!(mismatch(check(&mut m, &del, Reply::Deleted)));
    check(&mut m, &set("a", 1, "A"), Reply::Stored);
    assert_eq!(check(&mut m, &del, Reply::Deleted), Verdict::Ok);
    assert_eq!(check(&mut m, &del, Reply::NotFound), Verdict::Ok);
    assert_eq!(check(&mut m, &get(&["a"]), Reply::Values(vec![])), Verdict::Ok);
    // Incr: the sum, flags kept; NOT_FOUND when absent; a number for an absent key is wrong.
    let mut m = model(1);
    let inc = Request::Incr("n".into(), 5);
    assert_eq!(check(&mut m, &inc, Reply::NotFound), Verdict::Ok);
    assert!(mismatch(check(&mut m, &inc, Reply::Number(5))));
    let mut m = model(1);
    check(&mut m, &set("n", 9, "10"), Reply::Stored);
    assert!(mismatch(check(&mut m, &inc, Reply::Number(16))));
    let mut m = model(1);
    check(&mut m, &set("n", 9, "10"), Reply::Stored);
    assert_eq!(check(&mut m, &inc, Reply::Number(15)), Verdict::Ok);
    assert_eq!(check(&mut m, &get(&["n"]), Reply::Values(vec![item("n", 9, "15")])), Verdict::Ok);
    // Error lines are mismatches for the valid requests the mix makes.
    for e in [Reply::Error, Reply::ClientError("x".into()), Reply::ServerError("oom".into())] {
        assert!(mismatch(check(&mut model(1), &get(&["a"]), e)));
    }
    assert!(mismatch(check(&mut model(1), &get(&["a"]), Reply::Stored)));
}

#[test]
fn a_shard_down_makes_its_keys_unknown_until_seen_again() {
    let (a, b) = two_shards();
    let mut m = model(2);
    check(&mut m, &set(a, 1, "A"), Reply::Stored);
    check(&mut m, &set(b, 2, "B"), Reply::Stored);
    // The error must name the shard of a key of the request.
    assert!(mismatch(check(&mut m, &get(&[a]), Reply::ServerError("shard 1 unavailable".into()))));
    assert!(mismatch(check(&mut m, &get(&[a]), Reply::ServerError("shard 7 unavailable".into()))));
    // Shard 1 down: a failed set of b leaves b as "B", "B2" or absent.
    let down = Reply::ServerError("shard 1 unavailable".into());
    assert_eq!(check(&mut m, &set(b, 2, "B2"), down.clone()), Verdict::ShardDown(1));
    assert_eq!(check(&mut m, &get(&[a, b]), down), Verdict::ShardDown(1));
    // Shard 0 is unaffected: a miss of a is still a loss nobody explains.
    let mut m2 = model(2);
    check(&mut m2, &set(a, 1, "A"), Reply::Stored);
    check(&mut m2, &set(b, 2, "B"), Reply::Stored);
    check(&mut m2, &set(b, 2, "B2"), Reply::ServerError("shard 1 unavailable".into()));
    assert!(mismatch(check(&mut m2, &get(&[a]), Reply::Values(vec![item(a, 1, "X")]))));
    // Each accepted answer for b, and b known again after it.
    for (got, then_bad) in [
        (vec![], item(b, 2, "B")),
        (vec![item(b, 2, "B")], item(b, 2, "B2")),
        (vec![item(b, 2, "B2")], item(b, 2, "B")),
    ] {
        let mut m3 = model(2);
        check(&mut m3, &set(b, 2, "B"), Reply::Stored);
        check(&mut m3, &set(b, 2, "B2"), Reply::ServerError("shard 1 unavailable".into()));
        assert!(mismatch(check(&mut m3, &get(&[b]), Reply::Values(vec![item(b, 9, "Z")]))));
        let mut m3 = model(2);
        check(&mut m3, &set(b, 2, "B"), Reply::Stored);
        check(&mut m3, &set(b, 2, "B2"), Reply::ServerError("shard 1 unavailable".into()));
        assert_eq!(check(&mut m3, &get(&[b]), Reply::Values(got.clone())), Verdict::Ok, "{got:?}");
        assert!(mismatch(check(&mut m3, &get(&[b]), Reply::Values(vec![then_bad]))), "{got:?}");
        assert!(m3.unexplained_losses().is_empty());
    }
    // After the next successful set it is known exactly again.
    let mut m4 = model(2);
    check(&mut m4, &set(b, 2, "B"), Reply::Stored);
    check(&mut m4, &get(&[b]), Reply::ServerError("shard 1 unavailable".into()));
    check(&mut m4, &set(b, 3, "C"), Reply::Stored);
    assert!(
        mismatch(check(&mut m4, &get(&[b]), Reply::Values(vec![])))
            || !m4.unexplained_losses().is_empty()
    );
    // Incr on an unknown counter: NOT_FOUND or the sum.
    let (n0, n1) = two_shards();
    let _ = n0;
    let inc = Request::Incr(n1.into(), 2);
    let mut m5 = model(2);
    check(&mut m5, &set(n1, 0, "40"), Reply::Stored);
    check(&mut m5, &inc, Reply::ServerError("shard 1 unavailable".into()));
    assert_eq!(check(&mut m5, &inc, Reply::Number(44)), Verdict::Ok, "40 + 2 failed, + 2 done");
    let mut m5 = model(2);
    check(&mut m5, &set(n1, 0, "40"), Reply::Stored);
    check(&mut m5, &inc, Reply::ServerError("shard 1 unavailable".into()));
    assert!(mismatch(check(&mut m5, &inc, Reply::Number(41))));
}

#[test]
fn a_miss_is_excused_by_a_failure_another_connection_saw() {
    let (_, b) = two_shards();
    let outages = Arc::new(Outages::default());
    let mut one = Model::new(2, outages.clone());
    let mut two = Model::new(2, outages.clone());
    let t0 = Instant::now();
    one.check(&set(b, 0, "B"), &Reply::Stored, t0, t0);
    // The other connection sees shard 1 down after b was confirmed, before the miss.
    let t1 = t0 + Duration::from_millis(5);
    let down = Reply::ServerError("shard 1 unavailable".into());
    assert_eq!(two.check(&get(&["zz", b]), &down, t1, t1), Verdict::ShardDown(1));
    let t2 = t1 + Duration::from_millis(5);
    assert_eq!(one.check(&get(&[b]), &Reply::Values(vec![]), t2, t2), Verdict::Ok);
    assert!(one.unexplained_losses().is_empty());
    assert_eq!(one.lost, 1);
    // A failure seen only before the value was confirmed excuses nothing.
    let outages = Arc::new(Outages::default());
    let mut one = Model::new(2, outages.clone());
    let mut two = Model::new(2, outages);
    two.check(&get(&[b]), &down, t0, t0);
    one.check(&set(b, 0, "B"), &Reply::Stored, t1, t1);
    one.check(&get(&[b]), &Reply::Values(vec![]), t2, t2);
    assert_eq!(one.unexplained_losses().len(), 1);
    // Seen after the miss was checked but overlapping it: excused at the end.
    let outages = Arc::new(Outages::default());
    let mut one = Model::new(2, outages.clone());
    let mut two = Model::new(2, outages);
    one.check(&set(b, 0, "B"), &Reply::Stored, t0, t0);
    one.check(&get(&[b]), &Reply::Values(vec![]), t2, t2);
    two.check(&get(&[b]), &down, t1, t2 + Duration::from_millis(1));
    assert!(one.unexplained_losses().is_empty());
}

#[test]
fn no_reply_leaves_the_keys_unknown() {
    let mut m = model(1);
    check(&mut m, &set("a", 0, "A"), Reply::Stored);
    m.no_reply(&set("a", 0, "B"));
    assert_eq!(check(&mut m, &get(&["a"]), Reply::Values(vec![item("a", 0, "B")])), Verdict::Ok);
    m.no_reply(&Request::Delete("a".into()));
    assert_eq!(check(&mut m, &get(&["a"]), Reply::Values(vec![])), Verdict::Ok);
    assert!(m.unexplained_losses().is_empty());
}

#[test]
fn the_mix_is_seeded_and_valid() {
    let o = Options { keys: 16, ..Options::default() };
    let a: Vec<Request> = {
        let mut m = Mix::new(&o, 0);
        (0..2000).map(|_| m.next_request()).collect()
    };
    let mut m = Mix::new(&o, 0);
    assert!(a.iter().all(|r| *r == m.next_request()), "same seed, same requests");
    let mut other = Mix::new(&Options { seed: 2, ..o.clone() }, 0);
    assert!(a.iter().any(|r| *r != other.next_request()));
    let mut ops = BTreeMap::new();
    let (mut large, mut small) = (0, 0);
    for r in &a {
        *ops.entry(r.op()).or_insert(0u32) += 1;
        assert!(r.keys().iter().all(|k| valid_key(k)), "{r:?}");
        if let Request::Get(k) = r {
            let mut d = k.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), k.len(), "no repeated key in a get");
        }
        if let Request::Set { key, value, .. } = r {
            if key.starts_with('n') {
                assert!(std::str::from_utf8(value).unwrap().parse::<u64>().is_ok());
            } else if value.len() == o.small_bytes {
                small += 1;
            } else {
                assert!((o.large_bytes.0..=o.large_bytes.1).contains(&value.len()));
                large += 1;
            }
        }
    }
    for op in ["get", "get_multi", "set", "delete", "incr"] {
        assert!(ops.get(op).copied().unwrap_or(0) > 100, "{op}: {ops:?}");
    }
    assert!(large > 10 && small > 5 * large, "{large} large, {small} small");
    // Connections use their own keys.
    let mut m1 = Mix::new(&o, 1);
    assert!((0..100)
        .flat_map(|_| m1.next_request().keys().iter().map(|k| k.to_string()).collect::<Vec<_>>())
        .all(|k| k[1..].starts_with("1-")));
}

#[test]
fn outages_are_runs_of_failures_until_a_success() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let ev = vec![
        (1, at(10), at(11), true),
        (1, at(20), at(21), false),
        (0, at(22), at(23), true),
        (1, at(30), at(31), false),
        (1, at(50), at(52), true),
        (1, at(60), at(61), false),
        // Sent before the success above came back: the same outage.
        (1, at(49), at(55), false),
        // A success sent before the first failure came back (served before the shard went
        // down, its reply overtaken) does not end an outage.
        (2, at(100), at(101), false),
        (2, at(99), at(102), true),
        (2, at(103), at(104), false),
        (2, at(105), at(107), true),
    ];
    let o = outages(ev, t0);
    assert_eq!(o.len(), 3, "{o:?}");
    assert_eq!((o[0].shard, o[0].failed, o[0].start_ms), (1, 3, 20.0));
    assert_eq!(o[0].serve_again_ms, Some(32.0));
    assert_eq!((o[1].failed, o[1].serve_again_ms), (1, None));
    assert_eq!((o[2].shard, o[2].failed, o[2].start_ms), (2, 2, 100.0));
    assert_eq!(o[2].serve_again_ms, Some(7.0));
}

#[test]
fn value_ranges_parse() {
    assert_eq!(parse_range("100"), Ok((100, 100)));
    assert_eq!(parse_range("8192-32768"), Ok((8192, 32768)));
    for bad in ["", "0", "5-4", "x", "1-2000000", "-3"] {
        assert!(parse_range(bad).is_err(), "{bad}");
    }
}

/// Faults the fake server injects, by the global index of the request (0-based).
#[derive(Clone, Default)]
struct Faults {
    /// The first get hit at or after this index returns one byte changed.
    wrong_value_from: Option<u64>,
    /// (shard, from, to): requests touching the shard in [from, to) get the shard error;
    /// at `to` the shard is emptied (the restart).
    shard_down: Option<(u32, u64, u64)>,
    /// This request is carried out but not answered.
    drop_reply_at: Option<u64>,
    /// This request is answered with a line that is no reply.
    garbage_at: Option<u64>,
    /// At this index the shard is emptied without any error.
    silent_loss: Option<(u32, u64)>,
    /// Connections (in accept order, 0 the readiness probe's) closed at once, unanswered.
    refuse: Vec<usize>,
}

struct Store {
    items: HashMap<String, Value>,
    next: u64,
    wrong_pending: bool,
    restarted: bool,
    lost: bool,
}

/// A thread-per-connection memcached text server, on `workers` shards, with `faults`.
struct Fake {
    addr: String,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    served: Arc<AtomicU64>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn fake(workers: u32, faults: Faults) -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let store = Arc::new(Mutex::new(Store {
        items: HashMap::new(),
        next: 0,
        wrong_pending: false,
        restarted: false,
        lost: false,
    }));
    let (st, sv) = (stop.clone(), served.clone());
    let handle = std::thread::spawn(move || {
        let mut conns = vec![];
        let mut accepted = 0;
        while !st.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, _)) if faults.refuse.contains(&accepted) => {
                    accepted += 1;
                    drop(s);
                }
                Ok((s, _)) => {
                    accepted += 1;
                    let (st, store, f, sv) =
                        (st.clone(), store.clone(), faults.clone(), sv.clone());
                    conns.push(std::thread::spawn(move || serve(s, workers, &f, &store, &st, &sv)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    });
    Fake { addr, stop, handle: Some(handle), served }
}

/// A line from the client, waiting while it sends nothing; `None` at its end or at stop.
fn client_line(r: &mut BufReader<TcpStream>, stop: &AtomicBool) -> Option<String> {
    let mut buf = Vec::new();
    loop {
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => return None,
            Ok(_) if buf.ends_with(b"\n") => {
                return Some(String::from_utf8_lossy(&buf).trim_end().to_string())
            }
            Ok(_) => return None,
            Err(_) if stop.load(Ordering::SeqCst) => return None,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
}

fn serve(
    s: TcpStream,
    workers: u32,
    f: &Faults,
    store: &Mutex<Store>,
    stop: &AtomicBool,
    served: &AtomicU64,
) {
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    s.set_nodelay(true).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    while let Some(line) = client_line(&mut r, stop) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(&cmd) = words.first() else { continue };
        // A set's data, read before anything else is decided.
        let data = if cmd == "set" {
            let n: usize = words.get(4).and_then(|n| n.parse().ok()).unwrap_or(0);
            let mut d = vec![0; n + 2];
            r.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if r.read_exact(&mut d).is_err() {
                return;
            }
            r.get_ref().set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            d.truncate(n);
            d
        } else {
            vec![]
        };
        let mut st = store.lock().unwrap();
        let n = st.next;
        st.next += 1;
        if let Some((shard, at)) = f.silent_loss {
            if n >= at && !st.lost {
                st.lost = true;
                st.items.retain(|k, _| shard_of(k.as_bytes(), workers) != shard);
            }
        }
        let keys: Vec<&str> = match cmd {
            "get" | "gets" => words[1..].to_vec(),
            "set" | "delete" | "incr" => words.get(1).into_iter().copied().collect(),
            _ => vec![],
        };
        let mut out: Vec<u8> = vec![];
        let down = f.shard_down.and_then(|(shard, from, to)| {
            if n >= to && !st.restarted {
                st.restarted = true;
                st.items.retain(|k, _| shard_of(k.as_bytes(), workers) != shard);
            }
            let hit = keys.iter().any(|k| shard_of(k.as_bytes(), workers) == shard);
            (hit && (from..to).contains(&n)).then_some(shard)
        });
        if let Some(shard) = down {
            out.extend(format!("SERVER_ERROR shard {shard} unavailable\r\n").bytes());
        } else {
            if f.wrong_value_from.is_some_and(|w| n == w) {
                st.wrong_pending = true;
            }
            match cmd {
                "get" | "gets" => {
                    for k in &keys {
                        if let Some(v) = st.items.get(*k).cloned() {
                            let mut data = v.data.clone();
                            if st.wrong_pending {
                                st.wrong_pending = false;
                                data[0] ^= 1;
                            }
                            out.extend(format!("VALUE {k} {} {}\r\n", v.flags, data.len()).bytes());
                            out.extend(&data);
                            out.extend(b"\r\n");
                        }
                    }
                    out.extend(b"END\r\n");
                }
                "set" => {
                    let flags = words.get(2).and_then(|f| f.parse().ok()).unwrap_or(0);
                    st.items.insert(keys[0].to_string(), Value { flags, data });
                    out.extend(b"STORED\r\n");
                }
                "delete" => match st.items.remove(keys[0]) {
                    Some(_) => out.extend(b"DELETED\r\n"),
                    None => out.extend(b"NOT_FOUND\r\n"),
                },
                "incr" => {
                    let d: u64 = words.get(2).and_then(|d| d.parse().ok()).unwrap_or(0);
                    match st.items.get_mut(keys[0]) {
                        None => out.extend(b"NOT_FOUND\r\n"),
                        Some(v) => match std::str::from_utf8(&v.data)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                        {
                            Some(x) => {
                                let y = x.wrapping_add(d);
                                v.data = y.to_string().into_bytes();
                                out.extend(format!("{y}\r\n").bytes());
                            }
                            None => out.extend(
                                b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
                            ),
                        },
                    }
                }
                "version" => out.extend(b"VERSION fake-1\r\n"),
                "stats" => {
                    out.extend(format!("STAT curr_items {}\r\nEND\r\n", st.items.len()).bytes())
                }
                _ => out.extend(b"ERROR\r\n"),
            }
        }
        // `version` (the readiness probe) never counts against the faults' indexes.
        if cmd == "version" {
            st.next -= 1;
        }
        drop(st);
        if f.drop_reply_at == Some(n) && cmd != "version" {
            continue;
        }
        if f.garbage_at == Some(n) && cmd != "version" {
            out = b"HELLO THERE\r\n".to_vec();
        }
        served.fetch_add(1, Ordering::SeqCst);
        if w.write_all(&out).is_err() {
            return;
        }
    }
}

fn opts(addr: &str, workers: u32, count: u64, connections: u32) -> Options {
    Options {
        addr: addr.into(),
        workers,
        count,
        seed: 7,
        connections,
        keys: 24,
        large_bytes: (4000, 9000),
        timeout: Duration::from_millis(500),
        deadline: Duration::from_secs(60),
        ..Options::default()
    }
}

/// Runs `o` on a thread and fails the test if it takes longer than a minute (a hang).
fn load(o: Options) -> LoadReport {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run(&o, Duration::from_secs(10)));
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the load hung").expect("the load ran")
}

#[test]
fn a_clean_server_gives_no_mismatch() {
    let f = fake(4, Faults::default());
    let r = load(opts(&f.addr, 4, 1500, 3));
    eprintln!("{}", render(&r));
    assert_eq!((r.requests, r.failures(), r.mismatches), (1500, 0, 0), "{:?}", r.first_mismatches);
    assert_eq!(r.ok, 1500);
    assert_eq!(f.served.load(Ordering::SeqCst), 1500 + 1, "each request and one `version`");
    assert!(r.large_sets > 0 && r.bytes_received_values > 0);
    assert!(r.latency_us.p50 >= 1 && r.latency_us.max >= r.latency_us.p99);
    assert!(r.outages.is_empty());
}

#[test]
fn a_wrong_value_is_a_mismatch() {
    let f = fake(2, Faults { wrong_value_from: Some(300), ..Faults::default() });
    let r = load(opts(&f.addr, 2, 800, 1));
    assert_eq!(r.mismatches, 1, "{}", render(&r));
    assert!(r.first_mismatches[0].contains("expected"), "{:?}", r.first_mismatches);
    assert_eq!(r.failures(), 1);
}

#[test]
fn a_shard_down_for_a_while_is_the_documented_error_and_comes_back_empty() {
    let f = fake(2, Faults { shard_down: Some((1, 400, 700)), ..Faults::default() });
    let r = load(opts(&f.addr, 2, 1500, 2));
    eprintln!("{}", render(&r));
    assert_eq!(r.failures(), 0, "{:?}", r.first_mismatches);
    let failed = r.errors.get("shard_unavailable").copied().unwrap_or(0);
    assert!(failed > 50, "{:?}", r.errors);
    assert_eq!(r.outages.len(), 1, "{:?}", r.outages);
    assert_eq!((r.outages[0].shard, r.outages[0].failed), (1, failed));
    assert!(r.outages[0].serve_again_ms.is_some());
    // The wrong shard number would have been a mismatch: with 4 workers' placement the
    // same server's errors name shards that hold none of the keys some of the time.
    let f = fake(2, Faults { shard_down: Some((1, 400, 700)), ..Faults::default() });
    let r = load(opts(&f.addr, 4, 1500, 1));
    assert!(r.mismatches > 0);
}

#[test]
fn a_silently_emptied_shard_is_caught() {
    let f = fake(2, Faults { silent_loss: Some((0, 500)), ..Faults::default() });
    let r = load(opts(&f.addr, 2, 1200, 1));
    assert!(r.mismatches > 0, "{}", render(&r));
    assert!(r.first_mismatches.iter().any(|m| m.contains("no failure of the shard seen")));
}

#[test]
fn a_dropped_reply_is_a_timeout_and_the_load_goes_on() {
    let f = fake(2, Faults { drop_reply_at: Some(200), ..Faults::default() });
    let t = Instant::now();
    let r = load(opts(&f.addr, 2, 600, 1));
    assert_eq!(r.errors.get("timeout"), Some(&1), "{}", render(&r));
    assert_eq!((r.mismatches, r.reconnects, r.requests), (0, 1, 600));
    assert!(t.elapsed() < Duration::from_secs(30));
    let f = fake(2, Faults { garbage_at: Some(100), ..Faults::default() });
    let r = load(opts(&f.addr, 2, 300, 1));
    assert_eq!(r.errors.get("protocol"), Some(&1), "{}", render(&r));
    assert_eq!(r.failures(), 1);
}

#[test]
fn a_connection_closed_before_its_first_reply_is_made_again() {
    let f = fake(2, Faults { refuse: vec![1, 3, 4], ..Faults::default() });
    let r = load(opts(&f.addr, 2, 400, 2));
    assert_eq!((r.failures(), r.ok, r.refused), (0, 400, 3), "{}", render(&r));
    // Closed after a reply: a failure, not a refusal.
    let f = fake(2, Faults { drop_reply_at: Some(50), ..Faults::default() });
    let r = load(Options { timeout: Duration::from_millis(300), ..opts(&f.addr, 2, 100, 1) });
    assert_eq!((r.failures(), r.refused), (1, 0));
}

#[test]
fn nothing_listening_is_an_error_not_a_hang() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t = Instant::now();
    let e = run(&opts(&format!("127.0.0.1:{port}"), 1, 10, 1), Duration::from_millis(600));
    assert!(e.unwrap_err().to_string().contains("not ready in time"));
    assert!(t.elapsed() < Duration::from_secs(10));
}
