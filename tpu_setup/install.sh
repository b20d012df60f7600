#!/usr/bin/env bash
# Install jaxalign (this checkout, copied to every host) with TPU jax on all workers of a slice.
# Usage: install.sh NAME ZONE
set -euo pipefail
name=${1:?name}; zone=${2:?zone}
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse "$repo" "$name":~/jaxalign --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  'python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && ~/venv/bin/pip install -q "jax[tpu]>=0.11.2,<0.13" && ~/venv/bin/pip install -q -e ~/jaxalign'
