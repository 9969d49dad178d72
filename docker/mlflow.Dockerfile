# The MLflow tracking server of docker-compose.yml: MLflow and the PostgreSQL driver, no torch, and of aetrack only
# the login check basic_auth.ini names (aetrack/tracking/login.py imports Flask and MLflow, nothing of aetrack).
# MLFLOW_VERSION must be the version pinned in constraints.txt (pip refuses any other; tests/test_stack.py checks).
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt "mlflow[auth]==${MLFLOW_VERSION}" "psycopg[binary]" \
    && useradd --create-home mlflow \
    && mkdir -p /var/lib/mlflow/artifacts /var/lib/mlflow/auth && chown -R mlflow /var/lib/mlflow
COPY aetrack/__init__.py /opt/aetrack/aetrack/
COPY aetrack/tracking/__init__.py aetrack/tracking/login.py /opt/aetrack/aetrack/tracking/
COPY docker/mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini PYTHONPATH=/opt/aetrack
USER mlflow
WORKDIR /var/lib/mlflow
