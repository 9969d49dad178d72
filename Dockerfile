# One image for every aetrack service: the MLflow server, training, tuning and model serving.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY aetrack ./aetrack
RUN pip install --no-cache-dir -c constraints.txt . && useradd --create-home aetrack
USER aetrack
