//! The shared test suite: every backend must pass the same cases.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

pub fn counter(key: &str) -> Counter {
    Counter {
        key: key.to_string(),
        period_start: 1_000,
    }
}

fn charge(key: &str, limit: Micros) -> Charge {
    Charge {
        counter: counter(key),
        limit,
    }
}

fn entry(id: &str, actual: Micros) -> LedgerEntry {
    LedgerEntry {
        id: id.to_string(),
        ts_ms: 5_000,
        tenant: "acme".into(),
        feature: Some("chat".into()),
        model: "m".into(),
        input_tokens: 10,
        output_tokens: 20,
        estimated: 100,
        actual,
    }
}

fn bal(s: &dyn BudgetStore, key: &str, now: i64) -> (Micros, Micros) {
    let b = s.balance(&counter(key), now).unwrap();
    (b.spent, b.reserved)
}

/// Reserve, settle, release, refusal, all-or-nothing, expiry, replay.
pub fn semantics(s: &dyn BudgetStore) {
    let now = 10_000;
    let t = "t:semantics";
    let f = "f:semantics";
    let both = [charge(t, 1_000), charge(f, 300)];

    // Reserve against both counters.
    let r1 = s.reserve("r1", &both, 200, now, 60_000).unwrap();
    assert_eq!(bal(s, t, now), (0, 200));
    assert_eq!(bal(s, f, now), (0, 200));

    // All or nothing: the feature counter refuses, the tenant one is untouched.
    match s.reserve("r2", &both, 150, now, 60_000) {
        Err(StateError::Refused(r)) => {
            assert_eq!(r.counter, counter(f));
            assert_eq!(r.limit, 300);
            assert_eq!(
                r.balance,
                Balance {
                    spent: 0,
                    reserved: 200
                }
            );
            assert_eq!(r.amount, 150);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(bal(s, t, now), (0, 200));

    // Exactly up to the limit is allowed.
    let r3 = s.reserve("r3", &both, 100, now, 60_000).unwrap();
    assert_eq!(bal(s, f, now), (0, 300));
    // Two reservations, each on two counters, count once each.
    assert_eq!(s.open_reservations(now).unwrap(), 2);

    // Settle at the actual cost: spent moves, the reservation goes.
    assert!(s.settle(&r1, &entry("r1", 120)).unwrap());
    assert_eq!(bal(s, t, now), (120, 100));
    assert_eq!(bal(s, f, now), (120, 100));

    // A replayed settle counts nothing.
    assert!(!s.settle(&r1, &entry("r1", 120)).unwrap());
    assert_eq!(bal(s, t, now), (120, 100));

    assert_eq!(s.open_reservations(now).unwrap(), 1);

    // Release frees without spending.
    s.release(&r3).unwrap();
    assert_eq!(bal(s, t, now), (120, 0));
    assert_eq!(s.open_reservations(now).unwrap(), 0);
    s.release(&r3).unwrap();
    assert_eq!(bal(s, t, now), (120, 0));

    // Expiry: a reservation past its expiry no longer counts.
    let _r4 = s.reserve("r4", &both, 180, now, 1_000).unwrap();
    assert_eq!(bal(s, f, now), (120, 180));
    assert_eq!(s.open_reservations(now).unwrap(), 1);
    assert_eq!(s.open_reservations(now + 1_000).unwrap(), 0);
    assert!(s.reserve("r5", &both, 1, now, 1_000).is_err());
    assert_eq!(bal(s, f, now + 1_000), (120, 0));
    let r5 = s.reserve("r5", &both, 180, now + 1_000, 1_000).unwrap();
    // Settling after expiry still counts the money actually spent, once.
    assert!(s.settle(&r5, &entry("r5", 10)).unwrap());
    assert_eq!(bal(s, f, now + 5_000), (130, 0));

    // Another period is another counter.
    let next = Counter {
        key: t.to_string(),
        period_start: 2_000,
    };
    assert_eq!(s.balance(&next, now).unwrap(), Balance::default());

    // The ledger has each settled attempt once.
    let ids: Vec<String> = s
        .ledger(None)
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .filter(|id| id.starts_with('r'))
        .collect();
    assert_eq!(ids, ["r1", "r5"]);

    // Ledger-only entries, in a batch; a known id is skipped.
    s.record(&[entry("r1", 999), entry("x1", 3), entry("x2", 4)])
        .unwrap();
    let all = s.ledger(None).unwrap();
    assert_eq!(all.iter().filter(|e| e.id == "r1").count(), 1);
    assert_eq!(all.iter().find(|e| e.id == "r1").unwrap().actual, 120);
    assert!(all.iter().any(|e| e.id == "x2"));
    assert_eq!(bal(s, t, now + 5_000), (130, 0));
    assert_eq!(s.ledger(Some(5_001)).unwrap().len(), 0);

    // Retention: entries from before a time go, oldest first, a batch at a
    // time; what was spent stays counted.
    let at = |id: &str, ts_ms: i64| LedgerEntry {
        ts_ms,
        ..entry(id, 1)
    };
    s.record(&[at("old3", 3_000), at("old1", 1_000), at("old2", 2_000)])
        .unwrap();
    assert_eq!(s.trim_ledger(2_500, 1).unwrap(), 1);
    let ids = |s: &dyn BudgetStore| -> Vec<String> {
        s.ledger(None).unwrap().into_iter().map(|e| e.id).collect()
    };
    assert_eq!(ids(s), ["old2", "old3", "r1", "r5", "x1", "x2"]);
    assert_eq!(s.trim_ledger(2_500, 10).unwrap(), 1);
    assert_eq!(s.trim_ledger(2_500, 10).unwrap(), 0);
    assert_eq!(ids(s), ["old3", "r1", "r5", "x1", "x2"]);
    assert_eq!(s.trim_ledger(5_001, 100).unwrap(), 5);
    assert!(ids(s).is_empty());
    assert_eq!(bal(s, t, now + 5_000), (130, 0));
    assert_eq!(bal(s, f, now + 5_000), (130, 0));
}

/// Many threads reserve at a nearly spent budget; at no time do spent and
/// reservations together pass the limit. `stores` may hold several handles
/// to the same backing state (two "gateways").
pub fn concurrent(stores: Vec<Arc<dyn BudgetStore>>) {
    let key = "t:concurrent";
    let limit: Micros = 10_000;
    let now = 10_000;
    let first = stores.first().unwrap().clone();
    // Nearly spent: 9,000 of 10,000.
    let r = first
        .reserve("pre", &[charge(key, limit)], 9_000, now, 60_000)
        .unwrap();
    first.settle(&r, &entry("pre", 9_000)).unwrap();

    let granted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let spent_total = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let s = stores[t % stores.len()].clone();
            let granted = granted.clone();
            let refused = refused.clone();
            let spent_total = spent_total.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let id = format!("c{t}-{i}");
                    match s.reserve(&id, &[charge(key, limit)], 97, now, 60_000) {
                        Ok(r) => {
                            granted.fetch_add(1, Ordering::Relaxed);
                            let b = s.balance(&counter(key), now).unwrap();
                            assert!(b.spent + b.reserved <= limit, "over the limit: {b:?}");
                            if i % 3 == 0 {
                                s.release(&r).unwrap();
                            } else {
                                // Actual cost below the estimate, as an output cap makes it.
                                assert!(s.settle(&r, &entry(&id, 50)).unwrap());
                                spent_total.fetch_add(50, Ordering::Relaxed);
                            }
                        }
                        Err(StateError::Refused(r)) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            assert!(r.balance.spent + r.balance.reserved + 97 > limit);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let b = first.balance(&counter(key), now).unwrap();
    assert_eq!(b.reserved, 0);
    assert_eq!(b.spent, 9_000 + spent_total.load(Ordering::Relaxed));
    assert!(b.spent <= limit, "{b:?}");
    assert!(granted.load(Ordering::Relaxed) > 0);
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the budget never ran out"
    );
}

#[cfg(test)]
pub mod redis_server {
    //! A throwaway `redis-server` on 127.0.0.1, a free port and a temp dir.

    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct RedisServer {
        child: Child,
        pub url: String,
        _dir: tempfile::TempDir,
    }

    impl RedisServer {
        pub fn start() -> RedisServer {
            let bin = [
                "redis-server",
                "/usr/bin/redis-server",
                "/usr/sbin/redis-server",
            ]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok()
            })
            .unwrap_or_else(|| {
                panic!("redis-server is not installed: run scripts/install-test-deps.sh")
            });
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new(bin)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let url = format!("redis://127.0.0.1:{port}/0");
            let t0 = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            RedisServer {
                child,
                url,
                _dir: dir,
            }
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

mod backends {
    use super::redis_server::RedisServer;
    use super::*;

    #[test]
    fn memory_semantics() {
        semantics(&memory::MemoryStore::default());
    }

    #[test]
    fn memory_concurrent() {
        concurrent(vec![Arc::new(memory::MemoryStore::default())]);
    }

    #[test]
    fn sqlite_semantics() {
        let dir = tempfile::tempdir().unwrap();
        semantics(&sqlite::SqliteStore::open(&dir.path().join("s.db")).unwrap());
    }

    #[test]
    fn sqlite_concurrent_across_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/c.db");
        // Two handles on one file: what two gateway processes would do.
        let a: Arc<dyn BudgetStore> = Arc::new(sqlite::SqliteStore::open(&path).unwrap());
        let b: Arc<dyn BudgetStore> = Arc::new(sqlite::SqliteStore::open(&path).unwrap());
        concurrent(vec![a, b]);
    }

    #[test]
    fn sqlite_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        {
            let s = sqlite::SqliteStore::open(&path).unwrap();
            let r = s.reserve("a", &[charge("k", 100)], 60, 10, 1_000).unwrap();
            s.settle(&r, &entry("a", 60)).unwrap();
        }
        let s = sqlite::SqliteStore::open(&path).unwrap();
        assert_eq!(bal(&s, "k", 10), (60, 0));
        assert!(s.reserve("b", &[charge("k", 100)], 41, 10, 1_000).is_err());
    }

    #[test]
    fn redis_semantics() {
        let server = RedisServer::start();
        semantics(&redis::RedisStore::open(&server.url).unwrap());
    }

    #[test]
    fn redis_concurrent_across_clients() {
        let server = RedisServer::start();
        let a: Arc<dyn BudgetStore> = Arc::new(redis::RedisStore::open(&server.url).unwrap());
        let b: Arc<dyn BudgetStore> = Arc::new(redis::RedisStore::open(&server.url).unwrap());
        concurrent(vec![a, b]);
    }

    #[test]
    fn redis_ledger_spool_is_local_and_replays_into_redis() {
        let server = RedisServer::start();
        let store: Arc<dyn BudgetStore> = Arc::new(redis::RedisStore::open(&server.url).unwrap());
        let dir = store.spool_dir().unwrap();
        assert_eq!(dir, redis::spool_dir_for(&server.url));
        assert!(dir.starts_with("/dev/shm") || dir.starts_with(std::env::temp_dir()));
        assert!(!dir.to_string_lossy().contains("127.0.0.1"), "{dir:?}");
        let none = crate::budget::Check::default();
        {
            // A gateway that settles two requests without a budget, then
            // dies before its writer commits them.
            let (spool, _) = spool::Spool::open(&dir, &*store).unwrap();
            spool.append(entry("s1", 3)).unwrap();
            spool.append(entry("s2", 4)).unwrap();
            assert!(store.ledger(None).unwrap().is_empty());
        }
        // The next gateway on this host and URL replays them before serving.
        let budgets = crate::budget::Budgets::new(store.clone());
        let ids: Vec<String> = store
            .ledger(None)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["s1", "s2"]);
        // Its own entries go through the spool into Redis.
        let r = budgets.reserve(&none, "s3/0", 10, 1_000).unwrap().unwrap();
        let mut e = entry(&r.id, 5);
        e.ts_ms = 6_000;
        assert!(budgets.settle(&r, e).unwrap());
        budgets.flush().unwrap();
        assert_eq!(store.ledger(None).unwrap().len(), 3);
        drop(budgets);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn redis_rate_windows_are_shared() {
        let server = RedisServer::start();
        let a = redis::RedisStore::open(&server.url).unwrap();
        let b = redis::RedisStore::open(&server.url).unwrap();
        let now = 1_000_000;
        for s in [&a, &b, &a] {
            assert_eq!(s.charge_rate("tenant:x", 1, 3, 60_000, now), Some(Ok(())));
        }
        assert!(matches!(
            b.charge_rate("tenant:x", 1, 3, 60_000, now),
            Some(Err(w)) if w > 0 && w <= 60_000
        ));
        // The next window starts empty.
        assert_eq!(
            a.charge_rate("tenant:x", 1, 3, 60_000, now + 60_000),
            Some(Ok(()))
        );
    }

    #[test]
    fn unreachable_redis_is_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = redis::RedisStore::open(&format!("redis://127.0.0.1:{port}/0"))
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("state backend: redis"), "{e}");
    }
}
