#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and cross-process tests, and
# the loom models with a bounded search. README.md and .ci/run run this.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (unit, doc and cross-process tests)"
cargo test --workspace --locked

echo "== loom models (LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:=3}, release with debug assertions)"
# Own target dir: --cfg loom rebuilds every crate differently.
RUSTFLAGS="--cfg loom -C debug-assertions" LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS \
  CARGO_TARGET_DIR=target/loom \
  cargo test --locked --release -p sluice-loom-tests --tests
