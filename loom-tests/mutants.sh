#!/usr/bin/env bash
# Plant, one at a time, each bug a loom model guards; run that one model and
# expect it to fail; restore the file. Ends with "caught N of M".
#
# Usage: loom-tests/mutants.sh [MUTANT-NAME...]   (no names: all of them)
#
# Each mutant is a perl substitution (whitespace-tolerant, so rustfmt's line
# breaks do not matter) that must match exactly once in one file of
# shm-layout. The header mutants are the exception: `Region` does not exist
# under loom, so they are planted in the model's own mirror of it
# (loom-tests/tests/header.rs). The original bytes are kept in a temporary copy and written back
# right after the run (with a fresh mtime, so every cargo target dir rebuilds
# the file), and by a trap on any exit or interrupt. If someone else rewrote
# the file while the mutant was in place, it is not overwritten: the script
# stops and says so.
set -u

cd "$(dirname "$0")/.."
export RUSTFLAGS="--cfg loom"
export LOOM_MAX_PREEMPTIONS=3
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-loom}

work=$(mktemp -d)
target_file=""

restore() {
    if [ -n "$target_file" ]; then
        local f=$target_file
        target_file=""
        if ! cmp -s "$work/mutated" "$f"; then
            cp "$f" "$work/foreign-edit"
            echo "FATAL: $f changed while a mutant was planted; not restoring." >&2
            echo "  original: $work/orig  mutated: $work/mutated  now: $work/foreign-edit" >&2
            trap - EXIT
            exit 3
        fi
        # `cat >` keeps the inode and gives the file a new mtime.
        cat "$work/orig" >"$f"
        if ! cmp -s "$work/orig" "$f"; then
            echo "FATAL: could not restore $f from $work/orig" >&2
            trap - EXIT
            exit 2
        fi
    fi
}
trap 'restore; rm -rf "$work"' EXIT
trap 'restore; exit 130' INT TERM HUP

run_model() { # test-file test-name log
    cargo test -p sluice-loom-tests --release --test "$1" -- --exact "$2" >"$3" 2>&1
}

caught=0
total=0
missed=()
only=("$@")

selected() {
    [ ${#only[@]} -eq 0 ] && return 0
    local n
    for n in "${only[@]}"; do
        [ "$n" = "$1" ] && return 0
    done
    return 1
}

# mutant NAME FILE TEST-FILE TEST-NAME PERL-REGEX REPLACEMENT
mutant() {
    local name=$1 file=$2 tfile=$3 tname=$4
    selected "$name" || return 0
    total=$((total + 1))
    local hits
    hits=$(PAT=$5 perl -0777 -ne 'my $n = () = /$ENV{PAT}/g; print $n' "$file")
    if [ "$hits" != 1 ]; then
        echo "NOT APPLIED  $name: pattern matches $hits times in $file (want 1)"
        missed+=("$name (not applied)")
        return
    fi
    cp "$file" "$work/orig"
    target_file=$file
    PAT=$5 REP=$6 perl -0777 -pi -e 's/$ENV{PAT}/$ENV{REP}/ee' "$file"
    cp "$file" "$work/mutated"
    local log="$work/$name.log"
    run_model "$tfile" "$tname" "$log"
    restore
    if grep -q "^test $tname \.\.\. FAILED" "$log"; then
        caught=$((caught + 1))
        echo "caught       $name  by  $tfile::$tname"
    elif grep -q "^error" "$log"; then
        echo "BUILD ERROR  $name: the mutant does not compile"
        grep -A5 "^error" "$log" | head -20
        missed+=("$name (build error)")
    else
        echo "MISSED       $name  by  $tfile::$tname"
        missed+=("$name")
    fi
}

# Baseline: every model passes on the unmodified tree.
if ! cargo test -q -p sluice-loom-tests --release --tests >"$work/baseline.log" 2>&1; then
    echo "baseline run failed: the models must pass before mutants mean anything" >&2
    tail -40 "$work/baseline.log" >&2
    exit 2
fi

B=shm-layout/src/bucket.rs
S=shm-layout/src/slots.rs
A=shm-layout/src/admit.rs
R=shm-layout/src/registry.rs
Q=shm-layout/src/queue.rs
F=shm-layout/src/fleet.rs
K=shm-layout/src/breaker.rs
Y=shm-layout/src/retry.rs
H=loom-tests/tests/header.rs

# The replacement is a perl expression (evaluated with /ee); `$1` is the
# first group of the pattern.

# bucket: a failed CAS is taken for success (tokens admitted on a stale tat).
mutant bucket-cas-failure-is-success $B bucket concurrent_takers_never_exceed_gcra \
    'Err\(actual\) => \{\s*cur = actual;' \
    '"Err(actual) => { let _ = actual; return verdict;"'
# bucket: blind store of tat' instead of a CAS.
mutant bucket-blind-store $B bucket stale_clock_taker_never_moves_tat_backwards \
    'tat\s*\.compare_exchange_weak\(cur, new_tat, Ordering::AcqRel, Ordering::Acquire\)' \
    '"{ tat.store(new_tat, Ordering::Release); Ok::<u64, u64>(cur) }"'
# bucket: tat' computed from now alone (drops max(tat, now)).
mutant bucket-drops-max $B bucket stale_clock_taker_never_moves_tat_backwards \
    'u128::from\(tat\)\.max\(now_w\)' \
    '"now_w"'

# slots: claim is a load-then-store instead of CAS(0 -> tag).
mutant slots-claim-load-then-store $S slots two_claimers_race_for_one_slot \
    'word\s*\.compare_exchange\(0, tag, Ordering::Acquire, Ordering::Relaxed\)\s*\.is_err\(\)' \
    '"{ word.store(tag, Ordering::Release); false }"'
# slots: claim ignores the lane ceiling.
mutant slots-ignores-lane-ceiling $S slots three_claimers_two_slots_lane_ceilings \
    'let ceiling = ceiling\.min\(slots\.len\(\)\);' \
    '"let ceiling = slots.len();"'
# slots: a refused cost-n claim keeps the words it took.
mutant slots-claim-keeps-partial $S slots cost_two_races_cost_one_on_two_slots \
    '\n\s*release\(slots, &grant, tag\);(\s*None\s*\})' \
    '"$1"'
# slots: release CAS weakened to Relaxed (work not published to next holder).
mutant slots-release-relaxed $S slots release_hands_work_to_next_holder \
    'compare_exchange\(tag, 0, Ordering::SeqCst, Ordering::Relaxed\)' \
    '"compare_exchange(tag, 0, Ordering::Relaxed, Ordering::Relaxed)"'
# slots: claim CAS weakened to Relaxed (previous holder's work not acquired).
mutant slots-claim-relaxed $S slots release_hands_work_to_next_holder \
    'compare_exchange\(0, tag, Ordering::Acquire, Ordering::Relaxed\)' \
    '"compare_exchange(0, tag, Ordering::Relaxed, Ordering::Relaxed)"'

# reclaim: the owner check is skipped (a live client's slot is freed).
mutant reclaim-skips-owner-check $S reclaim crash_in_claim_then_reclaim \
    'cur != 0\s*&&\s*cur & OWNER_MASK == bits\s*&&' \
    '"cur != 0 &&"'
# release: gives back all but the last word of a permit.
mutant release-forgets-last-word $S reclaim crash_in_release_then_reclaim \
    'let known = \(grant\.count as usize\)\.min\(INLINE_SLOTS\);' \
    '"let known = (grant.count as usize).min(INLINE_SLOTS).saturating_sub(1);"'
# reclaim: stops after the first word it frees.
mutant reclaim-stops-after-first $S reclaim crash_in_admit_then_reclaim \
    '(release_one\(word, cur\)\s*\{\s*freed \+= 1;)' \
    '"$1 break;"'
# admit: a bucket refusal forgets to give back the slots it took.
mutant admit-red-keeps-slots $A reclaim crash_in_admit_refusal_then_reclaim \
    '(BucketVerdict::Red \{ retry_after \} => \{\s*)slots::release\(slot_words, &grant, tag\);' \
    '"${1}let _ = &grant;"'
# release: a blind store of 0 instead of CAS(tag -> 0).
mutant release-blind-store $S reclaim stale_release_after_reclaim_spares_new_holder \
    'word\s*\.compare_exchange\(tag, 0, Ordering::SeqCst, Ordering::Relaxed\)\s*\.is_ok\(\)' \
    '"{ let _ = tag; word.store(0, Ordering::Release); true }"'

# registry: claim is a load-then-store instead of a CAS.
mutant registry-claim-load-then-store $R registry two_processes_claim_distinct_records \
    'word\s*\.compare_exchange\(cur, next, Ordering::AcqRel, Ordering::Relaxed\)\s*\.is_ok\(\)' \
    '"{ word.store(next, Ordering::Release); true }"'
# registry: claim takes records that are not FREE.
mutant registry-claim-skips-state-check $R registry claim_on_full_registry_one_gets_none \
    'if st\.state != CLIENT_FREE \{' \
    '"if st.state == u64::MAX {"'
# registry: transition is a load-compare-store instead of a CAS.
mutant registry-transition-load-then-store $R registry activate_races_dead_transition \
    'word\s*\.compare_exchange\(a, b, Ordering::AcqRel, Ordering::Acquire\)\s*\.is_ok\(\)' \
    '"if word.load(Ordering::Acquire) == a { word.store(b, Ordering::Release); true } else { false }"'

# queue: the grant's QUEUED -> GRANTING CAS is a blind store.
mutant queue-grant-blind-store $Q queue cancel_races_grant \
    'if transition\(rec, cur, granting\)\.is_err\(\)' \
    '"if { rec.state.store(granting.encode(), Ordering::SeqCst); false }"'
# queue: transition is a load-compare-store instead of a CAS.
mutant queue-transition-load-then-store $Q queue expire_races_grant \
    'rec\.state\s*\.compare_exchange\(\s*expect\.encode\(\),\s*to\.encode\(\),\s*Ordering::SeqCst,\s*Ordering::SeqCst,?\s*\)' \
    '"{ let cur = rec.state.load(Ordering::SeqCst); if cur == expect.encode() { rec.state.store(to.encode(), Ordering::SeqCst); Ok(cur) } else { Err(cur) } }"'
# queue: a dispatcher that lost the GRANTING CAS grants anyway.
mutant dispatch-ignores-lost-granting $Q queue two_dispatchers_one_ticket \
    'if transition\(rec, cur, granting\)\.is_err\(\) \{\s*continue;\s*\}' \
    '"let _ = transition(rec, cur, granting);"'
# queue: GRANTING does not record the granter (its death can't be undone).
mutant granting-forgets-granter $Q queue dead_granter_rolled_back \
    'cur\.with\(T_GRANTING, \(granter \+ 1\) & 0xFFFF\)' \
    '"cur.with(T_GRANTING, 0)"'
# queue: release_tagged misses the last slot word (recovery leaks it).
mutant release-tagged-skips-last-word $Q queue dead_granter_rolled_back \
    'for w in words \{(\s*// Relaxed: a hint; `release_one` is the decision)' \
    '"for w in &words[..words.len().saturating_sub(1)] {$1"'
# queue: a blocked grant leaves the ticket GRANTING (no roll back to QUEUED).
mutant dispatch-blocked-keeps-granting $Q queue no_lost_wakeup_enqueue_vs_release_with_waiter_loop \
    'let _ = transition\(rec, granting, cur\);' \
    '"let _ = (granting, cur);"'
# queue: a dispatcher that rolled a ticket back does not look again for a
# slot freed while it was GRANTING (lost wake-up).
mutant dispatch-rollback-no-second-look $Q queue no_lost_wakeup_enqueue_vs_release \
    '&& !retried' \
    '"&& false"'
# queue: clearing idle bits ignores lanes with a ticket being granted.
mutant clear-bits-ignores-granting $Q queue release_handoff_vs_new_try_acquire \
    'if again\.queued\[lane\] > 0 \|\| again\.granting\[lane\] > 0 \{' \
    '"if again.queued[lane] > 0 {"'

# fleet: a give-back ignores the epoch (lands in the next lease).
mutant fleet-give-back-ignores-epoch $F fleet renew_races_take_and_give_back \
    '\(epoch\(w\) == taken_epoch\)\.then' \
    '"(true || epoch(w) == taken_epoch).then"'
# fleet: a take that does not check the tokens left.
mutant fleet-take-overdraws $F fleet two_takers_one_token \
    '\(tokens\(w\) >= n\)\.then\(\|\| w - n\)' \
    '"Some(w.wrapping_sub(n) & (TOKEN_MASK | !TOKEN_MASK))"'

# breaker: the half-open probe is an unconditional fetch_add (every
# request probes).
mutant breaker-probe-unbounded $K breaker half_open_admits_at_most_the_probes \
    'let taken = dep\s*\.probes\s*\.fetch_update\([^;]*\);' \
    '"let taken = Ok::<u64, u64>(dep.probes.fetch_add(1, Ordering::AcqRel)); let _ = allowed;"'
# breaker: the probe bound is checked by a load, then the count stored.
mutant breaker-probe-load-then-store $K breaker half_open_admits_at_most_the_probes \
    'let taken = dep\s*\.probes\s*\.fetch_update\([^;]*\);' \
    '"let p = dep.probes.load(Ordering::Acquire); let taken = if p < allowed { dep.probes.store(p + 1, Ordering::Release); Ok(p) } else { Err(p) };"'
# breaker: `trip` is a blind store of the state word instead of a CAS.
mutant breaker-trip-blind-store $K breaker trip_races_evaluate \
    'if set\(dep, cur, OPEN, true, 0\)' \
    '"if { dep.open_until_ns.store(0, Ordering::Relaxed); let next = BreakerWord { epoch: BreakerWord::decode(cur).epoch.wrapping_add(1), mode: OPEN, manual: true }; dep.state.store(next.encode(), Ordering::SeqCst); true }"'
# breaker: `report` counts by a load then a store (an outcome is lost).
mutant breaker-report-load-then-store $K breaker report_then_evaluate_opens \
    'c\.fetch_add\(1, Ordering::Relaxed\);' \
    '"c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);"'
# breaker: the window reset zeroes the counters instead of taking off what
# it counted (outcomes reported meanwhile are lost).
mutant breaker-window-reset-stores-zero $K breaker report_then_evaluate_opens \
    'dep\.successes\.fetch_sub\(s, Ordering::Relaxed\);\s*dep\.failures\.fetch_sub\(f, Ordering::Relaxed\);' \
    '"dep.successes.store(0, Ordering::Relaxed); dep.failures.store(0, Ordering::Relaxed);"'
# breaker: a transition keeps the probe count (the next half-open is stuck).
mutant breaker-set-keeps-probes $K breaker heal_races_probe \
    'dep\.probes\.store\(0, Ordering::Relaxed\);' \
    '""'

# retry: `take` is a load then a store instead of a CAS.
mutant retry-take-load-then-store $Y retry retries_never_exceed_the_budget \
    'tokens\s*\.fetch_update\(Ordering::AcqRel, Ordering::Acquire, \|t\| t\.checked_sub\(UNIT\)\)\s*\.is_ok\(\)' \
    '"match tokens.load(Ordering::Acquire).checked_sub(UNIT) { Some(n) => { tokens.store(n, Ordering::Release); true } None => false }"'
# retry: `refill` ignores the cap.
mutant retry-refill-uncapped $Y retry retries_never_exceed_the_budget \
    't\.saturating_add\(ppm\)\.min\(cap\)' \
    '"{ let _ = cap; t.saturating_add(ppm) }"'
# retry: `refill` (and so `give_back`) is a load then a store.
mutant retry-refill-load-then-store $Y retry give_back_never_mints \
    'let _ = tokens\.fetch_update\(Ordering::AcqRel, Ordering::Acquire, \|t\| \{\s*let next = t\.saturating_add\(ppm\)\.min\(cap\);\s*\(next != t\)\.then_some\(next\)\s*\}\);' \
    '"let t = tokens.load(Ordering::Acquire); tokens.store(t.saturating_add(ppm).min(cap), Ordering::Release);"'

# header (in the model's mirror of `publish`): the version is published
# Relaxed.
mutant header-publish-relaxed $H header attach_sees_a_whole_header_or_none \
    '\.store\(LAYOUT_VERSION, Ordering::Release\)' \
    '".store(LAYOUT_VERSION, Ordering::Relaxed)"'
# header (in the model's mirror of `attach`): the version is loaded Relaxed.
mutant header-attach-relaxed $H header attach_sees_a_whole_header_or_none \
    'h\.layout_version\.load\(Ordering::Acquire\)' \
    '"h.layout_version.load(Ordering::Relaxed)"'

echo "caught $caught of $total"
if [ "$caught" -lt "$total" ]; then
    printf 'not caught: %s\n' "${missed[@]}"
    exit 1
fi
