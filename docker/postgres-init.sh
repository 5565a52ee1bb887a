#!/bin/sh
# Runs once, in the postgres container, when its data volume is first initialised: creates the database
# that Optuna's RDB storage uses next to MLflow's ($POSTGRES_DB). MLflow and Optuna both keep an
# `alembic_version` table, so they cannot share one database.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"${OPTUNA_DB:-optuna}\" OWNER \"$POSTGRES_USER\";"
