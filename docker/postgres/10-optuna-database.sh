#!/bin/sh
# Runs once, when the postgres service starts on an empty volume (docker-entrypoint-initdb.d): the database of
# Optuna's studies beside MLflow's own ($POSTGRES_DB). Safe to run again. tests/test_stack.py runs it natively.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" --set db="${OPTUNA_DB:-optuna}" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
