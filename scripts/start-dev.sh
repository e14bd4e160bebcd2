#!/usr/bin/env bash
# Build and install sluice and sluiced, start the daemon on the embedded
# default config in the background, and show it working.
#
# The region is /dev/shm/sluice (or $SLUICE_REGION); the log goes to
# ${SLUICE_LOG_FILE:-/tmp/sluiced.log}. Stop the daemon with
# `kill $(cat /tmp/sluiced.pid)` (it drains, then exits).
set -euo pipefail
cd "$(dirname "$0")/.."

log=${SLUICE_LOG_FILE:-/tmp/sluiced.log}
pidfile=${SLUICE_PID_FILE:-/tmp/sluiced.pid}

cargo install --quiet --locked --path daemon --root "${CARGO_HOME:-$HOME/.cargo}"
bin="${CARGO_HOME:-$HOME/.cargo}/bin"
case ":$PATH:" in
  *":$bin:"*) ;;
  *) echo "note: add $bin to your PATH to use sluice and sluiced from any shell" >&2
     export PATH="$bin:$PATH" ;;
esac

if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "sluiced is already running (pid $(cat "$pidfile")); log: $log"
else
  nohup sluiced >"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  # Wait (at most 10 s) until the daemon holds its region.
  for _ in $(seq 100); do
    if sluice stats --json 2>/dev/null | grep -q '"running": true'; then break; fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "sluiced exited at once; its log ($log) says:" >&2
      cat "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "sluiced started (pid $(cat "$pidfile")); log: $log"
fi
echo
sluice stats
echo
echo "Try:  sluice run --class default -- echo hi     # admitted: runs it"
echo "      sluice run --class one -- sleep 30 &      # holds the only slot of 'one'"
echo "      sluice run --class one -- echo hi         # refused: exit 75, says why"
echo "      sluice stats --json"
