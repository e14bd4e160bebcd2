//! The policy checks that come before slots and tokens: pause, dependency
//! breakers, tenant quotas, the retry budget, and partial grants.
//!
//! Order (after shape): paused → dependencies → tenant quota (checked, not
//! yet taken) → retry budget (taken; given back if a later check refuses) →
//! fleet credit, or the fallback bucket once the lease has expired (taken;
//! given back if a later check refuses) →
//! then [`sluice_shm_layout::admit`] takes slots and class tokens → on
//! admission the tenant's tokens are taken and a first attempt refills the
//! retry budget. Classes with none of these features skip this module: the
//! fast path reads one flags word.

use std::time::Duration;

use sluice_shm_layout::admit::ClassParams;
use sluice_shm_layout::breaker::{self, Gate};
use sluice_shm_layout::bucket::{units_to_ns_ceil, BucketVerdict, RateParams};
use sluice_shm_layout::counters::Reason;
use sluice_shm_layout::fleet;
use sluice_shm_layout::layout::{
    TierRecord, CLASS_FLEET, CLASS_ON_DEP_QUEUE, CLASS_ON_PAUSED_QUEUE, CLASS_PAUSED,
    CLASS_RETRY_BUDGET, CLASS_TENANTS,
};
use sluice_shm_layout::retry;
use sluice_shm_layout::slots;
use sluice_shm_layout::sync::Ordering;
use sluice_shm_layout::tenants;

use crate::{AcquireError, Ctx, Refusal, Request};

/// Class flags that send a request through this module.
pub(crate) const POLICY_FLAGS: u32 =
    CLASS_PAUSED | CLASS_TENANTS | CLASS_RETRY_BUDGET | CLASS_HAS_DEPS | CLASS_FLEET;

/// Class `flags` bit: the class lists dependencies.
pub(crate) const CLASS_HAS_DEPS: u32 = sluice_shm_layout::layout::CLASS_HAS_DEPS;

/// What the checks took, to give back on a later refusal or to finish on
/// admission.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Taken {
    /// The cost to ask for (smaller than the request's for a partial grant).
    pub cost: u64,
    /// A retry-budget unit was taken.
    pub retry: bool,
    /// Half-open probes taken, by dependency index + 1.
    pub probes: [u32; 4],
    /// The tenant tokens taken, to give back on a later refusal.
    pub tenant: Option<TenantTaken>,
    /// The fleet credit or fallback tokens taken.
    pub fleet: Option<FleetTaken>,
}

/// What the fleet check took.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FleetTaken {
    /// Tokens from the lease's credit word, in this epoch.
    Credit { epoch: u64, n: u64 },
    /// Tokens from the fallback bucket: the `tat` stored and the one it
    /// replaced.
    Fallback { n: u64, new_tat: u64, prev: u64 },
}

/// The outcome of the checks.
#[derive(Debug)]
pub(crate) enum Gates {
    /// Go on to slots and tokens.
    Go(Taken),
    /// Refused; nothing is held.
    Refuse(Refusal),
    /// May wait in the queue: the class is paused or a dependency is down,
    /// and its policy is to queue (only when the caller is willing to wait).
    Hold(Taken),
}

fn refusal(reason: Reason, retry_after_ns: Option<u64>, largest_cost: Option<u64>) -> Refusal {
    Refusal {
        reason,
        retry_after: retry_after_ns.map(Duration::from_nanos),
        largest_cost,
    }
}

/// `Taken::tenant` of the shared overflow bucket.
const OVERFLOW: usize = usize::MAX;

/// A tenant record by table index, or the overflow bucket.
fn tenant_record(
    region: &sluice_shm_layout::layout::Region,
    i: usize,
) -> Option<&sluice_shm_layout::tenants::TenantRecord> {
    if i == OVERFLOW {
        Some(region.tenant_overflow())
    } else {
        region.tenants().get(i)
    }
}

/// The tier buckets of a tenant record.
fn tier_params(tier: &TierRecord) -> (Option<RateParams>, Option<RateParams>) {
    // Relaxed: config values written by the daemon; each is clamped/checked.
    let rate_t = tier.rate_t.load(Ordering::Relaxed);
    let burst = tier.burst.load(Ordering::Relaxed).max(1);
    let quota_t = tier.quota_t.load(Ordering::Relaxed);
    let quota = tier.quota.load(Ordering::Relaxed).max(1);
    let rate = (rate_t > 0).then_some(RateParams {
        t: rate_t,
        burst,
        excess: 0,
    });
    let q = (quota_t > 0).then_some(RateParams {
        t: quota_t,
        burst: quota,
        excess: 0,
    });
    (rate, q)
}

/// Run the checks for `req` in `ctx`. `wait` says whether the caller may
/// wait in the queue (then pause/dependency may hold instead of refuse).
pub(crate) fn gates(
    ctx: &Ctx<'_>,
    req: &Request<'_>,
    flags: u32,
    now_ns: u64,
    wait: bool,
) -> Result<Gates, AcquireError> {
    let lane = req.lane.index();
    let mut taken = Taken {
        cost: req.cost,
        ..Taken::default()
    };
    let region = ctx.attached.map.region();
    let now_units = ctx.now_units_at(now_ns);

    // Tenant: find (or insert) its record; its tier caps the shape.
    let mut tier_caps = u64::MAX;
    let mut tenant_rec = None;
    if flags & CLASS_TENANTS != 0 {
        let Some(key) = req.tenant else {
            return Err(AcquireError::TenantRequired);
        };
        if key.is_empty() || key.len() > tenants::MAX_KEY_LEN {
            return Err(AcquireError::BadTenant {
                len: key.len(),
                max: tenants::MAX_KEY_LEN,
            });
        }
        let h = region.header();
        // Relaxed: written once at creation / by the daemon's config apply.
        let (k0, k1) = (
            h.tenant_k0.load(Ordering::Relaxed),
            h.tenant_k1.load(Ordering::Relaxed),
        );
        let default_tier = h.tenant_default_tier.load(Ordering::Relaxed);
        let table = region.tenants();
        let hash = tenants::key_hash(k0, k1, key.as_bytes());
        let found = tenants::find_or_insert(
            table,
            hash,
            key.as_bytes(),
            default_tier,
            now_ns,
            ctx.attached.owner.index,
        );
        let idx = match found {
            Ok(i) => Some(i),
            Err(_) => {
                // Relaxed: a config bit.
                let shared = h.tenant_flags.load(Ordering::Relaxed)
                    & sluice_shm_layout::layout::TENANTS_ON_FULL_SHARED
                    != 0;
                if !shared {
                    return Ok(Gates::Refuse(refusal(Reason::Quota, None, None)));
                }
                Some(OVERFLOW)
            }
        };
        if let Some(i) = idx {
            if let Some(rec) = tenant_record(region, i) {
                tenants::touch(rec, now_ns);
                // Relaxed: written before the record was published LIVE.
                let tier = region.tier(rec.tier.load(Ordering::Relaxed));
                if let Some(tier) = tier {
                    let (rate, quota) = tier_params(tier);
                    for p in [rate, quota].into_iter().flatten() {
                        tier_caps = tier_caps.min(p.max_cost());
                    }
                    tenant_rec = Some((i, rate, quota));
                }
            }
        }
    }

    // Shape (with the tenant's caps and the largest lease); a partial
    // request is cut down instead.
    let mut largest = ctx.params.largest_cost(lane).min(tier_caps);
    if flags & CLASS_FLEET != 0 {
        // Relaxed: a config value; 0 (not yet written) means no cap.
        let max_lease = ctx.rec.fleet_max_lease.load(Ordering::Relaxed);
        if max_lease > 0 {
            largest = largest.min(max_lease);
        }
    }
    if taken.cost > largest {
        if !req.allow_partial {
            return Ok(Gates::Refuse(refusal(
                Reason::SmallerScope,
                None,
                Some(largest),
            )));
        }
        taken.cost = largest;
    }
    if req.allow_partial {
        let now = largest_now(ctx, &ctx.params, lane, now_units);
        if now >= 1 {
            taken.cost = taken.cost.min(now);
        }
    }

    // Paused by its owner.
    if flags & CLASS_PAUSED != 0 {
        if wait && flags & CLASS_ON_PAUSED_QUEUE != 0 {
            return Ok(Gates::Hold(taken));
        }
        return Ok(Gates::Refuse(refusal(Reason::Paused, None, None)));
    }

    // Dependencies.
    if flags & CLASS_HAS_DEPS != 0 {
        for (k, d) in ctx.rec.deps.iter().enumerate() {
            // Relaxed: a config value.
            let Some(dep_idx) = d.load(Ordering::Relaxed).checked_sub(1) else {
                continue;
            };
            let Some(dep) = region.dep(dep_idx) else {
                continue;
            };
            match breaker::check(dep, now_ns) {
                Gate::Pass => {}
                Gate::Probe => taken.probes[k] = dep_idx + 1,
                Gate::Refuse(retry) => {
                    give_back(ctx, &taken);
                    if wait && flags & CLASS_ON_DEP_QUEUE != 0 {
                        return Ok(Gates::Hold(Taken {
                            probes: [0; 4],
                            ..taken
                        }));
                    }
                    return Ok(Gates::Refuse(refusal(Reason::Dependency, retry, None)));
                }
            }
        }
    }

    // Tenant quota: taken now, given back if a later check refuses.
    if let Some((first, rate, quota)) = tenant_rec {
        let mut i = first;
        for _ in 0..4 {
            let Some(rec) = tenant_record(region, i) else {
                break;
            };
            // SeqCst: the re-check below must see a retire (a concurrent
            // insert of the same key kept another copy) that happened before
            // our take; pairs with the SeqCst fence in `tenants::settle`.
            let before = rec.state.load(Ordering::SeqCst);
            // First a look at both buckets (no write), so a refusal names the
            // later of the two retry times: the one that binds.
            let mut binding = None;
            for (p, word) in [(rate, &rec.tat), (quota, &rec.quota_tat)] {
                let Some(p) = p else { continue };
                // Relaxed: a look before the take; the take is a CAS.
                if let BucketVerdict::Red { retry_after } =
                    p.decide(word.load(Ordering::Relaxed), now_units, taken.cost)
                {
                    binding = Some(binding.unwrap_or(0).max(units_to_ns_ceil(retry_after)));
                }
            }
            if let Some(retry) = binding {
                give_back(ctx, &taken);
                return Ok(Gates::Refuse(refusal(Reason::Quota, Some(retry), None)));
            }
            let mut undo = [None; 2];
            let mut wait = None;
            for (k, (p, word)) in [(rate, &rec.tat), (quota, &rec.quota_tat)]
                .into_iter()
                .enumerate()
            {
                let Some(p) = p else { continue };
                match p.take_undoable(word, now_units, taken.cost) {
                    (
                        BucketVerdict::Green { new_tat } | BucketVerdict::Yellow { new_tat },
                        prev,
                    ) => {
                        undo[k] = Some((new_tat, prev));
                    }
                    (BucketVerdict::Red { retry_after }, _) => {
                        wait = Some(units_to_ns_ceil(retry_after));
                        break;
                    }
                    (BucketVerdict::Never, _) => {
                        wait = Some(0);
                        break;
                    }
                }
            }
            let t = TenantTaken { index: i, undo };
            if let Some(retry) = wait {
                untake_tenant(region, &t);
                give_back(ctx, &taken);
                let retry = (retry > 0).then_some(retry);
                return Ok(Gates::Refuse(refusal(Reason::Quota, retry, None)));
            }
            let after = rec.state.load(Ordering::SeqCst);
            let live = tenants::TenantWord::decode(after).state == tenants::TN_LIVE;
            if i != OVERFLOW && (after != before || !live) {
                // Our copy was retired for another (or evicted), before or
                // during our take: charge the one that stays.
                untake_tenant(region, &t);
                let Some(key) = req.tenant else { break };
                let h = region.header();
                // Relaxed: written once at creation.
                let (k0, k1) = (
                    h.tenant_k0.load(Ordering::Relaxed),
                    h.tenant_k1.load(Ordering::Relaxed),
                );
                let hash = tenants::key_hash(k0, k1, key.as_bytes());
                let tier = rec.tier.load(Ordering::Relaxed);
                match tenants::find_or_insert(
                    region.tenants(),
                    hash,
                    key.as_bytes(),
                    tier,
                    now_ns,
                    ctx.attached.owner.index,
                ) {
                    Ok(next) => {
                        i = next;
                        continue;
                    }
                    Err(_) => {
                        give_back(ctx, &taken);
                        return Ok(Gates::Refuse(refusal(Reason::Quota, None, None)));
                    }
                }
            }
            taken.tenant = Some(t);
            break;
        }
    }

    // Retry budget: a retry takes a unit first, or is refused.
    if req.attempt > 1 && flags & CLASS_RETRY_BUDGET != 0 {
        if !retry::take(&ctx.rec.retry_tokens) {
            give_back(ctx, &taken);
            return Ok(Gates::Refuse(refusal(Reason::RetryBudget, None, None)));
        }
        taken.retry = true;
    }

    // Fleet credit: the lease, or the store-down policy once it expired.
    if flags & CLASS_FLEET != 0 {
        match take_fleet(ctx, taken.cost, now_ns, now_units) {
            Ok(t) => taken.fleet = t,
            Err(retry) => {
                give_back(ctx, &taken);
                return Ok(Gates::Refuse(refusal(Reason::Fleet, retry, None)));
            }
        }
    }
    Ok(Gates::Go(taken))
}

/// Take `n` fleet tokens: from the lease while it is valid, else per
/// `on_store_down`. `Err` carries the retry-after of a `fleet` refusal.
fn take_fleet(
    ctx: &Ctx<'_>,
    n: u64,
    now_ns: u64,
    now_units: u64,
) -> Result<Option<FleetTaken>, Option<u64>> {
    let rec = ctx.rec;
    // Relaxed: config values written by the daemon before the class's
    // generation (loaded with Acquire by the caller).
    let cfg = rec.fleet_cfg.load(Ordering::Relaxed);
    let shadow = cfg & fleet::CFG_SHADOW != 0;
    // The earliest a refused request may come back: the next lease, or one
    // lease interval when none is planned (daemon gone).
    let retry_after = || {
        // Relaxed: a hint for the caller's retry time.
        let next = rec.fleet_next_lease_ns.load(Ordering::Relaxed);
        let interval = rec.fleet_interval_ns.load(Ordering::Relaxed).max(1);
        Some(if next > now_ns {
            next - now_ns
        } else {
            interval
        })
    };
    let refuse = |retry: Option<u64>| {
        if shadow {
            // Relaxed: a statistic.
            rec.fleet_shadow_refused.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        } else {
            Err(retry)
        }
    };

    if fleet::lease_valid(&rec.fleet_lease_until_ns, now_ns) {
        return match fleet::take(&rec.fleet_credit, n) {
            Ok(epoch) => Ok(Some(FleetTaken::Credit { epoch, n })),
            Err(_) => refuse(retry_after()),
        };
    }
    match cfg & fleet::STORE_DOWN_MASK {
        fleet::STORE_DOWN_OPEN => Ok(None),
        fleet::STORE_DOWN_REFUSE => refuse(retry_after()),
        _ => {
            // Relaxed: config values, clamped (T = 0 means no bucket).
            let t = rec.fleet_fallback_t.load(Ordering::Relaxed);
            if t == 0 {
                return refuse(retry_after());
            }
            let p = RateParams {
                t,
                burst: rec.fleet_fallback_burst.load(Ordering::Relaxed).max(1),
                excess: 0,
            };
            match p.take_undoable(&rec.fleet_fallback_tat, now_units, n) {
                (BucketVerdict::Green { new_tat } | BucketVerdict::Yellow { new_tat }, prev) => {
                    // Relaxed: a running total the daemon samples.
                    rec.fleet_fallback_used.fetch_add(n, Ordering::Relaxed);
                    Ok(Some(FleetTaken::Fallback { n, new_tat, prev }))
                }
                (BucketVerdict::Red { retry_after }, _) => {
                    refuse(Some(units_to_ns_ceil(retry_after)))
                }
                (BucketVerdict::Never, _) => refuse(None),
            }
        }
    }
}

/// Give back fleet tokens (a later check refused).
fn untake_fleet(ctx: &Ctx<'_>, t: &FleetTaken) {
    match *t {
        FleetTaken::Credit { epoch, n } => fleet::give_back(&ctx.rec.fleet_credit, epoch, n),
        FleetTaken::Fallback { n, new_tat, prev } => {
            if RateParams::untake(&ctx.rec.fleet_fallback_tat, new_tat, prev) {
                // Relaxed: a running total the daemon samples.
                ctx.rec.fleet_fallback_used.fetch_sub(n, Ordering::Relaxed);
            }
        }
    }
}

/// The largest cost admissible right now in `lane` (racy: a snapshot).
fn largest_now(ctx: &Ctx<'_>, p: &ClassParams, lane: usize, now_units: u64) -> u64 {
    let mut n = u64::MAX;
    if p.max_in_flight > 0 {
        let ceiling = p.ceiling(lane) as usize;
        let held = slots::in_flight(&ctx.slots[..ceiling.min(ctx.slots.len())]);
        n = n.min((ceiling as u64).saturating_sub(held));
    }
    if let Some(r) = &p.rate {
        // Relaxed: a snapshot for sizing; the take is a CAS.
        let tat = ctx.rec.tat.value.load(Ordering::Relaxed);
        let room = u128::from(r.max_cost()) * u128::from(r.t);
        let debt = u128::from(tat.saturating_sub(now_units));
        n = n.min((room.saturating_sub(debt) / u128::from(r.t.max(1))) as u64);
    }
    n
}

/// Tokens taken from a tenant's buckets: per bucket (rate, quota) the
/// `tat` stored and the one it replaced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TenantTaken {
    index: usize,
    undo: [Option<(u64, u64)>; 2],
}

/// Give back a tenant's tokens (only where nobody took since; never mints).
// Known shortcoming: a give-back lost to a racing take leaves the tenant a token short.
fn untake_tenant(region: &sluice_shm_layout::layout::Region, t: &TenantTaken) {
    let Some(rec) = tenant_record(region, t.index) else {
        return;
    };
    for (u, word) in t.undo.iter().zip([&rec.tat, &rec.quota_tat]) {
        if let Some((taken, prev)) = *u {
            RateParams::untake(word, taken, prev);
        }
    }
}

/// Give back what the checks took (a later check refused).
pub(crate) fn give_back(ctx: &Ctx<'_>, taken: &Taken) {
    if let Some(f) = &taken.fleet {
        untake_fleet(ctx, f);
    }
    if let Some(t) = &taken.tenant {
        untake_tenant(ctx.attached.map.region(), t);
    }
    if taken.retry {
        // Relaxed: a config value.
        retry::give_back(
            &ctx.rec.retry_tokens,
            ctx.rec.retry_burst.load(Ordering::Relaxed),
        );
    }
    let region = ctx.attached.map.region();
    for &d in &taken.probes {
        if let Some(dep) = d.checked_sub(1).and_then(|i| region.dep(i)) {
            // AcqRel: returns a probe taken by the bounded CAS in
            // `breaker::check`.
            let _ = dep
                .probes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1));
        }
    }
}

/// Finish an admission: a first attempt refills the retry budget.
pub(crate) fn after_admit(ctx: &Ctx<'_>, attempt: u32) {
    if attempt == 1 {
        // Relaxed: config values.
        let flags = ctx.rec.flags.load(Ordering::Relaxed);
        if flags & CLASS_RETRY_BUDGET != 0 {
            retry::refill(
                &ctx.rec.retry_tokens,
                ctx.rec.retry_ratio_ppm.load(Ordering::Relaxed),
                ctx.rec.retry_burst.load(Ordering::Relaxed),
            );
        }
    }
}

/// True when the class may grant nothing from its queue now: paused, or a
/// dependency not closed (half-open probes are taken by requests only).
pub(crate) fn held(ctx: &Ctx<'_>) -> bool {
    // Relaxed: policy bits and breaker modes, read as hints; the waiters
    // look again on their next wake-up.
    let flags = ctx.rec.flags.load(Ordering::Relaxed);
    if flags & CLASS_PAUSED != 0 {
        return true;
    }
    if flags & CLASS_HAS_DEPS == 0 {
        return false;
    }
    let region = ctx.attached.map.region();
    ctx.rec.deps.iter().any(|d| {
        d.load(Ordering::Relaxed)
            .checked_sub(1)
            .and_then(|i| region.dep(i))
            .is_some_and(|dep| {
                // Half-open counts as held: probes are taken by fresh
                // requests (bounded by the breaker), never by dispatch.
                let w = breaker::BreakerWord::decode(dep.state.load(Ordering::Relaxed));
                w.mode != breaker::CLOSED
            })
    })
}
