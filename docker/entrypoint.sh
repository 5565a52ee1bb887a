#!/bin/sh
# Entry point of the neve_tune image. The first argument picks a role of docker/compose.yaml; anything
# else is run as given (e.g. `docker run IMAGE neve-tune study run digits ...`).
#
#   ray-head   [ray start options]  the Ray head (GCS, dashboard + Jobs API on 8265), in the foreground
#   ray-worker [ray start options]  a Ray node joining RAY_HEAD_ADDRESS with every CPU/GPU of its container
#   ray-driver COMMAND...           join RAY_HEAD_ADDRESS as a node with no CPU/GPU, run COMMAND (a Ray
#                                   driver such as `neve-tune study run ...`), then leave the cluster
#   mlflow     [mlflow server options]  the MLflow tracking server, artifacts served from a volume
#
# Ray runs with token authentication: every node and client needs the same RAY_AUTH_TOKEN.
set -eu

fail() {
    echo "neve-entrypoint: $*" >&2
    exit 64
}

need() {
    for var in "$@"; do
        if [ -z "$(printenv "$var" || true)" ]; then
            fail "$var is not set - copy docker/.env.example to docker/.env, fill it in and pass it with" \
                "\`docker compose --env-file docker/.env -f docker/compose.yaml ...\` (or set $var)"
        fi
    done
}

role="${1:-}"
case "$role" in
    ray-head)
        shift
        need RAY_AUTH_TOKEN
        export RAY_AUTH_MODE=token
        exec ray start --head --block \
            --port="${RAY_PORT:-6379}" \
            --num-cpus="${RAY_HEAD_NUM_CPUS:-0}" --num-gpus=0 \
            --dashboard-host=0.0.0.0 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
            --disable-usage-stats "$@"
        ;;
    ray-worker)
        shift
        need RAY_AUTH_TOKEN RAY_HEAD_ADDRESS
        export RAY_AUTH_MODE=token
        exec ray start --block --address="$RAY_HEAD_ADDRESS" "$@"
        ;;
    ray-driver)
        shift
        need RAY_AUTH_TOKEN RAY_HEAD_ADDRESS
        [ "$#" -gt 0 ] || fail "ray-driver needs a command, e.g. \`ray-driver neve-tune study run digits ...\`"
        export RAY_AUTH_MODE=token
        ray start --address="$RAY_HEAD_ADDRESS" --num-cpus=0 --num-gpus=0
        "$@" &
        child=$!
        trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
        rc=0
        wait "$child" || rc=$?
        # A trapped signal interrupts `wait`; wait again for the command's own exit status.
        if kill -0 "$child" 2>/dev/null; then
            rc=0
            wait "$child" || rc=$?
        fi
        # Only this container's Ray processes: the container has its own PID namespace.
        ray stop > /dev/null 2>&1 || true
        exit "$rc"
        ;;
    mlflow)
        shift
        need MLFLOW_BACKEND_STORE_URI
        exec mlflow server \
            --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
            --serve-artifacts --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-/data/mlartifacts}" \
            --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}" \
            --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*}" \
            "$@"
        ;;
    "")
        fail "no command given - pass a role (ray-head, ray-worker, ray-driver, mlflow) or a command to run"
        ;;
    *)
        exec "$@"
        ;;
esac
