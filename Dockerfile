# The aetrack image: training, evaluation, tuning workers and model serving (`aetrack serve`). The MLflow server and
# the Optuna dashboard have slim images of their own (docker/*.Dockerfile): none of them carries torch.
# TORCH_INDEX_URL picks the torch build: the CPU-only one by default (a few hundred MB instead of several GB of
# CUDA libraries); --build-arg TORCH_INDEX_URL=https://pypi.org/simple gives PyPI's CUDA build for GPU hosts.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
# torch first, from the chosen index; the constraints hold it at the pinned version (2.14.1 matches 2.14.1+cpu).
RUN pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple -c constraints.txt torch torchvision
COPY aetrack ./aetrack
RUN pip install -c constraints.txt . \
    && useradd --create-home aetrack && mkdir /work && chown aetrack /work
USER aetrack
# Checkpoints and any local files of a job go here, not into the package folder.
WORKDIR /work
