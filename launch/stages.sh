#!/usr/bin/env bash
# A staged run (pre-training, then the long-context extensions) as one Slurm job per stage, each
# starting when the previous one succeeded (`--dependency=afterok`). docs/launch.md has the details.
#
#   launch/stages.sh stages=deepseek_v3 run_dir=outputs/v3 parallel=deepseek_v3_2048
#   MEGADS_SBATCH="--nodes 256" MEGADS_SBATCH_ext128k="--nodes 256 --time 48:00:00" launch/stages.sh ...
#   DRY_RUN=1 launch/stages.sh stages=tiny_extension        # print the sbatch commands only
#
# Job k trains the stage list up to stage k (`stages.stop=<name>`): the stages before it are
# complete in the run folder and skipped, stage k starts from the previous stage's final
# checkpoint (or resumes its own after a requeue). Every job is launch/slurm.sbatch with the same
# overrides, so give a run_dir (or keep the default run name) that all of them share.
# MEGADS_SBATCH: sbatch options of every job; MEGADS_SBATCH_<stage name>: that stage's job only
# (after the common ones: sbatch takes the last value of an option).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
for arg in "$@"; do
  case "$arg" in
    stages.stop=*|stages.start=*)
      echo "launch/stages.sh: $arg: this script sets stages.stop per job itself; leave it out" >&2; exit 2 ;;
  esac
done
listing="$("$PY" -m tools.stage_names "$@")"  # fails (and so this script) on a bad stage config
mapfile -t names <<<"$listing"
prev=""
for name in "${names[@]}"; do
  var="MEGADS_SBATCH_${name//[^A-Za-z0-9_]/_}"
  # shellcheck disable=SC2206  # word splitting of the option strings is intended
  opts=(${MEGADS_SBATCH:-} ${!var:-} --job-name "megads-$name")
  [[ -n "$prev" ]] && opts+=(--dependency "afterok:$prev" --kill-on-invalid-dep yes)
  cmd=(sbatch --parsable "${opts[@]}" launch/slurm.sbatch "$@" "stages.stop=$name")
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"; echo
    prev="<job of $name>"
    continue
  fi
  prev="$("${cmd[@]}")"
  prev="${prev%%;*}"
  echo "stage $name: job $prev"
done
