# CUDA-capable image for the pipeline. Every package is installed at the version
# requirements.lock pins (torch and torchaudio as one tested pair, CUDA libraries included),
# whatever the base image holds; BASE only provides Python, CUDA's driver side and the OS.
ARG BASE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends git libsndfile1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY bestrq ./bestrq
COPY stages ./stages
RUN pip install --no-deps -e . && pip check

# The rest of the project (dvc.yaml, params.yaml, .dvc/, tests/) comes last so that editing it
# does not re-install the dependencies.
COPY . .
RUN git config --global --add safe.directory /workspace \
 && (git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A \
     && git -c user.name=docker -c user.email=docker@localhost commit -qm "image snapshot"))

# Whisper weights are downloaded on first use into ~/.cache/whisper: mount a volume there to
# keep them, or set `model` to a checkpoint path.
CMD ["dvc", "repro"]
