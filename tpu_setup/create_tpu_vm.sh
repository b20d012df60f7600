#!/usr/bin/env bash
# Create a Cloud TPU VM slice. Usage: create_tpu_vm.sh NAME ZONE ACCELERATOR_TYPE [RUNTIME_VERSION]
set -euo pipefail
name=${1:?name}; zone=${2:?zone}; type=${3:?accelerator type, e.g. v5p-16}
runtime=${4:-v2-alpha-tpuv5}
gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type" --version "$runtime"
