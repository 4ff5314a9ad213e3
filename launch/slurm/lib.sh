# Shared by launch/slurm/train.sbatch and launch/slurm/sweep.sbatch (sourced in the batch shell).
#
# What one job does (docs/SLURM.md has the user's view):
#   1. care_setup: cd to the checkout, pick python, count processes, rendezvous variables.
#   2. care_train CONFIG [key=value ...]:
#      - merges/validates the config in the batch shell (launch/slurm/runinfo.py): run dir, train.steps,
#        the step of the latest checkpoint. A run already at train.steps is not trained again.
#      - starts ONE srun step with one task per GPU (or NPROC_PER_NODE per node on CPU nodes); each
#        task runs launch/slurm/task.sh, which exports RANK/WORLD_SIZE/LOCAL_RANK from SLURM_* and
#        execs `python ENTRY --config CONFIG --resume auto key=value ...`. `--resume auto` loads the
#        run's own latest checkpoint and is a no-op when there is none, so a first start, a requeue
#        after USR1 and a requeue after a node failure are the same command.
#      - srun runs in the background and the shell waits for it, so the traps below run at once:
#        USR1 (from `#SBATCH --signal=B:USR1@T`, which signals only this batch shell) and TERM are
#        forwarded to srun, which forwards them to every task; the training loop checkpoints at the
#        next step boundary and exits 0.
#      - after srun returns: if USR1 came, or training exited 75 (its hang watchdog stopped a stuck
#        step), and the run is not at train.steps, `scontrol requeue $SLURM_JOB_ID` (for an array
#        task this is the task's own id). TERM (scancel, time limit,
#        scheduler preemption) never requeues from here; SLURM's own requeue (PreemptMode=REQUEUE,
#        node failure with --requeue) resumes the same way.
#
# Knobs (environment variables, inherited through sbatch's default --export=ALL):
#   CARE_ROOT          checkout to run from (default: $SLURM_SUBMIT_DIR, i.e. submit from the repo root)
#   PYTHON             interpreter (default: $CARE_ROOT/.venv/bin/python if present, else python3)
#   TRAIN_ENTRY        training script (default: launch/train.py; the tests use tests/helpers/train_entry.py)
#   NPROC_PER_NODE     processes per node (default: $SLURM_GPUS_ON_NODE, else $SLURM_NTASKS_PER_NODE, else 1)
#   CARE_MASTER_ADDR   rendezvous host (default: first host of $SLURM_JOB_NODELIST)
#   CARE_MASTER_PORT   rendezvous port (default: 10000 + SLURM_JOB_ID % 20000: array tasks sharing a node differ)
#   CARE_MAX_REQUEUES  stop requeueing after this many restarts (default 100; guards against a loop
#                      when the signal always comes before the first checkpoint)
#   CARE_SRUN_ARGS     extra srun arguments (word-split), e.g. "--cpu-bind=cores"

care_log() { echo "[slurm $(date '+%F %T')] $*"; }

care_setup() {
  CARE_ROOT=${CARE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$CARE_ROOT" || { echo "cannot cd to CARE_ROOT=$CARE_ROOT" >&2; exit 2; }
  if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$CARE_ROOT/.venv/bin/python; else PYTHON=python3; fi
  fi
  TRAIN_ENTRY=${TRAIN_ENTRY:-launch/train.py}
  CARE_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  CARE_NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
  CARE_NPROC=${CARE_NPROC%%(*}  # "2(x3)" forms: the per-node count
  CARE_NTASKS=$((CARE_NODES * CARE_NPROC))
  # Always ours (not a MASTER_* left in the submitting shell, which --export=ALL would carry here).
  MASTER_ADDR=${CARE_MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n1)}
  MASTER_PORT=${CARE_MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}
  export MASTER_ADDR MASTER_PORT PYTHON TRAIN_ENTRY
  export PYTHONUNBUFFERED=1
  unset RANK WORLD_SIZE LOCAL_RANK  # task.sh sets them per task from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
}

_care_on_signal() {
  CARE_SIGNAL=$1
  _care_interrupted=1
  care_log "batch shell got SIG$1; forwarding it to the training step (srun pid ${CARE_SRUN_PID:-none})"
  [ -n "${CARE_SRUN_PID:-}" ] && kill -s "$1" "$CARE_SRUN_PID" 2>/dev/null
  return 0
}

_care_runinfo() {  # sets RUN_DIR CKPT_DIR TB_DIR TARGET_STEPS LATEST_STEP, or exits 2 on a config error
  local out
  out=$(WORLD_SIZE=$CARE_NTASKS "$PYTHON" -m launch.slurm.runinfo --config "$@") || {
    care_log "config check failed (launch/slurm/runinfo.py); not training"; exit 2; }
  eval "$out"
}

care_train() {
  local config=$1
  shift
  CARE_SIGNAL=""
  CARE_SRUN_PID=""
  trap '_care_on_signal USR1' USR1
  trap '_care_on_signal TERM' TERM
  _care_runinfo "$config" "$@"
  care_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
           "restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $CARE_NODES node(s) x $CARE_NPROC" \
           "process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"
  care_log "run dir $RUN_DIR (checkpoints $CKPT_DIR, tensorboard $TB_DIR); latest checkpoint step" \
           "$LATEST_STEP of $TARGET_STEPS"
  if [ "$LATEST_STEP" -ge "$TARGET_STEPS" ]; then
    care_log "run already finished (step $LATEST_STEP >= train.steps $TARGET_STEPS); nothing to do"
    return 0
  fi
  local srun_args=(--nodes="$CARE_NODES" --ntasks="$CARE_NTASKS" --ntasks-per-node="$CARE_NPROC" --kill-on-bad-exit=1)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  # shellcheck disable=SC2206
  [ -n "${CARE_SRUN_ARGS:-}" ] && srun_args+=($CARE_SRUN_ARGS)
  care_log "srun ${srun_args[*]} $TRAIN_ENTRY --config $config --resume auto $*"
  local rc=0 r
  if [ -n "$CARE_SIGNAL" ]; then
    care_log "SIG$CARE_SIGNAL arrived before training started; not starting it"
  else
    srun "${srun_args[@]}" bash "$CARE_ROOT/launch/slurm/task.sh" "$PYTHON" "$TRAIN_ENTRY" --config "$config" \
         --resume auto "$@" &
    CARE_SRUN_PID=$!
  fi
  while [ -n "$CARE_SRUN_PID" ]; do  # `wait` returns early when a trapped signal arrives: keep waiting until srun is gone
    _care_interrupted=0
    wait "$CARE_SRUN_PID"
    rc=$?
    [ "$_care_interrupted" = 1 ] || break
    kill -0 "$CARE_SRUN_PID" 2>/dev/null && continue
    wait "$CARE_SRUN_PID" 2>/dev/null  # exited right after the signal: collect its real status
    r=$?
    [ "$r" -ne 127 ] && rc=$r
    break
  done
  CARE_SRUN_PID=""  # a signal from here on is only recorded (the traps stay: untrapped USR1 would kill this shell)
  _care_runinfo "$config" "$@"
  care_log "training step exited with $rc at checkpoint step $LATEST_STEP of $TARGET_STEPS" \
           "${CARE_SIGNAL:+(after SIG$CARE_SIGNAL)}"
  # USR1 (preemption notice) and exit 75 (the hang watchdog stopped a stuck step) both requeue
  if [ "$CARE_SIGNAL" = USR1 ] || [ "$rc" -eq 75 ]; then
    [ "$rc" -eq 75 ] && care_log "the hang watchdog stopped a stuck step (exit 75; stacks in the task logs)"
    if [ "$LATEST_STEP" -ge "$TARGET_STEPS" ]; then
      care_log "finished before the signal mattered; not requeueing"
      return 0
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${CARE_MAX_REQUEUES:-100}" ]; then
      care_log "already restarted ${SLURM_RESTART_COUNT} times (CARE_MAX_REQUEUES); not requeueing"
      return 1
    fi
    [ "$rc" -ne 0 ] && care_log "warning: the training step did not exit cleanly ($rc); it resumes from the" \
                                "last complete checkpoint (step $LATEST_STEP)"
    care_log "requeueing job $SLURM_JOB_ID; it resumes from step $LATEST_STEP"
    scontrol requeue "$SLURM_JOB_ID" || { care_log "scontrol requeue failed"; return 1; }
    return 0
  fi
  return "$rc"
}
