//! Budgets at the edge: which of the policy's budgets apply to a request,
//! where they stand, which threshold action that means, and the
//! reserve/settle/release cycle of each attempt against a [`BudgetStore`].
//!
//! The flow the gateway follows per request:
//! 1. [`Budgets::check`]: the applicable budgets (tenant, feature,
//!    tenant×feature) and their balances; the strongest threshold reached
//!    on spent + reserved becomes [`Stats::budget_action`] for `decide`
//!    (through [`BudgetStats`]), so downgrade and confirm-premium happen in
//!    the engine, and the warn message goes into a response header.
//! 2. Per attempt (first try, retry, fallback, downgrade), for the model
//!    actually used: estimate its cost with its tokenizer and
//!    [`Budgets::reserve`] against every applicable budget, all or nothing.
//!    A refusal skips the attempt (a cheaper model may still fit); when every
//!    attempt is refused the request is blocked with [`Refused::message`].
//! 3. After the answer, [`Budgets::settle`] at the provider's usage; on
//!    failure [`Budgets::release`].
//!
//! Budget keys are `<period>|<scope>|<value>` (`monthly|tenant|acme`), so a
//! policy edit that changes the amount keeps the money already spent.
//! Budgets on `feature` apply only to requests that carry a feature. A
//! `tenant.<attr>` amount the tenant does not set means no budget.

use std::sync::{Arc, Mutex};

use crate::compile::TenantView;
use crate::decide::{ModelStats, Stats};
use crate::estimate::{self, Tokenizer};
use crate::ir::{
    BudgetAction, BudgetAmount, BudgetPeriod, BudgetScope, Endpoint, Micros, Model, ModelId,
    Policy, Threshold, Value,
};
use crate::state::spool::{NotAppended, Spool};
use crate::state::{
    period, Balance, BudgetStore, Charge, Counter, LedgerEntry, Reservation, StateError,
};

/// How long a reservation lives if its gateway dies before settling it.
pub const DEFAULT_RESERVATION_TTL_MS: i64 = 15 * 60 * 1000;

/// One budget that applies to a request.
#[derive(Clone, Debug)]
pub struct Applicable {
    pub charge: Charge,
    /// Exclusive end of the current period (Unix ms): when it resets.
    pub resets_ms: i64,
    /// `the monthly budget of tenant `acme``.
    pub label: String,
    pub thresholds: Vec<(BudgetAction, f64)>,
}

/// Where the applicable budgets stand before a request.
#[derive(Clone, Debug, Default)]
pub struct Check {
    pub budgets: Vec<(Applicable, Balance)>,
    /// The strongest threshold action reached, if any.
    pub action: Option<BudgetAction>,
    /// A `confirm premium` threshold is reached (the action may be stronger).
    pub confirm_premium: bool,
    /// Says which budget reached it and where it stands.
    pub message: Option<String>,
}

impl Check {
    /// The thresholds the balances reach.
    fn of(budgets: Vec<(Applicable, Balance)>) -> Check {
        let (action, message) = evaluate(&budgets);
        let confirm_premium = premium_guarded(&budgets);
        Check {
            budgets,
            action,
            message,
            confirm_premium,
        }
    }
}

/// `$1.50`, `$0.000123`: dollars with as many decimals as the micros need (at least 2).
pub fn dollars(m: Micros) -> String {
    let frac = format!("{:06}", m % 1_000_000);
    let trimmed = frac.trim_end_matches('0');
    let frac = if trimmed.len() < 2 {
        format!("{trimmed:0<2}")
    } else {
        trimmed.to_string()
    };
    format!("${}.{frac}", m / 1_000_000)
}

fn period_name(p: BudgetPeriod) -> String {
    match p {
        BudgetPeriod::Daily => "daily".into(),
        BudgetPeriod::Weekly => "weekly".into(),
        BudgetPeriod::Monthly => "monthly".into(),
        BudgetPeriod::Every(ms) => {
            let d = 86_400_000;
            if ms % d == 0 {
                format!("every {}d", ms / d)
            } else {
                format!("every {ms}ms")
            }
        }
    }
}

/// Dollars from a tenant attribute to micros, rounded to the nearest micro.
fn attr_micros(v: Option<&Value>) -> Option<Micros> {
    match v {
        Some(Value::Number(d)) if d.is_finite() => {
            let m = (d.max(0.0) * 1_000_000.0).round();
            // Saturating float-to-int conversion is what `as` does.
            Some(m as u64)
        }
        _ => None,
    }
}

/// The budgets of `p` that apply to this tenant and feature at `now_ms`.
pub fn applicable(
    p: &Policy,
    tenant: &TenantView,
    feature: Option<&str>,
    now_ms: i64,
) -> Vec<Applicable> {
    let mut out = Vec::new();
    for b in &p.protect.budgets {
        let (scope, value, who) = match (b.scope, feature) {
            (BudgetScope::Tenant, _) => (
                "tenant",
                tenant.id.clone(),
                format!("tenant `{}`", tenant.id),
            ),
            (BudgetScope::Feature, Some(f)) => ("feature", f.to_string(), format!("feature `{f}`")),
            (BudgetScope::TenantFeature, Some(f)) => (
                "tenant-feature",
                format!("{}/{f}", tenant.id),
                format!("tenant `{}` for feature `{f}`", tenant.id),
            ),
            _ => continue,
        };
        let limit = match &b.amount {
            BudgetAmount::Fixed(m) => *m,
            BudgetAmount::TenantAttr(a) => match attr_micros(tenant.attr(*a)) {
                Some(m) => m,
                None => continue,
            },
        };
        let name = period_name(b.period);
        let (start, end) = period::bounds(b.period, now_ms);
        out.push(Applicable {
            charge: Charge {
                counter: Counter {
                    key: format!("{name}|{scope}|{value}"),
                    period_start: start,
                },
                limit,
            },
            resets_ms: end,
            label: format!("the {name} budget of {who}"),
            thresholds: b
                .thresholds
                .iter()
                .map(|t: &Threshold| (t.action, t.percent))
                .collect(),
        });
    }
    out
}

/// Percent of the limit used (spent + reserved); an empty budget is 100% used.
pub fn used_percent(limit: Micros, b: Balance) -> f64 {
    let used = b.spent.saturating_add(b.reserved);
    if limit == 0 {
        return if used == 0 { 100.0 } else { f64::INFINITY };
    }
    used as f64 * 100.0 / limit as f64
}

/// `the monthly budget of tenant `x` ($20.00): $18.00 spent, $0.50 reserved; it resets at ...`
pub fn describe(a: &Applicable, b: Balance) -> String {
    format!(
        "{} ({}): {} spent, {} reserved ({:.0}%); it resets at {}",
        a.label,
        dollars(a.charge.limit),
        dollars(b.spent),
        dollars(b.reserved),
        used_percent(a.charge.limit, b).min(999.0),
        period::format_utc(a.resets_ms)
    )
}

/// The strongest threshold action reached by any budget, with the message of that budget.
pub fn evaluate(budgets: &[(Applicable, Balance)]) -> (Option<BudgetAction>, Option<String>) {
    let mut best: Option<(BudgetAction, String)> = None;
    for (a, b) in budgets {
        let pct = used_percent(a.charge.limit, *b);
        let reached = a
            .thresholds
            .iter()
            .filter(|(_, at)| pct >= *at)
            .map(|(act, _)| *act)
            .max();
        if let Some(act) = reached {
            if best.as_ref().is_none_or(|(x, _)| act > *x) {
                best = Some((act, describe(a, *b)));
            }
        }
    }
    match best {
        Some((a, m)) => (Some(a), Some(m)),
        None => (None, None),
    }
}

/// Whether some budget has reached a `confirm premium` threshold, whatever
/// stronger action another threshold adds.
pub fn premium_guarded(budgets: &[(Applicable, Balance)]) -> bool {
    budgets.iter().any(|(a, b)| {
        let pct = used_percent(a.charge.limit, *b);
        a.thresholds
            .iter()
            .any(|(act, at)| *act == BudgetAction::ConfirmPremium && pct >= *at)
    })
}

/// A reservation no budget could take.
#[derive(Clone, Debug)]
pub struct Refused {
    pub message: String,
    pub resets_ms: i64,
    /// The store could not be asked: nobody can tell what is left, and no
    /// other model would fare better.
    pub store_unavailable: bool,
}

/// `decide`'s live stats plus the budget action.
pub struct BudgetStats<'a> {
    pub inner: &'a dyn Stats,
    pub action: Option<BudgetAction>,
    pub confirm_premium: bool,
}

impl Stats for BudgetStats<'_> {
    fn model(&self, m: ModelId) -> ModelStats {
        self.inner.model(m)
    }
    fn budget_action(&self) -> Option<BudgetAction> {
        self.action
    }
    fn premium_needs_confirmation(&self) -> bool {
        self.confirm_premium
    }
}

/// The budget side of the gateway: a store and the reservation lifetime.
pub struct Budgets {
    pub store: Arc<dyn BudgetStore>,
    pub ttl_ms: i64,
    /// Random per gateway instance and prefixed to every reservation id:
    /// decision ids alone repeat across processes started in the same
    /// second, and two replicas must never settle each other's entries.
    /// Kept as the prefix it is written as (`<16 hex digits>/`), made once:
    /// a `format!` per reservation cost more than the rest of it.
    instance: String,
    /// Ledger entries of requests no budget applies to are appended here
    /// (one `write()`, no store transaction on the request path) and moved
    /// into the store by a background writer; see [`crate::state::spool`].
    /// `None`: the store has no spool, or it could not be opened, and such
    /// entries are recorded at once.
    spool: Option<Arc<Spool>>,
    writer: Option<Writer>,
}

/// The background thread that moves spooled entries into the store.
struct Writer {
    /// Wakes the writer; dropping it makes the writer commit once more and stop.
    wake: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// How often the writer retries a commit that failed, with nothing new to wake it.
const WRITER_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// The least time between two commits of the spool. Entries are durable once
/// appended, so waiting costs nothing but lets a busy gateway move hundreds
/// of entries per store transaction (and rotate the spool file once) instead
/// of a few. Not longer: the writer's burst of work competes with the worker
/// threads for the cores, and at 200 ms it set a 2.5 ms p99 at one
/// connection (0.85 ms at 20 ms; docs/performance.md).
const WRITER_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

impl Budgets {
    /// Budgets on `store`. When the store has a spool directory, whatever a
    /// previous process left in it is replayed into the store first, then
    /// the background writer starts.
    pub fn new(store: Arc<dyn BudgetStore>) -> Budgets {
        let (spool, writer) = match store.spool_dir() {
            Some(dir) => match Spool::open(&dir, &*store) {
                Ok((spool, replayed)) => {
                    if replayed.entries > 0 {
                        tracing::info!(
                            "replayed {} ledger entries left in `{}` (those already recorded are skipped)",
                            replayed.entries,
                            dir.display()
                        );
                    }
                    let spool = Arc::new(spool);
                    let writer = start_writer(spool.clone(), store.clone());
                    if writer.is_some() {
                        (Some(spool), writer)
                    } else {
                        (None, None)
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "no ledger spool, entries without a budget are recorded synchronously: {e}"
                    );
                    (None, None)
                }
            },
            None => (None, None),
        };
        Budgets {
            store,
            ttl_ms: DEFAULT_RESERVATION_TTL_MS,
            instance: format!("{:016x}/", rand::random::<u64>()),
            spool,
            writer,
        }
    }

    /// The applicable budgets, their balances and the threshold action.
    pub fn check(
        &self,
        p: &Policy,
        tenant: &TenantView,
        feature: Option<&str>,
        now_ms: i64,
    ) -> Result<Check, StateError> {
        let budgets = balances(&*self.store, applicable(p, tenant, feature, now_ms), now_ms)?;
        Ok(Check::of(budgets))
    }

    /// [`Budgets::check`] with the store read off the event loop (see
    /// [`off_loop`]); a request no budget applies to reads nothing.
    pub async fn check_off_loop(
        &self,
        p: &Policy,
        tenant: &TenantView,
        feature: Option<&str>,
        now_ms: i64,
    ) -> Result<Check, StateError> {
        let applicable = applicable(p, tenant, feature, now_ms);
        if applicable.is_empty() {
            return Ok(Check::of(Vec::new()));
        }
        let store = Arc::clone(&self.store);
        let budgets = off_loop(move || balances(&*store, applicable, now_ms)).await?;
        Ok(Check::of(budgets))
    }

    /// Reserve `amount` for one attempt against every budget of `check`.
    /// `Ok(Err(refused))` when a budget cannot take it.
    pub fn reserve(
        &self,
        check: &Check,
        id: &str,
        amount: Micros,
        now_ms: i64,
    ) -> Result<Result<Reservation, Refused>, StateError> {
        let (id, charges) = match self.to_reserve(check, id, amount, now_ms) {
            Ok(free) => return Ok(Ok(free)),
            Err(held) => held,
        };
        let reserved = self
            .store
            .reserve(&id, &charges, amount, now_ms, self.ttl_ms);
        answer(check, amount, reserved)
    }

    /// [`Budgets::reserve`] with the store call off the event loop.
    pub async fn reserve_off_loop(
        &self,
        check: &Check,
        id: &str,
        amount: Micros,
        now_ms: i64,
    ) -> Result<Result<Reservation, Refused>, StateError> {
        let (id, charges) = match self.to_reserve(check, id, amount, now_ms) {
            Ok(free) => return Ok(Ok(free)),
            Err(held) => held,
        };
        let store = Arc::clone(&self.store);
        let ttl_ms = self.ttl_ms;
        // The reservation is claimed by whoever awaits it; one whose waiter
        // went away meanwhile (hyper drops a request's future when its
        // client leaves) is released instead of held until it expires.
        let reserved = off_loop(move || {
            let r = store.reserve(&id, &charges, amount, now_ms, ttl_ms);
            Ok(r.map(|r| Unclaimed {
                store,
                reservation: Some(r),
            }))
        })
        .await?;
        answer(check, amount, reserved.map(Unclaimed::claim))
    }

    /// The reservation's id and charges; `Ok` when no budget applies: a
    /// reservation of nothing, made without the store.
    fn to_reserve(
        &self,
        check: &Check,
        id: &str,
        amount: Micros,
        now_ms: i64,
    ) -> Result<Reservation, (String, Vec<Charge>)> {
        let charges: Vec<Charge> = check
            .budgets
            .iter()
            .map(|(a, _)| a.charge.clone())
            .collect();
        let id = [self.instance.as_str(), id].concat();
        if charges.is_empty() {
            // Nothing to hold against: only the ledger entry will be written.
            return Ok(Reservation {
                id,
                counters: Vec::new(),
                amount,
                expires_ms: now_ms.saturating_add(self.ttl_ms),
            });
        }
        Err((id, charges))
    }

    /// Spend the actual cost and record the attempt in the ledger. An
    /// attempt no budget applies to is appended to the spool: durable
    /// against the process dying when this returns, in the store shortly after.
    pub fn settle(&self, r: &Reservation, entry: LedgerEntry) -> Result<bool, StateError> {
        match self.spooled(r, entry) {
            None => Ok(true),
            Some(entry) => self.store.settle(r, &entry),
        }
    }

    /// Append the entry of an attempt no budget applies to to the spool;
    /// `Some` hands it back for the store (a budget applies, there is no
    /// spool, or the append failed).
    fn spooled(&self, r: &Reservation, entry: LedgerEntry) -> Option<LedgerEntry> {
        match (r.counters.is_empty(), &self.spool, &self.writer) {
            (true, Some(spool), Some(w)) => match spool.append(entry) {
                Ok(()) => {
                    // Full means a wake-up is already pending.
                    let _ = w.wake.try_send(());
                    None
                }
                Err(not) => {
                    let NotAppended { entry, error } = *not;
                    tracing::warn!("cannot append to the ledger spool, recording at once: {error}");
                    Some(entry)
                }
            },
            _ => Some(entry),
        }
    }

    /// Move everything spooled so far into the store now (tests, shutdown).
    pub fn flush(&self) -> Result<usize, StateError> {
        match &self.spool {
            Some(s) => s.commit(&*self.store),
            None => Ok(0),
        }
    }

    pub fn release(&self, r: &Reservation) -> Result<(), StateError> {
        if r.counters.is_empty() {
            return Ok(());
        }
        self.store.release(r)
    }

    /// [`Budgets::release`] off the event loop, not waited for: a failed
    /// release holds the money only until the reservation expires.
    /// The handle, while the release runs, says when it is done.
    pub fn release_detached(
        &self,
        r: Reservation,
        tenant: String,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if r.counters.is_empty() {
            return None;
        }
        let store = Arc::clone(&self.store);
        detached(move || {
            if let Err(e) = store.release(&r) {
                tracing::warn!(tenant = %tenant, "cannot release a budget reservation: {e}");
            }
        })
    }
}

/// A reservation the store made off the event loop, until its waiter takes
/// it: dropped unclaimed, it is released.
struct Unclaimed {
    store: Arc<dyn BudgetStore>,
    reservation: Option<Reservation>,
}

impl Unclaimed {
    fn claim(mut self) -> Reservation {
        self.reservation.take().unwrap_or_else(|| Reservation {
            id: String::new(),
            counters: Vec::new(),
            amount: 0,
            expires_ms: 0,
        })
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let store = Arc::clone(&self.store);
            drop(detached(move || {
                if let Err(e) = store.release(&r) {
                    tracing::warn!("cannot release an unclaimed budget reservation: {e}");
                }
            }));
        }
    }
}

/// A stream's settle, run once: by the store call it is handed to, or, when
/// that never happens (the call dropped unpolled: a body dropped outside a
/// runtime, or by a runtime shutting down, which drops the tasks it is
/// handed and the blocking calls it has not started), by its own drop, here
/// and now. Spend that reached a client is never lost.
struct Settle {
    store: Arc<dyn BudgetStore>,
    job: Option<(Reservation, LedgerEntry)>,
    tenant: String,
}

impl Settle {
    fn run(&mut self) {
        if let Some((r, entry)) = self.job.take() {
            if let Err(e) = self.store.settle(&r, &entry) {
                tracing::error!(tenant = %self.tenant, "cannot record spend {}: {e}", dollars(entry.actual));
            }
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.run();
    }
}

/// The balance of every applicable budget.
fn balances(
    store: &dyn BudgetStore,
    applicable: Vec<Applicable>,
    now_ms: i64,
) -> Result<Vec<(Applicable, Balance)>, StateError> {
    applicable
        .into_iter()
        .map(|a| {
            let b = store.balance(&a.charge.counter, now_ms)?;
            Ok((a, b))
        })
        .collect()
}

/// A store call under way, off the event loop.
pub type StoreCall = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Run store calls where their waiting stalls no one: a store may wait (for
/// a SQLite lock another process holds, up to its busy timeout; for a Redis
/// round trip), and a worker's event loop serves every connection it
/// accepted, `/healthz` included. Outside a runtime (tests, the CLI) it
/// runs here.
pub async fn off_loop<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt.spawn_blocking(f).await.unwrap_or_else(|e| {
            Err(StateError::Backend(format!(
                "a budget store call failed: {e}"
            )))
        }),
        Err(_) => f(),
    }
}

/// [`off_loop`] for what nobody waits for (a release: the reservation
/// expires by itself if it fails).
/// The handle says when it is done, for whoever must come after it.
fn detached(f: impl FnOnce() + Send + 'static) -> Option<tokio::task::JoinHandle<()>> {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => Some(rt.spawn_blocking(f)),
        Err(_) => {
            f();
            None
        }
    }
}

/// A store's answer to a reservation, a refusal turned into the client's
/// message: which budget, where it stands, what the request needed, when it
/// resets.
fn answer(
    check: &Check,
    amount: Micros,
    reserved: Result<Reservation, StateError>,
) -> Result<Result<Reservation, Refused>, StateError> {
    match reserved {
        Ok(r) => Ok(Ok(r)),
        Err(StateError::Refused(r)) => {
            let a = check
                .budgets
                .iter()
                .find(|(a, _)| a.charge.counter == r.counter)
                .map(|(a, _)| a);
            let message = match a {
                Some(a) => format!(
                    "{} is exhausted: the budget is {}, {} is spent and {} reserved, and this request needs up to {}; it resets at {}",
                    a.label,
                    dollars(a.charge.limit),
                    dollars(r.balance.spent),
                    dollars(r.balance.reserved),
                    dollars(amount),
                    period::format_utc(a.resets_ms)
                ),
                None => format!("the budget `{}` is exhausted", r.counter.key),
            };
            Ok(Err(Refused {
                message,
                resets_ms: a.map_or(0, |a| a.resets_ms),
                store_unavailable: false,
            }))
        }
        Err(e) => Err(e),
    }
}

fn start_writer(spool: Arc<Spool>, store: Arc<dyn BudgetStore>) -> Option<Writer> {
    let (wake, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name("budget-ledger".into())
        .spawn(move || {
            let mut failing = false;
            let mut last = std::time::Instant::now();
            loop {
                let stop = match rx.recv_timeout(WRITER_RETRY) {
                    Ok(()) => false,
                    // Nothing new: retry a commit that failed, else wait on.
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !failing => continue,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
                };
                if !stop {
                    // Let more entries gather (wake-ups meanwhile are coalesced
                    // by the channel of one); a stop commits at once.
                    std::thread::sleep(WRITER_INTERVAL.saturating_sub(last.elapsed()));
                }
                last = std::time::Instant::now();
                match spool.commit(&*store) {
                    Ok(_) => failing = false,
                    Err(e) => {
                        if !failing {
                            tracing::error!("cannot move spooled ledger entries into the store (kept in the spool, retrying): {e}");
                        }
                        failing = true;
                    }
                }
                if stop {
                    return;
                }
            }
        });
    match thread {
        Ok(thread) => Some(Writer { wake, thread }),
        Err(e) => {
            tracing::warn!("cannot start the ledger writer: {e}");
            None
        }
    }
}

/// How often the ledger is trimmed to `state.ledger_retention` (and once at start).
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Entries deleted per store call while trimming: each call is short, so
/// reservations on the same store wait for no long transaction.
const TRIM_BATCH: usize = 1000;
/// The pause between two batches, for the same reason.
const TRIM_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// The thread that trims the ledger; dropping it stops the thread (after
/// the batch under way) and waits for it.
pub struct LedgerTrimmer {
    stop: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LedgerTrimmer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Budgets {
    /// Delete ledger entries older than `keep`, now and then every
    /// [`TRIM_EVERY`], on a thread of its own; `None` when the thread
    /// cannot start (logged). Counters are not touched.
    pub fn trim_ledger_every(&self, keep: std::time::Duration) -> Option<LedgerTrimmer> {
        let store = Arc::clone(&self.store);
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let (stop, stopped) = std::sync::mpsc::sync_channel::<()>(0);
        let thread = std::thread::Builder::new()
            .name("ledger-retention".into())
            .spawn(move || {
                let mut failing = false;
                // `Timeout` means go on; a dropped sender means stop.
                let go_on = |pause| {
                    matches!(
                        stopped.recv_timeout(pause),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    )
                };
                loop {
                    let before = crate::state::now_ms().saturating_sub(keep_ms);
                    let mut gone = 0;
                    let outcome = loop {
                        match store.trim_ledger(before, TRIM_BATCH) {
                            Ok(n) => {
                                gone += n;
                                if n < TRIM_BATCH || !go_on(TRIM_PAUSE) {
                                    break Ok(());
                                }
                            }
                            Err(e) => break Err(e),
                        }
                    };
                    match outcome {
                        Ok(()) => {
                            if gone > 0 {
                                tracing::info!(
                                    "removed {gone} ledger {} from before {} (state.ledger_retention)",
                                    if gone == 1 { "entry" } else { "entries" },
                                    crate::reload::rfc3339(
                                        std::time::UNIX_EPOCH
                                            + std::time::Duration::from_millis(
                                                u64::try_from(before).unwrap_or(0)
                                            )
                                    )
                                );
                            }
                            failing = false;
                        }
                        Err(e) => {
                            if !failing {
                                tracing::error!(
                                    "cannot trim the ledger (retrying every hour): {e}"
                                );
                            }
                            failing = true;
                        }
                    }
                    if !go_on(TRIM_EVERY) {
                        return;
                    }
                }
            });
        match thread {
            Ok(thread) => Some(LedgerTrimmer {
                stop: Some(stop),
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::error!("cannot start the ledger retention thread: {e}");
                None
            }
        }
    }
}

impl Drop for Budgets {
    fn drop(&mut self) {
        // The writer commits what is left and stops; what it cannot commit
        // stays in the spool for the next start.
        if let Some(w) = self.writer.take() {
            drop(w.wake);
            let _ = w.thread.join();
        }
        // Nothing appends any more: a clean stop leaves no spool behind.
        if let Some(spool) = self.spool.take().and_then(Arc::into_inner) {
            if let Err(e) = spool.retire(&*self.store) {
                tracing::warn!("ledger spool kept for the next start: {e}");
            }
        }
    }
}

/// One attempt's reservation, until settled or released.
struct Hold {
    reservation: Reservation,
    model: String,
    input_tokens: u64,
}

/// The budget side of one request: the check made before `decide`, the
/// input-token counts per tokenizer, and the current attempt's reservation.
/// Dropping it releases a reservation nobody settled, so every failure path
/// frees the money.
pub struct RequestBudget {
    budgets: Arc<Budgets>,
    pub check: Check,
    tenant: String,
    feature: Option<String>,
    endpoint: Endpoint,
    max_tokens: Option<u64>,
    /// Images asked for (`n` of an image generation, else 1): each is billed.
    images: u64,
    /// Input tokens of the body for each tokenizer the attempts use.
    tokens: Vec<(Tokenizer, u64)>,
    fallback_tokens: u64,
    hold: Mutex<Option<Hold>>,
    /// The previous attempt's release while it runs: the next reservation
    /// waits for it, or it could be refused for money nobody holds any more.
    releasing: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Why the last reservation was refused.
    refused: Mutex<Option<Refused>>,
}

impl RequestBudget {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        budgets: Arc<Budgets>,
        check: Check,
        p: &Policy,
        tenant: &str,
        feature: Option<&str>,
        endpoint: Endpoint,
        max_tokens: Option<u64>,
        fallback_tokens: u64,
        body: Option<&serde_json::Value>,
        attempts: &[ModelId],
    ) -> RequestBudget {
        let mut tokens: Vec<(Tokenizer, u64)> = Vec::new();
        // Without a budget to reserve against, the engine's fast estimate
        // (`fallback_tokens`) is enough for the ledger; the tokenizer is not.
        if let (Some(body), false) = (body, check.budgets.is_empty()) {
            for m in attempts.iter().filter_map(|m| p.model(*m)) {
                let t = Tokenizer::for_model(m);
                if !tokens.iter().any(|(u, _)| *u == t) {
                    tokens.push((t, estimate::input_tokens(t, body)));
                }
            }
        }
        let images = match endpoint {
            Endpoint::Images => estimate::images_asked(body),
            _ => 0,
        };
        RequestBudget {
            budgets,
            check,
            tenant: tenant.to_string(),
            feature: feature.map(str::to_string),
            endpoint,
            max_tokens,
            images,
            tokens,
            fallback_tokens,
            hold: Mutex::new(None),
            releasing: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    fn input_tokens(&self, m: &Model) -> u64 {
        let t = Tokenizer::for_model(m);
        self.tokens
            .iter()
            .find(|(u, _)| *u == t)
            .map_or(self.fallback_tokens, |(_, n)| *n)
    }

    /// The warning to send with the answer, when a threshold was reached.
    pub fn warning(&self) -> Option<&str> {
        self.check.message.as_deref()
    }

    /// Why the budget refused the last attempt.
    pub fn refused(&self) -> Option<Refused> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }

    /// Reserve the estimated cost of an attempt on model `m`. Any previous
    /// hold is released first. `Err` says why, the message for the client.
    /// `default_cap`: the output cap the provider is sent when the request
    /// gives none (the Anthropic translation's `max_tokens`), so that the
    /// reservation covers what the gateway itself allows the answer to cost.
    pub async fn reserve(
        &self,
        p: &Policy,
        m: ModelId,
        id: &str,
        default_cap: Option<u64>,
    ) -> Result<(), Refused> {
        self.release();
        let releasing = self.releasing.lock().ok().and_then(|mut r| r.take());
        if let Some(releasing) = releasing {
            // A failed release is logged where it ran; the money is held
            // until the reservation expires, whatever this waits for.
            let _ = releasing.await;
        }
        let Some(model) = p.model(m) else {
            return Ok(());
        };
        let input = self.input_tokens(model);
        let cap = self.max_tokens.or(default_cap);
        let amount = estimate::estimate_cost(model, self.endpoint, input, cap)
            .saturating_add(estimate::more_images_cost(model, self.images));
        let now = crate::state::now_ms();
        let reserved = self
            .budgets
            .reserve_off_loop(&self.check, id, amount, now)
            .await;
        let refused = match reserved {
            Ok(Ok(r)) => {
                if let Ok(mut h) = self.hold.lock() {
                    *h = Some(Hold {
                        reservation: r,
                        model: model.name.clone(),
                        input_tokens: input,
                    });
                }
                return Ok(());
            }
            Ok(Err(refused)) => refused,
            Err(e) => {
                // Fail closed: without the store nobody can tell what is left.
                let refused = Refused {
                    message: format!("the budget store is unavailable: {e}"),
                    resets_ms: 0,
                    store_unavailable: true,
                };
                tracing::error!(tenant = %self.tenant, "{}", refused.message);
                refused
            }
        };
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(refused.clone());
        }
        Err(refused)
    }

    /// Release the current attempt's reservation, if any, off the event
    /// loop and not waited for: it expires by itself if the release fails.
    pub fn release(&self) {
        let hold = self.hold.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = hold {
            let releasing = self
                .budgets
                .release_detached(h.reservation, self.tenant.clone());
            if let (Some(releasing), Ok(mut r)) = (releasing, self.releasing.lock()) {
                *r = Some(releasing);
            }
        }
    }

    /// Settle the current attempt at its actual cost: the provider's usage
    /// (`prompt`, `completion`) when it reported one, else our input count
    /// and `counted_output`. Returns the actual cost once the spend is
    /// recorded (spooled, or in the store, whose call runs off the event loop).
    pub async fn settle(
        &self,
        p: &Policy,
        usage: Option<(u64, u64)>,
        counted_output: u64,
    ) -> Option<Micros> {
        // The same guarded store call as a stream's: a blocking task the
        // runtime drops at shutdown still records the spend.
        let (actual, call) = self.settle_in_poll(p, usage, counted_output)?;
        if let Some(call) = call {
            call.await;
        }
        Some(actual)
    }

    /// [`RequestBudget::settle`] for a stream's end, which is noticed in a
    /// poll: the spend is worked out and, when no budget applies, spooled
    /// here; the store call, when there is one, is the returned future (run
    /// off the event loop), for the stream to await before its last bytes
    /// go out, so a client that saw the whole stream finds it recorded.
    pub fn settle_in_poll(
        &self,
        p: &Policy,
        usage: Option<(u64, u64)>,
        counted_output: u64,
    ) -> Option<(Micros, Option<StoreCall>)> {
        let (reservation, entry) = self.settled(p, usage, counted_output)?;
        let actual = entry.actual;
        let entry = match self.budgets.spooled(&reservation, entry) {
            None => return Some((actual, None)),
            Some(entry) => entry,
        };
        let tenant = self.tenant.clone();
        let mut settle = Settle {
            store: Arc::clone(&self.budgets.store),
            job: Some((reservation, entry)),
            tenant: tenant.clone(),
        };
        let call = Box::pin(async move {
            let ran = off_loop(move || {
                settle.run();
                Ok(())
            });
            if let Err(e) = ran.await {
                tracing::error!(tenant = %tenant, "cannot record spend {}: {e}", dollars(actual));
            }
        });
        Some((actual, Some(call)))
    }

    /// The held reservation and the ledger entry that settles it.
    fn settled(
        &self,
        p: &Policy,
        usage: Option<(u64, u64)>,
        counted_output: u64,
    ) -> Option<(Reservation, LedgerEntry)> {
        let h = self.hold.lock().ok().and_then(|mut h| h.take())?;
        let model = p.model_by_name(&h.model).and_then(|id| p.model(id));
        let (input, output) = usage.unwrap_or((h.input_tokens, counted_output));
        let mut actual = model.map_or(0, |m| estimate::token_cost(&m.pricing, input, output));
        if self.endpoint == Endpoint::Images {
            let per_image = model.map_or(0, |m| m.pricing.per_image);
            actual = actual.saturating_add(per_image.saturating_mul(self.images));
        }
        let entry = LedgerEntry {
            id: h.reservation.id.clone(),
            ts_ms: crate::state::now_ms(),
            tenant: self.tenant.clone(),
            feature: self.feature.clone(),
            model: h.model,
            input_tokens: input,
            output_tokens: output,
            estimated: h.reservation.amount,
            actual,
        };
        Some((h.reservation, entry))
    }
}

impl Drop for RequestBudget {
    fn drop(&mut self) {
        self.release();
    }
}

/// A ledger entry of one token each way and one micro-dollar, for tests.
#[cfg(test)]
fn test_entry(id: &str, ts_ms: i64) -> LedgerEntry {
    LedgerEntry {
        id: id.into(),
        ts_ms,
        tenant: "t".into(),
        feature: None,
        model: "m".into(),
        input_tokens: 1,
        output_tokens: 1,
        estimated: 1,
        actual: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::memory::MemoryStore;

    fn policy(src: &str) -> crate::compile::CompiledPolicy {
        let mut sources = crate::source::Sources::default();
        sources.add("p.route", src.to_string());
        crate::compile::compile(&sources).unwrap_or_else(|a| {
            panic!(
                "{:?}",
                a.diagnostics.iter().map(|d| &d.message).collect::<Vec<_>>()
            )
        })
    }

    pub(super) const POLICY: &str = r#"
tenant {
  monthly_budget: number = 20
}
provider p {
  region us
}
model cheap {
  provider p
  kind chat
  context 8k
  price in $1 out $2 per 1M
}
model dear {
  provider p
  kind chat
  context 8k
  price in $10 out $20 per 1M
  tier premium
}
classify {
  chat otherwise
}
route chat {
  candidates [dear, cheap]
  score 1.0 * quality
}
protect {
  budget monthly per tenant tenant.monthly_budget {
    warn at 50%
    confirm premium at 80%
    downgrade at 90%
    block at 100%
  }
  budget daily per tenant and feature $1 {
    warn at 10%
  }
}
"#;

    #[test]
    fn dollars_are_readable() {
        for (m, s) in [
            (0, "$0.00"),
            (1, "$0.000001"),
            (1_500_000, "$1.50"),
            (20_000_000, "$20.00"),
            (123_456, "$0.123456"),
            (100, "$0.0001"),
        ] {
            assert_eq!(dollars(m), s);
        }
    }

    #[test]
    fn a_negative_tenant_amount_is_refused_where_the_tenant_is_set() {
        let p = policy(POLICY);
        let mut attrs = serde_json::Map::new();
        attrs.insert("monthly_budget".into(), serde_json::json!(-5));
        let errs = p.tenant("acme", &attrs).unwrap_err();
        assert_eq!(
            errs,
            ["tenant `acme`: attribute `monthly_budget` is -5, but it is the amount of a budget in dollars: give 0 or more"]
        );
        attrs.insert("monthly_budget".into(), serde_json::json!(0));
        assert!(p.tenant("acme", &attrs).is_ok());
    }

    #[test]
    fn budgets_apply_by_scope_with_tenant_amounts() {
        let p = policy(POLICY);
        let mut attrs = serde_json::Map::new();
        attrs.insert("monthly_budget".into(), serde_json::json!(0.5));
        let t = p.tenant("acme", &attrs).unwrap();
        // 2026-11-25 12:00 UTC.
        let now = 1_795_608_000_000;
        let a = applicable(p.policy(), &t, None, now);
        assert_eq!(a.len(), 1, "the feature budget needs a feature");
        assert_eq!(a[0].charge.limit, 500_000);
        assert_eq!(a[0].charge.counter.key, "monthly|tenant|acme");
        assert_eq!(period::format_utc(a[0].resets_ms), "2026-12-01 00:00 UTC");
        let a = applicable(p.policy(), &t, Some("chat"), now);
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].charge.counter.key, "daily|tenant-feature|acme/chat");
        assert_eq!(a[1].charge.limit, 1_000_000);
        assert_eq!(
            a[1].label,
            "the daily budget of tenant `acme` for feature `chat`"
        );
    }

    #[test]
    fn the_strongest_threshold_reached_wins() {
        let p = policy(POLICY);
        let t = p.tenant("acme", &serde_json::Map::new()).unwrap();
        let now = 1_795_608_000_000;
        let a = applicable(p.policy(), &t, None, now).remove(0);
        let cases = [
            (0, 0, None, false),
            (9_000_000, 0, None, false),
            (9_000_000, 1_000_000, Some(BudgetAction::Warn), false),
            (16_000_000, 0, Some(BudgetAction::ConfirmPremium), true),
            (17_000_000, 1_000_000, Some(BudgetAction::Downgrade), true),
            (20_000_000, 0, Some(BudgetAction::Block), true),
            (25_000_000, 0, Some(BudgetAction::Block), true),
        ];
        for (spent, reserved, expect, guarded) in cases {
            let budgets = [(a.clone(), Balance { spent, reserved })];
            let (act, msg) = evaluate(&budgets);
            assert_eq!(act, expect, "{spent} + {reserved}");
            assert_eq!(msg.is_some(), expect.is_some());
            // The premium guard holds from its threshold on, a downgrade included.
            assert_eq!(premium_guarded(&budgets), guarded, "{spent} + {reserved}");
        }
        let (_, msg) = evaluate(&[(
            a,
            Balance {
                spent: 18_000_000,
                reserved: 500_000,
            },
        )]);
        assert_eq!(
            msg.unwrap(),
            "the monthly budget of tenant `acme` ($20.00): $18.00 spent, $0.50 reserved (92%); it resets at 2026-12-01 00:00 UTC"
        );
    }

    #[test]
    fn reservations_are_refused_with_a_clear_message() {
        let p = policy(POLICY);
        let mut attrs = serde_json::Map::new();
        attrs.insert("monthly_budget".into(), serde_json::json!(0.0001));
        let t = p.tenant("capped", &attrs).unwrap();
        let now = 1_795_608_000_000;
        let b = Budgets::new(Arc::new(MemoryStore::default()));
        let check = b.check(p.policy(), &t, None, now).unwrap();
        let r = b.reserve(&check, "a/1", 60, now).unwrap().unwrap();
        b.settle(
            &r,
            LedgerEntry {
                id: "a/1".into(),
                ts_ms: now,
                tenant: "capped".into(),
                feature: None,
                model: "cheap".into(),
                input_tokens: 1,
                output_tokens: 1,
                estimated: 60,
                actual: 60,
            },
        )
        .unwrap();
        let check = b.check(p.policy(), &t, None, now).unwrap();
        assert_eq!(check.action, Some(BudgetAction::Warn));
        let refused = b.reserve(&check, "b/1", 41, now).unwrap().unwrap_err();
        assert_eq!(
            refused.message,
            "the monthly budget of tenant `capped` is exhausted: the budget is $0.0001, $0.00006 is spent and $0.00 reserved, and this request needs up to $0.000041; it resets at 2026-12-01 00:00 UTC"
        );
        assert!(b.reserve(&check, "b/2", 40, now).unwrap().is_ok());
    }

    #[test]
    fn an_entry_the_spool_cannot_take_is_recorded_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BudgetStore> =
            Arc::new(crate::state::sqlite::SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let b = Budgets::new(store.clone());
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        b.spool.as_ref().unwrap().append_to(full);
        let r = Reservation {
            id: "full/0".into(),
            counters: Vec::new(),
            amount: 0,
            expires_ms: 0,
        };
        let entry = test_entry("full/0", 1);
        assert!(b.settle(&r, entry.clone()).unwrap());
        // In the store before any writer ran: the append failed, so the
        // settle recorded it itself.
        assert_eq!(store.ledger(None).unwrap(), vec![entry]);
    }
}

#[cfg(test)]
mod off_loop_tests {
    use super::*;
    use crate::state::memory::MemoryStore;
    use futures_util::FutureExt;
    use std::time::Duration;

    /// A store whose reservations wait until the test lets them through.
    #[derive(Default)]
    struct Gated {
        inner: MemoryStore,
        gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        reserved: std::sync::atomic::AtomicBool,
        release_gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl BudgetStore for Gated {
        fn reserve(
            &self,
            id: &str,
            charges: &[Charge],
            amount: Micros,
            now_ms: i64,
            ttl_ms: i64,
        ) -> Result<Reservation, StateError> {
            if let Some(gate) = self.gate.lock().unwrap().as_ref() {
                let _ = gate.recv();
            }
            let r = self.inner.reserve(id, charges, amount, now_ms, ttl_ms);
            self.reserved
                .store(true, std::sync::atomic::Ordering::SeqCst);
            r
        }
        fn settle(&self, r: &Reservation, entry: &LedgerEntry) -> Result<bool, StateError> {
            self.inner.settle(r, entry)
        }
        fn release(&self, r: &Reservation) -> Result<(), StateError> {
            if let Some(gate) = self.release_gate.lock().unwrap().as_ref() {
                let _ = gate.recv();
            }
            self.inner.release(r)
        }
        fn balance(&self, c: &Counter, now_ms: i64) -> Result<Balance, StateError> {
            self.inner.balance(c, now_ms)
        }
        fn ledger(&self, since_ms: Option<i64>) -> Result<Vec<LedgerEntry>, StateError> {
            self.inner.ledger(since_ms)
        }
        fn trim_ledger(&self, before_ms: i64, batch: usize) -> Result<usize, StateError> {
            self.inner.trim_ledger(before_ms, batch)
        }
        fn open_reservations(&self, now_ms: i64) -> Result<usize, StateError> {
            self.inner.open_reservations(now_ms)
        }
    }

    fn policy() -> crate::compile::CompiledPolicy {
        let mut sources = crate::source::Sources::default();
        sources.add("p.route", super::tests::POLICY.to_string());
        crate::compile::compile(&sources).unwrap_or_else(|_| panic!("the policy compiles"))
    }

    /// A request's budget against `store`, and the counter of its monthly budget.
    fn request(
        p: &crate::compile::CompiledPolicy,
        store: Arc<Gated>,
    ) -> (RequestBudget, Counter, i64) {
        request_with(p, store, Some(100))
    }

    /// [`request`] on any store, with the request's output cap.
    fn request_with(
        p: &crate::compile::CompiledPolicy,
        store: Arc<dyn BudgetStore>,
        max_tokens: Option<u64>,
    ) -> (RequestBudget, Counter, i64) {
        let t = p.tenant("acme", &serde_json::Map::new()).unwrap();
        let budgets = Arc::new(Budgets::new(store));
        let now = crate::state::now_ms();
        let check = budgets.check(p.policy(), &t, None, now).unwrap();
        let counter = check.budgets[0].0.charge.counter.clone();
        let rb = RequestBudget::new(
            budgets,
            check,
            p.policy(),
            "acme",
            None,
            Endpoint::Chat,
            max_tokens,
            10,
            None,
            &[],
        );
        (rb, counter, now)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_ledger_is_trimmed_to_its_retention_and_spend_stays_counted() {
        let store: Arc<dyn BudgetStore> = Arc::new(crate::state::memory::MemoryStore::default());
        let now = crate::state::now_ms();
        let hour = 3_600_000;
        let entry = test_entry;
        // More old entries than one batch, and two recent ones.
        let old: Vec<LedgerEntry> = (0..TRIM_BATCH + 5)
            .map(|i| entry(&format!("old{i}"), now - 48 * hour))
            .collect();
        store.record(&old).unwrap();
        store
            .record(&[entry("recent", now - 1_000), entry("edge", now - 23 * hour)])
            .unwrap();
        let counter = crate::state::Counter {
            key: "k".into(),
            period_start: 0,
        };
        let r = store
            .reserve(
                "spent",
                &[crate::state::Charge {
                    counter: counter.clone(),
                    limit: 100,
                }],
                5,
                now,
                60_000,
            )
            .unwrap();
        let spent = LedgerEntry {
            actual: 5,
            ..entry("spent", now - 72 * hour)
        };
        store.settle(&r, &spent).unwrap();
        let budgets = Budgets::new(store.clone());
        let trimmer = budgets
            .trim_ledger_every(std::time::Duration::from_secs(24 * 3600))
            .unwrap();
        let started = std::time::Instant::now();
        while store.ledger(None).unwrap().len() > 2 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "not trimmed"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let left: Vec<String> = store
            .ledger(None)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(left, ["edge", "recent"]);
        assert_eq!(store.balance(&counter, now).unwrap().spent, 5);
        // Dropping it stops the thread, asleep until the next hour.
        drop(trimmer);
    }

    #[test]
    fn a_reservation_made_after_its_request_went_away_is_released() {
        let p = policy();
        let (open, gate) = std::sync::mpsc::channel();
        let store = Arc::new(Gated::default());
        *store.gate.lock().unwrap() = Some(gate);
        let (rb, counter, now) = request(&p, store.clone());
        let m = p.policy().model_by_name("cheap").unwrap();
        runtime().block_on(async {
            // The client goes away while the store is still reserving
            // (hyper drops the request's future).
            let gone = tokio::time::timeout(
                Duration::from_millis(20),
                rb.reserve(p.policy(), m, "gone/0", None),
            )
            .await;
            assert!(gone.is_err());
            drop(rb);
            open.send(()).unwrap();
            let mut left = 0;
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                left = store.inner.balance(&counter, now).unwrap().reserved;
                if store.reserved.load(std::sync::atomic::Ordering::SeqCst) && left == 0 {
                    break;
                }
            }
            assert!(store.reserved.load(std::sync::atomic::Ordering::SeqCst));
            assert_eq!(left, 0, "nobody holds this reservation any more");
        });
    }

    #[test]
    fn the_cap_the_gateway_sends_is_reserved_when_the_request_sets_none() {
        let p = policy();
        let store = Arc::new(crate::state::memory::MemoryStore::default());
        let (rb, counter, now) = request_with(&p, store.clone(), None);
        let m = p.policy().model_by_name("cheap").unwrap();
        let reserved = || store.balance(&counter, now).unwrap().reserved;
        runtime().block_on(async {
            // An OpenAI-compatible provider: the estimate's default output.
            rb.reserve(p.policy(), m, "c/0", None).await.unwrap();
            let estimated = reserved();
            // An Anthropic one is sent `max_tokens: 4096`: that is reserved.
            rb.reserve(p.policy(), m, "c/1", Some(4096)).await.unwrap();
            let sent = reserved();
            // 10 input tokens at $1 and the output at $2 per 1M, rounded up.
            assert_eq!(estimated, 10 + 2 * estimate::DEFAULT_OUTPUT_TOKENS);
            assert_eq!(sent, 10 + 2 * 4096);
        });
    }

    #[test]
    fn the_next_attempt_reserves_after_the_previous_one_is_released() {
        let p = policy();
        // Room for one attempt's estimate, not two.
        let mut attrs = serde_json::Map::new();
        attrs.insert("monthly_budget".into(), serde_json::json!(0.0003));
        let t = p.tenant("tight", &attrs).unwrap();
        let (open, gate) = std::sync::mpsc::channel();
        let store = Arc::new(Gated::default());
        *store.release_gate.lock().unwrap() = Some(gate);
        let budgets = Arc::new(Budgets::new(store.clone()));
        let now = crate::state::now_ms();
        let check = budgets.check(p.policy(), &t, None, now).unwrap();
        let rb = RequestBudget::new(
            budgets,
            check,
            p.policy(),
            "tight",
            None,
            Endpoint::Chat,
            Some(100),
            10,
            None,
            &[],
        );
        let m = p.policy().model_by_name("cheap").unwrap();
        runtime().block_on(async {
            assert!(rb.reserve(p.policy(), m, "r/0", None).await.is_ok());
            // The attempt failed: dispatch releases, and falls back at once
            // while the store (a Redis round trip away) is still releasing.
            rb.release();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let _ = open.send(());
            });
            let next = rb.reserve(p.policy(), m, "r/1", None).await;
            assert!(next.is_ok(), "{:?}", next.err().map(|r| r.message));
        });
    }

    /// A stream's body dropped with its settle not run yet hands the settle
    /// to the runtime, as `dispatch::Forward` does.
    struct Body(Option<StoreCall>);

    impl Drop for Body {
        fn drop(&mut self) {
            if let (Some(call), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
                drop(rt.spawn(call));
            }
        }
    }

    #[test]
    fn a_streams_settle_is_recorded_however_its_body_is_dropped() {
        let p = policy();
        let m = p.policy().model_by_name("cheap").unwrap();
        for case in ["runtime shut down", "dropped unpolled"] {
            let store = Arc::new(Gated::default());
            let (rb, counter, now) = request(&p, store.clone());
            // Outside a runtime the store call runs at once.
            let reserved = rb.reserve(p.policy(), m, "s/0", None).now_or_never();
            assert!(matches!(reserved, Some(Ok(()))), "{case}");
            let (actual, call) = rb
                .settle_in_poll(p.policy(), Some((1_000, 1_000)), 0)
                .unwrap();
            let call = call.unwrap();
            assert!(actual > 0);
            match case {
                "dropped unpolled" => drop(Body(Some(call))),
                _ => {
                    // SIGTERM: `serve` returns and the worker's runtime is
                    // dropped with its connections' tasks, streams included.
                    let rt = runtime();
                    rt.block_on(async {
                        tokio::spawn(async move {
                            let _body = Body(Some(call));
                            std::future::pending::<()>().await;
                        });
                        tokio::task::yield_now().await;
                    });
                    drop(rt);
                }
            }
            let b = store.inner.balance(&counter, now).unwrap();
            assert_eq!((b.spent, b.reserved), (actual, 0), "{case}");
        }
    }
}
