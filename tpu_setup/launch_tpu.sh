#!/usr/bin/env bash
# Run one training command on every host of a TPU slice. Usage: launch_tpu.sh NAME ZONE RECIPE [key=value ...]
set -euo pipefail
name=${1:?name}; zone=${2:?zone}; recipe=${3:?recipe yaml, relative to the repo}
shift 3
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/jaxalign && nohup ~/venv/bin/python -m jaxalign.train --config $recipe mesh.distributed=on$overrides > ~/jaxalign-run.log 2>&1 &"
