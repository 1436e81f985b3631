#!/usr/bin/env bash
# Cloud TPU VM pod slices: create the slice, install this checkout on every worker, run a stage on all workers at
# once, follow it, stop it (SIGTERM: checkpoint at the next step boundary, exit 0), delete the slice.
#
#   TPU_NAME=musicdiff ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 RUNTIME_VERSION=tpu-ubuntu2204-base \
#       launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup
#   launch/tpu_vm.sh run train_diffusion --config=configs/diffusion.py:sao --config.data.latents=/mnt/shared/latents \
#       --workdir=/mnt/shared/runs/dit
#   launch/tpu_vm.sh logs            # worker 0's log; WORKER=3 launch/tpu_vm.sh logs for another
#   launch/tpu_vm.sh stop            # graceful: every process saves and exits 0; `run` again resumes
#   launch/tpu_vm.sh delete
#
# Every worker runs the same command; JAX finds the other workers from the TPU metadata
# (--config.distributed.enabled=True is added). Data and --workdir must be a path that every worker mounts (NFS /
# Filestore, or a gcsfuse mount of a bucket): Orbax checkpoints are written by all workers into one directory and
# metrics by worker 0. See launch/README.md.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-musicdiff}"   # relative to the home directory on each worker
PIP_EXTRA="${PIP_EXTRA:-tpu}"
WORKER="${WORKER:-0}"

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="$1"
}

command="${1:?usage: launch/tpu_vm.sh create|setup|run STAGE ARGS...|logs|stop|delete}"
shift

case "${command}" in
  create)
    # Add --spot or --preemptible (or use queued resources) for cheaper capacity; `stop` semantics are the same as
    # the SIGTERM a preemption sends.
    gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" --accelerator-type="${ACCELERATOR_TYPE}" \
      --version="${RUNTIME_VERSION}" "$@"
    ;;
  setup)
    # Ships the committed tree of this checkout (git archive) to every worker and installs it with the TPU extra.
    archive="$(mktemp --suffix=.tar.gz)"
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "${archive}" HEAD
    gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:musicdiff.tar.gz" --zone="${ZONE}" --worker=all
    rm -f "${archive}"
    on_all_workers "mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/musicdiff.tar.gz -C ~/${REMOTE_DIR} \
      && cd ~/${REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip \
      && .venv/bin/pip install --quiet -e '.[${PIP_EXTRA}]'"
    ;;
  run)
    stage="${1:?usage: launch/tpu_vm.sh run STAGE ARGS... (train_diffusion, train_autoencoder, precompute_latents)}"
    shift
    args="$(printf ' %q' "$@")"
    # Detached (setsid + nohup) so the run survives the SSH session; one log and one pid file per worker.
    # The braces keep `cd` in this shell and make \$! the python process (setsid and nohup exec it).
    on_all_workers "cd ~/${REMOTE_DIR} && mkdir -p logs && { setsid nohup .venv/bin/python -m launch.${stage} \
      ${args} --config.distributed.enabled=True > logs/${stage}.log 2>&1 < /dev/null & echo \$! > logs/run.pid; }"
    echo "started launch.${stage} on every worker of ${TPU_NAME}; follow it with: launch/tpu_vm.sh logs"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker="${WORKER}" \
      --command="tail -n 200 -F ~/${REMOTE_DIR}/logs/*.log"
    ;;
  stop)
    # SIGTERM to the stage on every worker: the processes agree on a step (training.preemption_sync_every), save
    # that step's checkpoint and exit 0. `run` with the same arguments resumes.
    on_all_workers "test -f ~/${REMOTE_DIR}/logs/run.pid && kill -TERM \$(cat ~/${REMOTE_DIR}/logs/run.pid) || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
    ;;
  *)
    echo "unknown command '${command}': use create, setup, run, logs, stop or delete" >&2
    exit 2
    ;;
esac
