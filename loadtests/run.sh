#!/usr/bin/env bash
# Run a load scenario headless on loopback: start its upstream mocks and fastroute, run locust for a fixed
# time, print the stats, stop everything it started.
#
#   loadtests/run.sh SCENARIO            e.g. loadtests/run.sh mixed
#   USERS=50 RUN_TIME=60s loadtests/run.sh mixed     (environment overrides scenario.env)
#
# A scenario is loadtests/scenarios/SCENARIO/ with config.yaml (fastroute config; upstream URLs come in as
# ${NAME_URL}), locustfile.py, and scenario.env (MOCKS, USERS, SPAWN_RATE, RUN_TIME, STOP_TIMEOUT).
# Results (locust CSV and logs) go to bench-results/load-SCENARIO-<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCENARIO="${1:?usage: loadtests/run.sh SCENARIO (one of: $(ls "$ROOT/loadtests/scenarios" | tr '\n' ' '))}"
DIR="$ROOT/loadtests/scenarios/$SCENARIO"
[[ -d "$DIR" ]] || { echo "no scenario $DIR" >&2; exit 2; }
BIN="${VENV:-$ROOT/.venv}/bin"
PY="$BIN/python"

# scenario defaults; anything already set in the environment wins
_env_users="${USERS:-}" _env_rate="${SPAWN_RATE:-}" _env_time="${RUN_TIME:-}" _env_stop="${STOP_TIMEOUT:-}"
# shellcheck disable=SC1091
source "$DIR/scenario.env"
USERS="${_env_users:-${USERS:-20}}"
SPAWN_RATE="${_env_rate:-${SPAWN_RATE:-10}}"
RUN_TIME="${_env_time:-${RUN_TIME:-20s}}"
STOP_TIMEOUT="${_env_stop:-${STOP_TIMEOUT:-10}}"

OUT="$ROOT/bench-results/load-$SCENARIO-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        # each service was started in its own session (setsid): stop its whole process group
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT INT TERM

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_http() {  # URL PID NAME
    local i
    for i in $(seq 150); do
        if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; then
            return 0
        fi
        kill -0 "$2" 2>/dev/null || { echo "$3 exited early; its log:" >&2; tail -n 30 "$OUT/$3.log" >&2; exit 1; }
        sleep 0.2
    done
    echo "$3 not ready at $1 after 30 s; its log:" >&2
    tail -n 30 "$OUT/$3.log" >&2
    exit 1
}

# upstream mocks: NAME:model:adapters:ttft_ms:tps
for spec in $MOCKS; do
    IFS=: read -r name model adapters ttft tps <<<"$spec"
    port="$(free_port)"
    args=(mock --port "$port" --model "$model" --ttft-ms "$ttft" --tps "$tps" --name "$name")
    [[ -n "$adapters" ]] && args+=(--adapters "$adapters")
    setsid "$BIN/fastroute" "${args[@]}" >"$OUT/mock-$name.log" 2>&1 &
    PIDS+=($!)
    export "${name}_URL=http://127.0.0.1:$port"
    wait_http "http://127.0.0.1:$port/health" "$!" "mock-$name"
    echo "mock $name ($model${adapters:+ + $adapters}, ttft ${ttft} ms, ${tps} tok/s) on 127.0.0.1:$port"
done

FR_PORT="$(free_port)"
"$BIN/fastroute" check -q "$DIR/config.yaml"
setsid "$BIN/fastroute" serve -c "$DIR/config.yaml" --listen "127.0.0.1:$FR_PORT" --workers 1 --log-level warning \
    >"$OUT/fastroute.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$FR_PORT/readyz" "$!" fastroute
echo "fastroute on 127.0.0.1:$FR_PORT; locust: $USERS users, spawn $SPAWN_RATE/s, $RUN_TIME"

status=0
(cd "$DIR" && "$BIN/locust" -f locustfile.py --headless --host "http://127.0.0.1:$FR_PORT" \
    -u "$USERS" -r "$SPAWN_RATE" --run-time "$RUN_TIME" --stop-timeout "$STOP_TIMEOUT" \
    --csv "$OUT/locust" --only-summary --loglevel WARNING) || status=$?

echo
echo "results: $OUT (locust_stats.csv, locust_failures.csv, logs)"
if [[ -s "$OUT/locust_failures.csv" ]] && [[ "$(wc -l <"$OUT/locust_failures.csv")" -gt 1 ]]; then
    echo "failures:"
    column -s, -t <"$OUT/locust_failures.csv" | head -n 20
fi
exit "$status"
