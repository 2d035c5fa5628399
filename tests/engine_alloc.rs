//! `decide` allocates nothing on the hot path beyond its result: one
//! allocation, the `attempts` vector, for every example policy.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use routeplane::compile::compile;
use routeplane::decide::{decide, NoStats, RequestFeatures};
use routeplane::ir::Endpoint;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decide_allocates_only_its_result() {
    for (name, attrs, feature) in [
        ("startup", serde_json::json!({}), "email-draft"),
        (
            "saas",
            serde_json::json!({"plan": "enterprise", "region": "eu", "data_residency": true}),
            "contract-review",
        ),
        (
            "enterprise",
            serde_json::json!({"team": "engineering"}),
            "code-review",
        ),
    ] {
        let dir = routeplane::load::read_policy(std::path::Path::new(&format!(
            "{}/policies/{name}",
            env!("CARGO_MANIFEST_DIR")
        )))
        .unwrap();
        let p = compile(&dir.sources).unwrap();
        let serde_json::Value::Object(attrs) = attrs else {
            unreachable!()
        };
        let t = p.tenant("t", &attrs).unwrap();
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": "write a function to parse dates: def parse(s)"}],
            "metadata": {"feature": feature},
        });
        let r = RequestFeatures::from_openai_json(Endpoint::Chat, &body);
        // Warm up: the regex engine fills its per-thread cache on first use.
        let _ = decide(&p, &t, &r, &NoStats);
        let before = ALLOCS.load(Ordering::Relaxed);
        let d = decide(&p, &t, &r, &NoStats);
        let used = ALLOCS.load(Ordering::Relaxed) - before;
        assert!(d.outcome.is_ok(), "{name}: {d:?}");
        assert_eq!(used, 1, "{name}: decide allocated {used} times");
    }
}
