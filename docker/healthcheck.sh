#!/bin/sh
# HEALTHCHECK of the neve_tune image. NEVE_ROLE (set per service in docker/compose.yaml) says what to check;
# exit status 0 means healthy.
set -eu

raylet_running() {
    # The node's own raylet is alive (no procps needed).
    cat /proc/[0-9]*/comm 2> /dev/null | grep -qx raylet
}

case "${NEVE_ROLE:-}" in
    mlflow)
        # /health is exempt from MLflow's Host-header check.
        exec python -c 'import os, sys, urllib.request
url = "http://127.0.0.1:%s/health" % os.environ.get("MLFLOW_PORT", "5000")
sys.exit(0 if urllib.request.urlopen(url, timeout=10).status == 200 else 1)'
        ;;
    ray-head)
        # Answers only with the right RAY_AUTH_TOKEN.
        RAY_AUTH_MODE=token exec ray status --address="127.0.0.1:${RAY_PORT:-6379}" > /dev/null
        ;;
    ray-worker | ray-driver)
        raylet_running
        RAY_AUTH_MODE=token exec ray status --address="$RAY_HEAD_ADDRESS" > /dev/null
        ;;
    *)
        exec python -c "import neve_tune"
        ;;
esac
