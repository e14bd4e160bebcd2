//! loom models of the wait queue (`queue::dispatch`, `queue::transition`,
//! `queue::release_tagged`) with the client's enqueue, release and barging
//! steps written out beside it: one class on the heap (its bucket word, slot
//! words, ticket records and `waiters` bits), each process a thread.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::admit::{self, Admission, Ask, ClassParams};
use sluice_shm_layout::queue::{
    self, ClassView, Dispatch, TicketRecord, TicketWord, TICKET_TAG_BIT, T_CANCELLED, T_CLAIMED,
    T_EXPIRED, T_GRANTED, T_GRANTING, T_QUEUED,
};
use sluice_shm_layout::slots::{self, Owner, SlotGrant};
use sluice_shm_layout::sync::{crash, futex_wait, AtomicU64, Ordering};

/// The client that owns the queued ticket.
const WAITER: Owner = Owner {
    index: 0,
    generation: 1,
};
/// A client that holds a slot, releases it and dispatches.
const HOLDER: Owner = Owner {
    index: 1,
    generation: 1,
};
/// A second dispatching client (or the newcomer that must not barge).
const OTHER: Owner = Owner {
    index: 2,
    generation: 1,
};
/// The interactive lane, where every ticket in these models waits.
const LANE: usize = 1;
/// CLOCK_MONOTONIC of every dispatch: before every ticket's deadline.
const NOW_NS: u64 = 1_000;
/// The tickets' deadline.
const DEADLINE_NS: u64 = 1_000_000;

/// One class as the region holds it.
struct Class {
    params: ClassParams,
    tat: AtomicU64,
    slots: Vec<AtomicU64>,
    tickets: Vec<TicketRecord>,
    waiters: AtomicU64,
}

impl Class {
    /// A class of `n` slots (every lane may use all of them), no rate, and
    /// `tickets` free ticket records.
    fn new(n: usize, tickets: usize) -> Arc<Self> {
        Arc::new(Self {
            params: ClassParams {
                max_in_flight: n as u32,
                soft_in_flight: n as u32,
                lane_ceiling: [n as u32; 4],
                rate: None,
                max_cost: 0,
                overcommit: false,
            },
            tat: AtomicU64::new(0),
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            tickets: (0..tickets).map(|_| TicketRecord::default()).collect(),
            waiters: AtomicU64::new(0),
        })
    }

    fn view(&self) -> ClassView<'_> {
        ClassView {
            params: self.params,
            tat: &self.tat,
            slots: &self.slots,
            tickets: &self.tickets,
            waiters: &self.waiters,
            age_after_ns: 0,
            held: false,
        }
    }

    /// `client` runs a dispatch, as `help` does.
    fn dispatch(&self, client: Owner) -> (Dispatch, u32) {
        queue::dispatch(&self.view(), client.index, NOW_NS, 0)
    }

    fn word(&self, t: &Ticket) -> TicketWord {
        TicketWord::decode(self.tickets[t.index].state.load(Ordering::Acquire))
    }

    /// Slot words carrying `tag`.
    fn holding(&self, tag: u64) -> u64 {
        self.slots
            .iter()
            .filter(|w| w.load(Ordering::Acquire) == tag)
            .count() as u64
    }
}

/// A ticket the waiter claimed and filled in.
#[derive(Clone, Copy, Debug)]
struct Ticket {
    index: usize,
    claimed: TicketWord,
    tag: u64,
}

impl Ticket {
    fn queued(&self) -> TicketWord {
        self.claimed.with(T_QUEUED, 0)
    }
}

/// The waiter claims a ticket record of cost `cost` and fills it in, as
/// `enqueue` does before it publishes (`wait.rs` `fill`).
fn claim_ticket(c: &Class, cost: u64) -> Ticket {
    let (index, generation) = queue::claim(&c.tickets, 0, WAITER.index).unwrap();
    let rec = &c.tickets[index as usize];
    let tag = WAITER.tag(TICKET_TAG_BIT | index);
    rec.tag.store(tag, Ordering::Relaxed);
    rec.cost.store(cost, Ordering::Relaxed);
    rec.lane.store(LANE as u32, Ordering::Relaxed);
    rec.enqueued_ns.store(0, Ordering::Relaxed);
    rec.deadline_ns.store(DEADLINE_NS, Ordering::Relaxed);
    rec.seq.store(u64::from(index), Ordering::Relaxed);
    let claimed = TicketWord {
        generation,
        state: T_CLAIMED,
        granter: 0,
        owner: WAITER.index + 1,
    };
    Ticket {
        index: index as usize,
        claimed,
        tag,
    }
}

/// The enqueuer's publish: waiters bit (SeqCst), `CLAIMED → QUEUED`, the bit
/// again.
fn publish(c: &Class, t: &Ticket) {
    c.waiters.fetch_or(1 << LANE, Ordering::SeqCst);
    queue::transition(&c.tickets[t.index], t.claimed, t.queued()).unwrap();
    c.waiters.fetch_or(1 << LANE, Ordering::SeqCst);
}

/// A ticket of cost `cost`, already `QUEUED` with its bit set.
fn queued_ticket(c: &Class, cost: u64) -> Ticket {
    let t = claim_ticket(c, cost);
    publish(c, &t);
    t
}

/// `owner` holds `n` slots (a permit from `try_acquire`).
fn hold(c: &Class, owner: Owner, n: u64) -> (SlotGrant, u64) {
    let tag = owner.tag(1);
    let g = slots::claim(&c.slots, c.slots.len(), c.slots.len(), n, tag).unwrap();
    (g, tag)
}

/// `Permit::release_slots` + `after_release`: free the slots (each a SeqCst
/// CAS), then read the bits (SeqCst) and dispatch only if one is set.
/// Returns the dispatch's result, if it ran.
fn release_then_hand_off(c: &Class, grant: &SlotGrant, tag: u64) -> Option<(Dispatch, u32)> {
    assert_eq!(slots::release(&c.slots, grant, tag), grant.count);
    // The real release is a SeqCst CAS then a SeqCst load of the bits, which
    // C++ orders in its single total order. loom models SeqCst accesses as
    // AcqRel (tokio-rs/loom#180), so this fence stands for that order.
    loom::sync::atomic::fence(Ordering::SeqCst);
    if c.waiters.load(Ordering::SeqCst) == 0 {
        return None;
    }
    Some(c.dispatch(HOLDER))
}

/// How the owner's attempt to end its queued ticket came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OwnerSaw {
    /// Its CAS from `QUEUED` won.
    Ended,
    /// A grant won first.
    Granted,
}

/// The owner ends its queued ticket (`to` = CANCELLED or EXPIRED) the way
/// `Ticket::cancel` and the wait loop do: CAS from `QUEUED`; meeting
/// `GRANTING`, let the granter finish.
fn owner_ends(c: &Class, t: &Ticket, to: u64) -> OwnerSaw {
    let rec = &c.tickets[t.index];
    loop {
        let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
        match w.state {
            T_QUEUED => {
                if queue::transition(rec, w, w.with(to, 0)).is_ok() {
                    return OwnerSaw::Ended;
                }
            }
            T_GRANTING => thread::yield_now(),
            T_GRANTED => return OwnerSaw::Granted,
            s => panic!("a queued ticket went to state {s}"),
        }
    }
}

/// A releaser dispatches while the owner ends its ticket with `to`.
fn owner_races_grant(to: u64) {
    loom::model(move || {
        let c = Class::new(1, 1);
        let t = queued_ticket(&c, 1);
        let d = {
            let c = Arc::clone(&c);
            thread::spawn(move || c.dispatch(HOLDER))
        };
        let o = {
            let c = Arc::clone(&c);
            thread::spawn(move || owner_ends(&c, &t, to))
        };
        let (_, granted) = d.join().unwrap();
        let saw = o.join().unwrap();

        let w = c.word(&t);
        match saw {
            OwnerSaw::Granted => {
                assert_eq!(w.state, T_GRANTED);
                assert_eq!(granted, 1, "the dispatcher does not know it granted");
                assert_eq!(c.holding(t.tag), 1, "a grant without its slot");
                assert_eq!(slots::in_flight(&c.slots), 1);
            }
            OwnerSaw::Ended => {
                assert_eq!(w.state, to, "the owner ended it, the word says {w:?}");
                assert_eq!(granted, 0, "granted and ended both");
                assert_eq!(slots::in_flight(&c.slots), 0, "an ended ticket kept a slot");
            }
        }
    });
}

// Real event: `sluice cancel` (or the owner dropping its ticket) cancels a
// queued ticket just as a releaser's dispatch picks it for a grant.
#[test]
fn cancel_races_grant() {
    owner_races_grant(T_CANCELLED);
}

// Real event: a waiter reaches its deadline and expires its ticket just as a
// releaser's dispatch picks it for a grant.
#[test]
fn expire_races_grant() {
    owner_races_grant(T_EXPIRED);
}

/// A new request in `LANE`: `try_acquire`'s barging check (a Relaxed load of
/// the bits), and with a bit at or above its lane set, `behind_waiters`:
/// dispatch, look again (SeqCst), refuse if a bit is still set, else decide.
fn newcomer(c: &Class) -> Option<SlotGrant> {
    let ahead = queue::bits_at_or_above(LANE);
    if c.waiters.load(Ordering::Relaxed) & ahead != 0 {
        c.dispatch(OTHER);
        if c.waiters.load(Ordering::SeqCst) & ahead != 0 {
            return None;
        }
    }
    let ask = Ask {
        cost: 1,
        lane: LANE,
    };
    match admit::decide(&c.params, &c.tat, &c.slots, ask, 0, OTHER.tag(1)) {
        Admission::Admitted { slots, .. } => Some(slots),
        Admission::Refused { .. } => None,
    }
}

// Real event: the holder of a class's only slot releases it while an
// interactive ticket waits, and at that moment a new interactive request
// calls try_acquire.
#[test]
fn release_handoff_vs_new_try_acquire() {
    loom::model(|| {
        let c = Class::new(1, 1);
        let (g, held) = hold(&c, HOLDER, 1);
        let t = queued_ticket(&c, 1);
        let a = {
            let c = Arc::clone(&c);
            thread::spawn(move || release_then_hand_off(&c, &g, held))
        };
        let b = {
            let c = Arc::clone(&c);
            thread::spawn(move || newcomer(&c))
        };
        let handed = a.join().unwrap();
        let barged = b.join().unwrap();

        let w = c.word(&t);
        assert!(
            barged.is_none(),
            "the newcomer barged past a queued ticket (ticket {w:?}, releaser {handed:?})"
        );
        assert_eq!(
            w.state,
            T_GRANTED,
            "the queued ticket was not handed the slot (releaser {handed:?}, bits {})",
            c.waiters.load(Ordering::SeqCst)
        );
        assert_eq!(c.holding(t.tag), 1);
        assert_eq!(slots::in_flight(&c.slots), 1, "more holders than slots");
    });
}

/// The enqueuer's side: publish, then dispatch itself.
fn enqueue_and_help(c: &Class, t: &Ticket) -> (Dispatch, u32) {
    publish(c, t);
    c.dispatch(WAITER)
}

// Real event: a request enqueues (its ticket needs the class's only slot)
// just as the holder of that slot releases it.
#[test]
fn no_lost_wakeup_enqueue_vs_release() {
    loom::model(|| {
        let c = Class::new(1, 1);
        let (g, held) = hold(&c, HOLDER, 1);
        let t = claim_ticket(&c, 1);
        let e = {
            let c = Arc::clone(&c);
            thread::spawn(move || enqueue_and_help(&c, &t))
        };
        let r = {
            let c = Arc::clone(&c);
            thread::spawn(move || release_then_hand_off(&c, &g, held))
        };
        let mine = e.join().unwrap();
        let theirs = r.join().unwrap();

        let w = c.word(&t);
        assert_eq!(
            w.state,
            T_GRANTED,
            "lost wake-up: enqueuer's dispatch {mine:?}, releaser's {theirs:?}, bits {}",
            c.waiters.load(Ordering::SeqCst)
        );
        assert_eq!(c.holding(t.tag), 1);
    });
}

/// Iterations of the waiter's loop in the model (a real waiter loops until
/// its deadline).
const WAIT_ROUNDS: usize = 3;

/// The waiter after enqueueing: the loop of `Ticket::wait`, bounded. Each
/// round: stop once the state is final, help, clear the futex word, re-read
/// the state and sleep (under loom: yield) only while still waiting.
/// Returns the state it ended on.
fn wait_loop(c: &Class, t: &Ticket) -> u64 {
    let rec = &c.tickets[t.index];
    for _ in 0..WAIT_ROUNDS {
        let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
        if w.state != T_QUEUED && w.state != T_GRANTING {
            return w.state;
        }
        c.dispatch(WAITER);
        rec.wake.swap(0, Ordering::AcqRel);
        let again = TicketWord::decode(rec.state.load(Ordering::Acquire));
        if again.state == T_QUEUED || again.state == T_GRANTING {
            futex_wait(&rec.wake, 0, 1);
        }
    }
    TicketWord::decode(rec.state.load(Ordering::Acquire)).state
}

// Real event: as above, and the waiter then sleeps on its futex word until
// it is granted (loom's futex_wait yields, so a sleep is a timeout).
#[test]
fn no_lost_wakeup_enqueue_vs_release_with_waiter_loop() {
    loom::model(|| {
        let c = Class::new(1, 1);
        let (g, held) = hold(&c, HOLDER, 1);
        let t = claim_ticket(&c, 1);
        let e = {
            let c = Arc::clone(&c);
            thread::spawn(move || {
                enqueue_and_help(&c, &t);
                wait_loop(&c, &t)
            })
        };
        let r = {
            let c = Arc::clone(&c);
            thread::spawn(move || release_then_hand_off(&c, &g, held))
        };
        let ended = e.join().unwrap();
        r.join().unwrap();
        assert_eq!(ended, T_GRANTED, "the waiter gave up still waiting");
        assert_eq!(c.word(&t).state, T_GRANTED);
        assert_eq!(c.holding(t.tag), 1);
    });
}

/// The daemon's recovery for a dead granter (`reclaim.rs`
/// `settle_tickets`): a ticket left `GRANTING` by `granter` gets the slots
/// carrying its tag back, then goes back to `QUEUED`.
fn settle_dead_granter(c: &Class, t: &Ticket, granter: Owner) {
    let rec = &c.tickets[t.index];
    let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
    if w.state == T_GRANTING && w.granter == granter.index + 1 {
        let tag = rec.tag.load(Ordering::Relaxed);
        queue::release_tagged(&c.slots, tag);
        if queue::transition(rec, w, w.with(T_QUEUED, 0)).is_ok() {
            queue::wake(rec);
        }
    }
}

/// Crash points on a granted dispatch of a cost-1 ticket: after
/// `QUEUED → GRANTING` (0), inside `slots::claim` after its CAS (1), before
/// `GRANTING → GRANTED` (2). k = 3 runs to the end.
const DISPATCH_POINTS: u32 = 3;
/// The point inside `slots::claim`: `crash_point!` returns `None` to
/// `take_for`, which carries on as if no slot were free (see
/// VERIFICATION.md), so no stop there is modelled.
const NESTED_POINT: u32 = 1;

// Real event: a client is SIGKILLed at any step of a dispatch that grants a
// queued ticket (k over the crash points; the last k finishes the grant);
// the daemon then rolls its half grant back.
#[test]
fn dead_granter_rolled_back() {
    for k in (0..=DISPATCH_POINTS).filter(|&k| k != NESTED_POINT) {
        loom::model(move || {
            let c = Class::new(1, 1);
            let t = queued_ticket(&c, 1);
            let d = {
                let c = Arc::clone(&c);
                thread::spawn(move || {
                    crash::arm(k);
                    c.dispatch(HOLDER)
                })
            };
            let (_, granted) = d.join().unwrap();
            assert_eq!(
                granted == 1,
                k == DISPATCH_POINTS,
                "crash point {k} not where expected"
            );

            settle_dead_granter(&c, &t, HOLDER);

            let w = c.word(&t);
            let held = c.holding(t.tag);
            match w.state {
                T_GRANTED => assert_eq!(held, 1, "granted without its slot (k = {k})"),
                T_QUEUED => assert_eq!(held, 0, "queued but holding a slot (k = {k})"),
                s => panic!("ticket left in state {s} after recovery (k = {k})"),
            }
            assert_eq!(slots::in_flight(&c.slots), held, "a slot leaked (k = {k})");
        });
    }
}

// Real event: two clients release their permits at once and both dispatch
// for the one ticket queued (cost 2) on a class with two free slots.
#[test]
fn two_dispatchers_one_ticket() {
    loom::model(|| {
        let c = Class::new(2, 1);
        let t = queued_ticket(&c, 2);
        let handles: Vec<_> = [HOLDER, OTHER]
            .into_iter()
            .map(|who| {
                let c = Arc::clone(&c);
                thread::spawn(move || c.dispatch(who))
            })
            .collect();
        let granted: u32 = handles.into_iter().map(|h| h.join().unwrap().1).sum();

        assert_eq!(granted, 1, "one ticket granted {granted} times");
        assert_eq!(c.word(&t).state, T_GRANTED);
        assert_eq!(c.holding(t.tag), 2, "the grant holds its cost in slots");
        assert_eq!(slots::in_flight(&c.slots), 2, "a loser kept a slot");
    });
}
