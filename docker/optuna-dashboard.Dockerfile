# optuna-dashboard for docker-compose.yml's `optuna-dashboard` profile: Optuna, the dashboard and the PostgreSQL
# driver at the versions pinned in constraints.txt, nothing else.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt optuna-dashboard optuna "psycopg[binary]" gunicorn \
    && useradd --create-home dashboard
USER dashboard
