//! Waiting: `acquire` with a deadline, `enqueue` to a [`Ticket`], and the
//! ticket's life (queued → granted, cancelled or expired).
//!
//! The protocol lives in `sluice_shm_layout::queue`; this module drives it
//! for one process: it claims a ticket record, publishes it, helps dispatch,
//! sleeps on the ticket's futex word and turns the final state into an
//! [`Outcome`].

use std::fmt;
use std::time::Duration;

use sluice_shm_layout::admit::{self, Admission, Ask};
use sluice_shm_layout::bucket::{ns_to_units, units_to_ns_ceil};
use sluice_shm_layout::counters::{self, Reason};
use sluice_shm_layout::queue::{
    self, ticket_id, Dispatch, EtaInput, TicketRecord, TicketWord, FLAG_BLOCKED_QUOTA,
    FLAG_CANCEL_REQUESTED, FLAG_DEGRADED, FLAG_IMMEDIATE, FLAG_TOO_LARGE, TICKET_TAG_BIT,
    T_CANCELLED, T_CLAIMED, T_EXPIRED, T_FREE, T_GRANTED, T_GRANTING, T_QUEUED,
};
use sluice_shm_layout::sync::{futex_wait, Ordering};

use crate::{clock, policy, AcquireError, ClassHandle, Ctx, Permit, Refusal, Request};

/// Longest a waiter sleeps before it looks again by itself (it is normally
/// woken at once; this bounds the delay if a granter died mid-grant).
const SAFETY_WAKE_NS: u64 = 100_000_000;

/// How a wait ended.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Granted (at once, or after waiting).
    Admitted(Permit<'a>),
    /// Refused without waiting (a reason that waiting cannot fix, a full
    /// queue, or no wait allowed).
    Refused(Refusal),
    /// The deadline passed, or the ETA was already beyond it.
    Expired(Expiry),
    /// Cancelled while queued (by the owner or `sluice cancel`).
    Cancelled {
        /// The ticket's id.
        ticket: u64,
    },
}

/// Details of an expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// The ticket's id (0 if it never got one).
    pub ticket: u64,
    /// How long it waited.
    pub waited: Duration,
    /// The ETA it had when it gave up, if known.
    pub eta: Option<Duration>,
    /// True when it expired at once because the ETA was past the deadline.
    pub at_once: bool,
}

impl fmt::Display for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at_once {
            write!(f, "expired at once: the ETA is beyond the deadline")?;
        } else {
            write!(f, "expired: waited {}", crate::fmt_duration(self.waited))?;
        }
        if let Some(e) = self.eta {
            write!(f, " (ETA {})", crate::fmt_duration(e))?;
        }
        Ok(())
    }
}

impl<'a> Outcome<'a> {
    /// The permit, if admitted.
    pub fn permit(self) -> Option<Permit<'a>> {
        match self {
            Outcome::Admitted(p) => Some(p),
            _ => None,
        }
    }
}

/// What `enqueue` returns: a decision now, or a ticket to wait on.
#[derive(Debug)]
pub enum Enqueued<'a> {
    /// A final answer already.
    Done(Outcome<'a>),
    /// Waiting in the queue.
    Queued(Ticket<'a>),
}

/// Where a ticket stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketState {
    /// Waiting: 1-based position in its class's queue and an honest ETA
    /// (`None` when unknown).
    Queued {
        /// Position (1 = next).
        position: u32,
        /// When it should be granted, if known.
        eta: Option<Duration>,
    },
    /// Granted: `wait` returns the permit.
    Granted,
    /// Cancelled.
    Cancelled,
    /// Expired.
    Expired,
}

/// A place in a class's queue. Dropping it cancels it (or releases what it
/// was granted).
pub struct Ticket<'a> {
    handle: &'a ClassHandle<'a>,
    /// Global ticket index.
    index: u32,
    /// The record's generation when we claimed it.
    generation: u32,
    deadline_ns: u64,
    enqueued_ns: u64,
    done: bool,
    /// What the policy checks took for this request (charged on grant,
    /// given back on cancel or expiry).
    taken: policy::Taken,
    attempt: u32,
    /// Set while the ticket is `blocked_by_quota`: its tenant's quota has
    /// no room yet; it joins the line once it has.
    blocked: Option<Blocked>,
}

/// A ticket waiting for its tenant's quota before it joins the line.
#[derive(Debug)]
struct Blocked {
    /// When the quota should have room (CLOCK_MONOTONIC ns).
    until_ns: u64,
    /// The tenant key (owned: the request's borrow ends with `enqueue`).
    tenant: String,
    lane: crate::Lane,
}

impl fmt::Debug for Ticket<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id())
            .field("class", &self.handle.name())
            .finish()
    }
}

impl<'c> ClassHandle<'c> {
    /// Wait up to `max_wait` (capped by the class's `max_wait`) for a
    /// permit. A zero `max_wait` never queues.
    pub fn acquire(
        &self,
        req: &Request<'_>,
        max_wait: Duration,
    ) -> Result<Outcome<'_>, AcquireError> {
        match self.enqueue_across_leases(req, max_wait)? {
            Enqueued::Done(o) => Ok(o),
            Enqueued::Queued(t) => Ok(t.wait()),
        }
    }

    /// [`ClassHandle::enqueue`], but a `fleet` refusal whose retry-after
    /// (the next lease, or the fallback bucket's refill) falls within
    /// `max_wait` (capped by the class's `max_wait`) sleeps until then and
    /// asks again, instead of returning. No ticket waits for a lease: the
    /// caller's thread does.
    pub fn enqueue_across_leases(
        &self,
        req: &Request<'_>,
        max_wait: Duration,
    ) -> Result<Enqueued<'_>, AcquireError> {
        let mut wait = max_wait;
        if let Some(rec) = self
            .client
            .attached
            .as_ref()
            .and_then(|a| self.record(a).ok())
        {
            // Relaxed: a config value.
            let cap = rec.max_wait_ns.load(Ordering::Relaxed);
            if cap > 0 {
                wait = wait.min(Duration::from_nanos(cap));
            }
        }
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.enqueue(req, left)? {
                Enqueued::Done(Outcome::Refused(no)) if no.reason == Reason::Fleet => {
                    let until = no.retry_after.map(|d| std::time::Instant::now() + d);
                    match until {
                        Some(t) if !left.is_zero() && t <= deadline => std::thread::sleep(
                            t.saturating_duration_since(std::time::Instant::now()),
                        ),
                        _ => return Ok(Enqueued::Done(Outcome::Refused(no))),
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Decide now, or take a ticket in the queue of the request's lane.
    pub fn enqueue(
        &self,
        req: &Request<'_>,
        max_wait: Duration,
    ) -> Result<Enqueued<'_>, AcquireError> {
        let ctx = match self.context(req)? {
            Ok(ctx) => ctx,
            Err(decision) => return Ok(Enqueued::Done(decision.into())),
        };
        let now_ns = clock::monotonic_ns();
        let lane = req.lane.index();
        let mut wait_ns = u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX);
        // Relaxed: a config value, clamped below.
        let cap = ctx.rec.max_wait_ns.load(Ordering::Relaxed);
        if cap > 0 {
            wait_ns = wait_ns.min(cap);
        }
        let deadline_ns = now_ns.saturating_add(wait_ns);
        // Relaxed: class policy bits; see `try_acquire`.
        let flags = ctx.rec.flags.load(Ordering::Relaxed);
        let mut taken = policy::Taken {
            cost: req.cost,
            ..policy::Taken::default()
        };
        let mut held = false;
        if flags & policy::POLICY_FLAGS != 0 || req.allow_partial || req.tenant.is_some() {
            match policy::gates(&ctx, req, flags, now_ns, wait_ns > 0)? {
                policy::Gates::Go(t) => taken = t,
                policy::Gates::Refuse(r) => {
                    let room_in_time = r.retry_after.is_some_and(|d| {
                        now_ns.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                            <= deadline_ns
                    });
                    if r.reason == Reason::Quota && wait_ns > 0 && room_in_time {
                        if let Some(t) = self.blocked_ticket(&ctx, req, now_ns, deadline_ns, r) {
                            return Ok(t);
                        }
                    }
                    return Ok(done_refused(self.refuse(
                        ctx.counts,
                        r.reason,
                        r.retry_after,
                        r.largest_cost,
                    )));
                }
                policy::Gates::Hold(t) => {
                    taken = t;
                    held = true;
                }
            }
        } else {
            let largest = ctx.params.largest_cost(lane);
            if req.cost > largest {
                return Ok(done_refused(self.refuse(
                    ctx.counts,
                    Reason::SmallerScope,
                    None,
                    Some(largest),
                )));
            }
        }
        let cost = taken.cost;

        let per_lane = ctx.lane_len;
        let range = lane * per_lane..(lane + 1) * per_lane;
        let pool = 4 * per_lane..ctx.tickets.len();
        // SeqCst: pairs with the enqueuers' SeqCst bit sets (no barging
        // past a ticket published before we looked).
        let ahead = held
            || ctx.rec.waiters.value.load(Ordering::SeqCst) & queue::bits_at_or_above(lane) != 0;
        if ahead {
            self.help(&ctx, now_ns);
        }
        let me = ctx.attached.owner.index;

        // Nobody ahead: try to grant at once, with a ticket from the pool
        // (so a permit held long takes no queue place).
        if !ahead {
            match queue::claim(&ctx.tickets[pool.clone()], pool.start as u32, me) {
                Some((index, generation)) => {
                    let (rec, ticket, claimed, tag) =
                        self.fill(&ctx, index, generation, req, cost, now_ns, deadline_ns);
                    let ticket = ticket.with_policy(taken, req.attempt);
                    let ask = Ask { cost, lane };
                    let now_units = ctx.now_units();
                    let verdict = admit::decide(
                        &ctx.params,
                        &ctx.rec.tat.value,
                        ctx.slots,
                        ask,
                        now_units,
                        tag,
                    );
                    match verdict {
                        Admission::Admitted { degraded, .. } => {
                            let flags = FLAG_IMMEDIATE | if degraded { FLAG_DEGRADED } else { 0 };
                            // Relaxed: published by the transition below.
                            rec.flags.store(flags, Ordering::Relaxed);
                            if queue::transition(rec, claimed, claimed.with(T_GRANTED, 0)).is_ok() {
                                policy::after_admit(&ctx, req.attempt);
                                return Ok(Enqueued::Done(Outcome::Admitted(
                                    ticket.into_permit(&ctx, degraded, false),
                                )));
                            }
                            // Only the reclaimer moves a live process's
                            // CLAIMED record.
                            return Err(AcquireError::Corrupt {
                                name: self.name.clone(),
                                what: "ticket revoked while claimed",
                            });
                        }
                        Admission::Refused {
                            reason,
                            retry_after_ns,
                            largest,
                        } => {
                            free_claimed(rec, claimed);
                            let mut t = ticket;
                            t.done = true;
                            if reason != Reason::NotNow || wait_ns == 0 {
                                policy::give_back(&ctx, &taken);
                                let retry = retry_after_ns.map(Duration::from_nanos);
                                return Ok(done_refused(
                                    self.refuse(ctx.counts, reason, retry, largest),
                                ));
                            }
                        }
                    }
                }
                None if wait_ns == 0 => {
                    // The pool is empty and the caller will not wait:
                    // decide without a ticket (counted once, there).
                    policy::give_back(&ctx, &taken);
                    return Ok(Enqueued::Done(self.try_acquire(req)?.into()));
                }
                // The pool is empty: go and wait in the queue.
                None => {}
            }
        } else if wait_ns == 0 {
            policy::give_back(&ctx, &taken);
            return Ok(done_refused(self.refuse(
                ctx.counts,
                Reason::NotNow,
                None,
                None,
            )));
        }

        // Wait in the lane's queue.
        let Some((index, generation)) =
            queue::claim(&ctx.tickets[range.clone()], range.start as u32, me)
        else {
            policy::give_back(&ctx, &taken);
            return Ok(done_refused(self.refuse(
                ctx.counts,
                Reason::QueueFull,
                None,
                None,
            )));
        };
        let (rec, ticket, claimed, _) =
            self.fill(&ctx, index, generation, req, cost, now_ns, deadline_ns);
        let ticket = ticket.with_policy(taken, req.attempt);
        let global = ctx.ticket_base + index;

        // Queue: sequence number, waiters bit, publish, bound, bit again.
        // Relaxed: only uniqueness and order of the numbers matter.
        let seq = ctx.rec.enqueue_seq.value.fetch_add(1, Ordering::Relaxed);
        rec.seq.store(seq, Ordering::Relaxed);
        let bit = 1u64 << lane;
        // SeqCst: see the no-lost-wake-up argument in queue.rs.
        ctx.rec.waiters.value.fetch_or(bit, Ordering::SeqCst);
        let queued = claimed.with(T_QUEUED, 0);
        if queue::transition(rec, claimed, queued).is_err() {
            return Err(AcquireError::Corrupt {
                name: self.name.clone(),
                what: "ticket revoked while claimed",
            });
        }
        // Relaxed: a config value.
        let depth = ctx.rec.queue_depth.load(Ordering::Relaxed).max(1);
        if queue::waiting_in(&ctx.tickets[range]) > depth
            && queue::transition(rec, queued, queued.with(T_FREE, 0)).is_ok()
        {
            let mut t = ticket;
            t.done = true;
            return Ok(done_refused(self.refuse(
                ctx.counts,
                Reason::QueueFull,
                None,
                None,
            )));
        }
        ctx.rec.waiters.value.fetch_or(bit, Ordering::SeqCst);

        // Expire at once when the ETA is known and already too late.
        if let TicketState::Queued { eta: Some(eta), .. } = ticket.state() {
            let eta_ns = u64::try_from(eta.as_nanos()).unwrap_or(u64::MAX);
            if now_ns.saturating_add(eta_ns) > deadline_ns
                && queue::transition(rec, queued, queued.with(T_EXPIRED, 0)).is_ok()
            {
                let mut t = ticket;
                t.done = true;
                free_terminal(rec, queued.with(T_EXPIRED, 0));
                self.count(&ctx, counters::EXPIRED);
                return Ok(Enqueued::Done(Outcome::Expired(Expiry {
                    ticket: ticket_id(global, generation),
                    waited: Duration::ZERO,
                    eta: Some(eta),
                    at_once: true,
                })));
            }
        }
        self.help(&ctx, now_ns);
        Ok(Enqueued::Queued(ticket))
    }

    /// Fill in a claimed record. Returns it, its ticket, its claimed state
    /// word and its slot tag.
    #[allow(clippy::too_many_arguments)]
    fn fill<'s, 'x>(
        &'s self,
        ctx: &'x Ctx<'s>,
        index: u32,
        generation: u32,
        req: &Request<'_>,
        cost: u64,
        now_ns: u64,
        deadline_ns: u64,
    ) -> (&'x TicketRecord, Ticket<'s>, TicketWord, u64) {
        let me = ctx.attached.owner.index;
        let rec = &ctx.tickets[index as usize];
        let global = ctx.ticket_base + index;
        let tag = ctx.attached.owner.tag(TICKET_TAG_BIT | global);
        // Relaxed: published by the SeqCst transition to QUEUED or GRANTED.
        rec.tag.store(tag, Ordering::Relaxed);
        rec.cost.store(cost, Ordering::Relaxed);
        rec.lane.store(req.lane.index() as u32, Ordering::Relaxed);
        rec.enqueued_ns.store(now_ns, Ordering::Relaxed);
        rec.deadline_ns.store(deadline_ns, Ordering::Relaxed);
        rec.pid.store(ctx.attached.pid, Ordering::Relaxed);
        rec.flags.store(0, Ordering::Relaxed);
        rec.wake.store(0, Ordering::Relaxed);
        let claimed = TicketWord {
            generation,
            state: T_CLAIMED,
            granter: 0,
            owner: (me + 1) & 0xFFFF,
        };
        let ticket = Ticket {
            handle: self,
            index: global,
            generation,
            deadline_ns,
            enqueued_ns: now_ns,
            done: false,
            taken: policy::Taken::default(),
            attempt: 1,
            blocked: None,
        };
        (rec, ticket, claimed, tag)
    }

    /// A ticket in its lane's queue that waits for its tenant's quota
    /// (`blocked_by_quota`) before it joins the line. `None` when the queue
    /// has no room (the caller then refuses `quota` as it would have).
    fn blocked_ticket<'s>(
        &'s self,
        ctx: &Ctx<'s>,
        req: &Request<'_>,
        now_ns: u64,
        deadline_ns: u64,
        refusal: Refusal,
    ) -> Option<Enqueued<'s>> {
        let lane = req.lane.index();
        let per_lane = ctx.lane_len;
        let range = lane * per_lane..(lane + 1) * per_lane;
        let me = ctx.attached.owner.index;
        let (index, generation) =
            queue::claim(&ctx.tickets[range.clone()], range.start as u32, me)?;
        let (rec, ticket, claimed, _) =
            self.fill(ctx, index, generation, req, req.cost, now_ns, deadline_ns);
        // Relaxed: published by the SeqCst transition to QUEUED below; the
        // flag keeps dispatch from granting it (see `queue::best`).
        rec.flags.store(FLAG_BLOCKED_QUOTA, Ordering::Relaxed);
        // Relaxed: only uniqueness and order of the numbers matter.
        let seq = ctx.rec.enqueue_seq.value.fetch_add(1, Ordering::Relaxed);
        rec.seq.store(seq, Ordering::Relaxed);
        if queue::transition(rec, claimed, claimed.with(T_QUEUED, 0)).is_err() {
            return None;
        }
        let wait = refusal.retry_after.unwrap_or_default();
        let mut ticket = ticket.with_policy(policy::Taken::default(), req.attempt);
        ticket.blocked = Some(Blocked {
            until_ns: now_ns.saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX)),
            tenant: req.tenant.unwrap_or_default().to_string(),
            lane: req.lane,
        });
        Some(Enqueued::Queued(ticket))
    }

    /// Run a dispatch for this class (grant queued tickets while capacity
    /// lasts).
    pub(crate) fn help(&self, ctx: &Ctx<'_>, now_ns: u64) -> Dispatch {
        let view = ctx.view();
        queue::dispatch(
            &view,
            ctx.attached.owner.index,
            now_ns,
            ctx.now_units_at(now_ns),
        )
        .0
    }

    fn count(&self, ctx: &Ctx<'_>, which: usize) {
        if let Some(c) = ctx.counts {
            counters::bump(&c.counts[which], 1);
        }
    }
}

fn done_refused(d: crate::Decision<'_>) -> Enqueued<'_> {
    Enqueued::Done(d.into())
}

impl<'a> From<crate::Decision<'a>> for Outcome<'a> {
    fn from(d: crate::Decision<'a>) -> Self {
        match d {
            crate::Decision::Admitted(p) => Outcome::Admitted(p),
            crate::Decision::Refused(r) => Outcome::Refused(r),
        }
    }
}

/// Give back a record we claimed and never published.
fn free_claimed(rec: &TicketRecord, claimed: TicketWord) {
    let _ = queue::transition(rec, claimed, claimed.with(T_FREE, 0));
}

/// Free a record in a terminal state we own.
fn free_terminal(rec: &TicketRecord, word: TicketWord) {
    let _ = queue::transition(
        rec,
        word,
        TicketWord {
            state: T_FREE,
            granter: 0,
            ..word
        },
    );
}

impl<'a> Ticket<'a> {
    fn with_policy(mut self, taken: policy::Taken, attempt: u32) -> Self {
        self.taken = taken;
        self.attempt = attempt;
        self
    }

    /// The ticket's id, as `sluice tickets` and `sluice cancel` show it.
    pub fn id(&self) -> u64 {
        ticket_id(self.index, self.generation)
    }

    fn ctx(&self) -> Option<Ctx<'a>> {
        self.handle
            .context(&Request::new())
            .ok()
            .and_then(|r| r.ok())
    }

    fn record<'r>(&self, ctx: &'r Ctx<'a>) -> Option<&'r TicketRecord> {
        ctx.tickets
            .get(self.index.checked_sub(ctx.ticket_base)? as usize)
    }

    /// Where the ticket stands now.
    pub fn state(&self) -> TicketState {
        let Some(ctx) = self.ctx() else {
            return TicketState::Expired;
        };
        let Some(rec) = self.record(&ctx) else {
            return TicketState::Expired;
        };
        // Acquire pairs with the SeqCst transitions of grant/cancel/expire.
        let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
        if w.generation != self.generation {
            return TicketState::Expired;
        }
        match w.state {
            T_GRANTED => TicketState::Granted,
            T_CANCELLED => TicketState::Cancelled,
            T_EXPIRED => TicketState::Expired,
            _ => {
                let local = (self.index - ctx.ticket_base) as usize;
                let now_ns = clock::monotonic_ns();
                // Relaxed: a config value.
                let age = ctx.rec.age_after_ns.load(Ordering::Relaxed);
                let (position, cost_ahead) =
                    queue::position(ctx.tickets, local, now_ns, age).unwrap_or((1, 0));
                let eta = queue::eta_ns(&EtaInput {
                    rate: ctx.params.rate.as_ref(),
                    // Relaxed: a snapshot for an estimate.
                    tat_units: ctx.rec.tat.value.load(Ordering::Relaxed),
                    now_units: ctx.now_units_at(now_ns),
                    has_slots: ctx.params.max_in_flight > 0,
                    slot_free: false,
                    position,
                    cost_ahead,
                    grants_per_sec_milli: ctx.rec.grant_rate_milli.load(Ordering::Relaxed),
                });
                TicketState::Queued {
                    position,
                    eta: eta.map(Duration::from_nanos),
                }
            }
        }
    }

    /// Block until granted, cancelled or expired.
    pub fn wait(mut self) -> Outcome<'a> {
        let Some(ctx) = self.ctx() else {
            self.done = true;
            return Outcome::Expired(self.expiry(false, None));
        };
        let Some(rec) = self.record(&ctx) else {
            self.done = true;
            return Outcome::Expired(self.expiry(false, None));
        };
        loop {
            // Acquire pairs with the SeqCst transitions of grant/cancel.
            let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
            if w.generation != self.generation {
                self.done = true;
                return Outcome::Expired(self.expiry(false, None));
            }
            match w.state {
                T_GRANTED => return self.granted(&ctx, rec),
                T_CANCELLED => {
                    self.done = true;
                    free_terminal(rec, w);
                    self.handle.count(&ctx, counters::CANCELLED);
                    policy::give_back(&ctx, &self.taken);
                    return Outcome::Cancelled { ticket: self.id() };
                }
                T_EXPIRED => {
                    self.done = true;
                    // Relaxed: written before the SeqCst transition we saw.
                    let too_large = rec.flags.load(Ordering::Relaxed) & FLAG_TOO_LARGE != 0;
                    free_terminal(rec, w);
                    if too_large {
                        let lane = rec.lane.load(Ordering::Relaxed) as usize;
                        let largest = ctx.params.largest_cost(lane);
                        let d = self.handle.refuse(
                            ctx.counts,
                            Reason::SmallerScope,
                            None,
                            Some(largest),
                        );
                        return d.into();
                    }
                    self.handle.count(&ctx, counters::EXPIRED);
                    policy::give_back(&ctx, &self.taken);
                    return Outcome::Expired(self.expiry(false, None));
                }
                T_QUEUED | T_GRANTING => {}
                _ => {
                    self.done = true;
                    return Outcome::Expired(self.expiry(false, None));
                }
            }
            let now_ns = clock::monotonic_ns();
            if w.state == T_QUEUED && now_ns < self.deadline_ns {
                if let Some(b) = &self.blocked {
                    if now_ns < b.until_ns {
                        // Not yet: sleep until the quota has room (a cancel
                        // wakes us through the futex word).
                        rec.wake.swap(0, Ordering::AcqRel);
                        let sleep = b.until_ns.min(self.deadline_ns) - now_ns;
                        futex_wait(&rec.wake, 0, sleep.clamp(1, SAFETY_WAKE_NS));
                        continue;
                    }
                    match self.unblock(&ctx, rec, now_ns) {
                        Ok(()) => continue,
                        Err(outcome) => return outcome,
                    }
                }
            }
            if now_ns >= self.deadline_ns && w.state == T_QUEUED {
                let eta = match self.state() {
                    TicketState::Queued { eta, .. } => eta,
                    _ => None,
                };
                if queue::transition(rec, w, w.with(T_EXPIRED, 0)).is_ok() {
                    self.done = true;
                    free_terminal(rec, w.with(T_EXPIRED, 0));
                    self.handle.count(&ctx, counters::EXPIRED);
                    policy::give_back(&ctx, &self.taken);
                    return Outcome::Expired(self.expiry(false, eta));
                }
                continue;
            }
            let stop = self.handle.help(&ctx, now_ns);
            let mut sleep = self.deadline_ns.saturating_sub(now_ns).min(SAFETY_WAKE_NS);
            if let Dispatch::BlockedTokens(units) = stop {
                sleep = sleep.min(units_to_ns_ceil(units).max(1_000));
            }
            // Relaxed: a config value.
            let age = ctx.rec.age_after_ns.load(Ordering::Relaxed);
            if age > 0 {
                // Announce our effective lane so newcomers there do not
                // overtake us, and wake at the next promotion.
                let lane = rec.lane.load(Ordering::Relaxed);
                let eff = queue::effective_lane(lane, self.enqueued_ns, now_ns, age);
                ctx.rec.waiters.value.fetch_or(1 << eff, Ordering::SeqCst);
                let waited = now_ns.saturating_sub(self.enqueued_ns);
                sleep = sleep.min(age - waited % age);
            }
            // AcqRel: Acquire pairs with a granter's Release store of 1, so
            // the state we re-read below is at least that new.
            rec.wake.swap(0, Ordering::AcqRel);
            let again = TicketWord::decode(rec.state.load(Ordering::Acquire));
            if again.state == T_QUEUED || again.state == T_GRANTING {
                futex_wait(&rec.wake, 0, sleep.max(1));
            }
        }
    }

    /// Cancel it. If a grant won the race, the permit is returned instead.
    pub fn cancel(mut self) -> Outcome<'a> {
        let Some(ctx) = self.ctx() else {
            self.done = true;
            return Outcome::Cancelled { ticket: self.id() };
        };
        let Some(rec) = self.record(&ctx) else {
            self.done = true;
            return Outcome::Cancelled { ticket: self.id() };
        };
        loop {
            // Acquire pairs with the SeqCst transitions of grant/cancel.
            let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
            if w.generation != self.generation {
                self.done = true;
                return Outcome::Cancelled { ticket: self.id() };
            }
            match w.state {
                T_QUEUED => {
                    if queue::transition(rec, w, w.with(T_CANCELLED, 0)).is_ok() {
                        self.done = true;
                        free_terminal(rec, w.with(T_CANCELLED, 0));
                        self.handle.count(&ctx, counters::CANCELLED);
                        policy::give_back(&ctx, &self.taken);
                        return Outcome::Cancelled { ticket: self.id() };
                    }
                }
                // A granter is mid-way (a few atomic steps): let it finish.
                T_GRANTING => std::thread::yield_now(),
                T_GRANTED => return self.granted(&ctx, rec),
                _ => return self.wait(),
            }
        }
    }

    fn granted(mut self, ctx: &Ctx<'a>, rec: &TicketRecord) -> Outcome<'a> {
        // Relaxed: written before the SeqCst transition to GRANTED we saw.
        let flags = rec.flags.load(Ordering::Relaxed);
        let degraded = flags & FLAG_DEGRADED != 0;
        let from_queue = flags & FLAG_IMMEDIATE == 0;
        self.done = true;
        let waited = clock::monotonic_ns().saturating_sub(self.enqueued_ns);
        if from_queue {
            let b = crate::hist_bucket(waited / 1_000);
            if let Some(h) = ctx.rec.wait_hist.get(b) {
                // Relaxed: a histogram counter.
                h.fetch_add(1, Ordering::Relaxed);
            }
        }
        policy::after_admit(ctx, self.attempt);
        Outcome::Admitted(self.into_permit(ctx, degraded, from_queue))
    }

    fn into_permit(mut self, ctx: &Ctx<'a>, degraded: bool, from_queue: bool) -> Permit<'a> {
        self.done = true;
        let rec = &ctx.tickets[(self.index - ctx.ticket_base) as usize];
        // Relaxed: our own record, written by us or before the grant we saw.
        let cost = rec.cost.load(Ordering::Relaxed);
        let tag = rec.tag.load(Ordering::Relaxed);
        if let Some(c) = ctx.counts {
            counters::bump(&c.counts[counters::ADMITTED], 1);
            if degraded {
                counters::bump(&c.counts[counters::DEGRADED], 1);
            }
            if from_queue {
                counters::bump(&c.counts[counters::GRANTED_FROM_QUEUE], 1);
            }
        }
        Permit::from_ticket(
            self.handle,
            ctx,
            tag,
            cost,
            degraded,
            (self.index, self.generation),
        )
    }

    /// The blocked ticket's quota should have room: take it and join the
    /// line, or wait again, or end with the refusal a re-check gives.
    fn unblock(
        &mut self,
        ctx: &Ctx<'a>,
        rec: &TicketRecord,
        now_ns: u64,
    ) -> Result<(), Outcome<'a>> {
        let Some(b) = self.blocked.take() else {
            return Ok(());
        };
        // Relaxed: our own record.
        let cost = rec.cost.load(Ordering::Relaxed);
        let req = Request {
            cost,
            lane: b.lane,
            attempt: self.attempt,
            tenant: Some(&b.tenant),
            allow_partial: false,
        };
        // Relaxed: class policy bits, as in `try_acquire`.
        let flags = ctx.rec.flags.load(Ordering::Relaxed);
        match policy::gates(ctx, &req, flags, now_ns, true) {
            Ok(policy::Gates::Go(t) | policy::Gates::Hold(t)) => {
                self.taken = t;
                // Relaxed: a hint for dispatch, ordered before the SeqCst
                // bit set below that makes dispatchers look.
                rec.flags.fetch_and(!FLAG_BLOCKED_QUOTA, Ordering::Relaxed);
                let bit = 1u64 << b.lane.index();
                // SeqCst: see the enqueue path (no lost wake-up).
                ctx.rec.waiters.value.fetch_or(bit, Ordering::SeqCst);
                self.handle.help(ctx, now_ns);
                Ok(())
            }
            Ok(policy::Gates::Refuse(r))
                if r.reason == Reason::Quota && r.retry_after.is_some() =>
            {
                let wait = r.retry_after.unwrap_or_default();
                self.blocked = Some(Blocked {
                    until_ns: now_ns
                        .saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX)),
                    ..b
                });
                Ok(())
            }
            Ok(policy::Gates::Refuse(r)) => Err(self.end_refused(ctx, rec, r)),
            Err(_) => Err(self.end_refused(
                ctx,
                rec,
                Refusal {
                    reason: Reason::Quota,
                    retry_after: None,
                    largest_cost: None,
                },
            )),
        }
    }

    /// End a ticket of ours that is still queued with a refusal.
    fn end_refused(&mut self, ctx: &Ctx<'a>, rec: &TicketRecord, r: Refusal) -> Outcome<'a> {
        // Acquire pairs with the SeqCst transitions of the ticket.
        let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
        if w.generation == self.generation && w.state == T_QUEUED {
            let _ = queue::transition(rec, w, w.with(T_FREE, 0));
        }
        self.done = true;
        self.handle
            .refuse(ctx.counts, r.reason, r.retry_after, r.largest_cost)
            .into()
    }

    fn expiry(&self, at_once: bool, eta: Option<Duration>) -> Expiry {
        Expiry {
            ticket: self.id(),
            waited: Duration::from_nanos(clock::monotonic_ns().saturating_sub(self.enqueued_ns)),
            eta,
            at_once,
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Dropped while waiting: cancel, or release a grant that won.
        let t = Ticket {
            handle: self.handle,
            index: self.index,
            generation: self.generation,
            deadline_ns: self.deadline_ns,
            enqueued_ns: self.enqueued_ns,
            done: false,
            taken: self.taken,
            attempt: self.attempt,
            blocked: self.blocked.take(),
        };
        self.done = true;
        drop(t.cancel());
    }
}

/// Whether a granted ticket's holder was asked to stop.
pub(crate) fn cancel_requested(rec: &TicketRecord) -> bool {
    // Relaxed: a polled flag; acting on it a moment late is fine.
    rec.flags.load(Ordering::Relaxed) & FLAG_CANCEL_REQUESTED != 0
}

/// Free a granted ticket's record after its permit released its slots.
pub(crate) fn free_granted(rec: &TicketRecord, generation: u32) {
    // Acquire pairs with the SeqCst transition to GRANTED.
    let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
    if w.generation == generation && w.state == T_GRANTED {
        let _ = queue::transition(rec, w, w.with(T_FREE, 0));
    }
}

/// Bucket time of `now_ns` for a region epoch.
pub(crate) fn units_at(now_ns: u64, epoch_ns: u64) -> u64 {
    ns_to_units(now_ns.saturating_sub(epoch_ns))
}
