#!/usr/bin/env bash
# The README's "Scaling out" set-up on one machine, all on 127.0.0.1: PostgreSQL (Optuna's study
# and MLflow's backend), one `mlflow server` (artifacts proxied to a local folder) and two sweep
# workers sharing one study, as two machines would.
#
#   scripts/cluster.sh up [N_TRIALS_PER_WORKER]   # start all, run the two workers, wait for them
#   scripts/cluster.sh down                        # stop the servers, delete .cluster/
#
# Needs PostgreSQL's server binaries (initdb, pg_ctl) on PATH (Debian: apt-get install postgresql,
# then PATH=/usr/lib/postgresql/<version>/bin:$PATH) and `pip install -e '.[cluster]'`.
# PostgreSQL refuses to run as root: as root, it runs as `nobody` in a folder nobody owns.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=$PWD/.cluster
PG_PORT=${PG_PORT:-55432}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PG_URL="postgresql://postgres@127.0.0.1:$PG_PORT"

as_pg() {  # run a PostgreSQL command as an unprivileged user
    if [ "$(id -u)" = 0 ]; then runuser -u nobody -- "$@"; else "$@"; fi
}

up() {
    local trials=${1:-2}
    command -v initdb >/dev/null || { echo "error: initdb not on PATH; install PostgreSQL's server (Debian: apt-get install postgresql; PATH=/usr/lib/postgresql/*/bin:\$PATH)" >&2; exit 2; }
    mkdir -p "$STATE/pg" "$STATE/artifacts" "$STATE/logs"
    [ "$(id -u)" = 0 ] && chown nobody "$STATE/pg"
    if [ ! -f "$STATE/pg/data/PG_VERSION" ]; then
        as_pg env LC_ALL=C initdb -D "$STATE/pg/data" -U postgres --auth=trust -E UTF8 >"$STATE/logs/initdb.log"
    fi
    as_pg pg_ctl -D "$STATE/pg/data" -l "$STATE/pg/server.log" -w start \
        -o "-h 127.0.0.1 -p $PG_PORT -k $STATE/pg" >/dev/null
    for db in optuna mlflow; do
        python - "$PG_URL" "$db" <<'PY'
import sys, psycopg
with psycopg.connect(f"{sys.argv[1]}/postgres", autocommit=True) as conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (sys.argv[2],)).fetchone():
        conn.execute(f"CREATE DATABASE {sys.argv[2]}")
PY
    done
    echo "PostgreSQL: $PG_URL (databases optuna, mlflow)"

    setsid mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "$PG_URL/mlflow" --artifacts-destination "$STATE/artifacts" \
        >"$STATE/logs/mlflow.log" 2>&1 &
    echo $! >"$STATE/mlflow.pid"
    printf "MLflow server: http://127.0.0.1:%s (starting" "$MLFLOW_PORT"
    for _ in $(seq 180); do
        curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && break
        printf .; sleep 1
    done
    curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || { echo " failed; see $STATE/logs/mlflow.log" >&2; exit 1; }
    echo ")"

    # Two workers started together, as two machines would be: one study, one tracking server.
    export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
    for worker in 1 2; do
        python pipeline/sweep.py --storage "$PG_URL/optuna" --n-trials "$trials" \
            >"$STATE/logs/worker-$worker.log" 2>&1 &
        echo $! >"$STATE/worker-$worker.pid"
    done
    echo "two sweep workers running ($trials trials each); logs in $STATE/logs/"
    status=0
    for worker in 1 2; do wait "$(cat "$STATE/worker-$worker.pid")" || status=$?; done
    tail -n 3 "$STATE"/logs/worker-*.log
    echo "open $MLFLOW_TRACKING_URI; stop everything with: scripts/cluster.sh down"
    return $status
}

down() {
    for pid_file in "$STATE"/worker-*.pid "$STATE/mlflow.pid"; do
        [ -f "$pid_file" ] || continue
        pid=$(cat "$pid_file")
        # The mlflow server runs in its own session: stop its gunicorn/uvicorn children too.
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
        rm -f "$pid_file"
    done
    if [ -f "$STATE/pg/data/PG_VERSION" ]; then
        as_pg pg_ctl -D "$STATE/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$STATE"
    echo "cluster stopped"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    *) echo "usage: $0 up [N_TRIALS_PER_WORKER] | down" >&2; exit 2 ;;
esac
