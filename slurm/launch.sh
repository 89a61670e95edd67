# shellcheck shell=bash
# Sourced by every slurm/*.sbatch template (inside the batch job): environment, rank mapping, the srun
# launch of `unimoe train`, and requeue on preemption.
#
#   source "${UNIMOE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
#   unimoe_train            # srun: one task per GPU, `unimoe train --config $CONFIG --out $RUN_DIR --resume auto`
#   unimoe_stage CMD...     # (what unimoe_train uses) srun CMD, requeue on preemption, bounded retry on failure
#
# Inputs (environment; the templates set defaults, `sbatch --export=ALL,NAME=value` overrides them):
#   UNIMOE_ROOT   repository checkout (default: the directory sbatch was called from)
#   UNIMOE_VENV   virtualenv to activate (default: $UNIMOE_ROOT/.venv; skipped when it does not exist)
#   CONFIG        stage config (YAML/JSON), relative to UNIMOE_ROOT or absolute
#   RUN_DIR       run directory (checkpoints, metrics.jsonl, tb/)
#   TRAIN_ARGS    extra `unimoe train` flags, e.g. "--max-steps 100 --save-every 20"
#   OVERRIDES     config overrides, space separated key=value, e.g. "optim.lr=3e-5 parallel.ep=4"
#   MASTER_PORT   rendezvous port (default: 15000 + job id mod 15000, below Linux's ephemeral ports 32768-60999,
#                 so jobs sharing a node differ; moved to the next free port of 15000-29999 when taken on the
#                 first node: training/cluster/ports.py)
#   SRUN_WAIT     seconds the other tasks get after the first one exits (default 120), then srun kills them
#   UNIMOE_RETRIES  how often a failed (not preempted) job requeues itself (default 1; curriculum `retries`)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  default 1: a failed NCCL collective tears the job down, never hangs
#
# Ranks: srun starts SLURM_NTASKS tasks (one per GPU: --ntasks-per-node = --gpus-per-node); each gets
# RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS and MASTER_ADDR = the first host
# of the allocation (torch.distributed env:// rendezvous). The deepspeed launcher is not used (it needs
# ssh/pdsh); under SLURM, srun is the launcher.
#
# Preemption: the templates ask for `--signal=B:USR1@<seconds>`, which reaches only this batch shell;
# the trap below forwards USR1 (and TERM) to the srun step, srun forwards it to every task, training
# saves a checkpoint and exits with 75 (training.train.PREEMPTED_EXIT_CODE). On 75 after USR1 the job
# requeues itself (`scontrol requeue`) and the next run resumes from that checkpoint (--resume auto).
# On TERM alone (scancel, `scontrol requeue`, PreemptMode=REQUEUE) SLURM itself decides what happens to
# the job, so no second requeue is issued.
#
# Config errors (exit 2: a bad config, argument or checkpoint, reported before training starts) are not
# retried: they would fail the same way every time.
# Failure (any other non-zero exit: a crash, a task killed, a lost node): the job requeues itself at most
# UNIMOE_RETRIES times (counted in $RUN_DIR/slurm-<job id>.failures; preemptions do not count) and the
# next run resumes from the newest complete checkpoint; after that it fails, and `afterok` dependents are
# cancelled.

PREEMPTED_EXIT_CODE=75
CONFIG_EXIT_CODE=2  # training.train.CONFIG_EXIT_CODE: a bad config/argument/checkpoint fails the same way again

_unimoe_log() { echo "[launch $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}] $*" >&2; }

unimoe_env() {
    UNIMOE_ROOT=${UNIMOE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
    if [ ! -f "$UNIMOE_ROOT/training/cli.py" ]; then
        _unimoe_log "error: UNIMOE_ROOT=$UNIMOE_ROOT is not an unimoe-audio checkout (set UNIMOE_ROOT)"
        return 1
    fi
    cd "$UNIMOE_ROOT" || return 1
    UNIMOE_VENV=${UNIMOE_VENV:-$UNIMOE_ROOT/.venv}
    if [ -f "$UNIMOE_VENV/bin/activate" ]; then
        # shellcheck disable=SC1091
        source "$UNIMOE_VENV/bin/activate"
    fi
    command -v unimoe >/dev/null || { _unimoe_log "error: no unimoe on PATH (set UNIMOE_VENV)"; return 1; }
    export UNIMOE_ROOT
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export PYTHONUNBUFFERED=1
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-${NCCL_ASYNC_ERROR_HANDLING:-1}}
    unset NCCL_ASYNC_ERROR_HANDLING  # the deprecated name
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    fi
}

unimoe_master() {
    local nodelist=${SLURM_JOB_NODELIST:-$(hostname -s)}
    MASTER_ADDR=$(scontrol show hostnames "$nodelist" | head -n 1)
    # this shell runs on the first node (= MASTER_ADDR): the collision check can only be made here
    [ -n "${MASTER_PORT:-}" ] || MASTER_PORT=$(python -m training.cluster.ports "${SLURM_JOB_ID:-0}") \
        || MASTER_PORT=$((15000 + ${SLURM_JOB_ID:-0} % 15000))
    export MASTER_ADDR MASTER_PORT
}

# Runs "$@" once per task with the torch.distributed variables of that task.
unimoe_srun() {
    local tasks_per_node=${SLURM_NTASKS_PER_NODE:-}
    [ -n "$tasks_per_node" ] || tasks_per_node=${SLURM_TASKS_PER_NODE%%(*}
    tasks_per_node=${tasks_per_node%%,*}
    _unimoe_log "srun: $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST)," \
        "master $MASTER_ADDR:$MASTER_PORT: $*"
    _unimoe_usr1="" _unimoe_term=""
    trap '_unimoe_usr1=1; _unimoe_log "got USR1: forwarding to the tasks"; kill -USR1 "$_unimoe_pid" 2>/dev/null' USR1
    trap '_unimoe_term=1; _unimoe_log "got TERM: forwarding to the tasks"; kill -TERM "$_unimoe_pid" 2>/dev/null' TERM
    # srun no longer inherits --cpus-per-task from sbatch (SLURM >= 22.05): pass it on.
    # --wait: once one task has exited, the others get SRUN_WAIT seconds before srun kills them (a crashed
    # rank must not leave the rest blocked in a collective). Not --kill-on-bad-exit: a preempted rank
    # exits 75 while rank 0 is still finishing the checkpoint, and that must not kill rank 0.
    LOCAL_WORLD_SIZE=$tasks_per_node srun --wait="${SRUN_WAIT:-120}" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
                 exec "$@"' unimoe-task "$@" &
    _unimoe_pid=$!
    # `wait` returns early when a trapped signal arrives: wait again until srun has really exited
    local rc
    while true; do
        wait "$_unimoe_pid"
        rc=$?
        kill -0 "$_unimoe_pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    return "$rc"
}

# The training step of a stage template: srun `unimoe train`, requeue on preemption, retry on failure.
unimoe_train() {
    unimoe_env || return 1
    unimoe_master
    : "${CONFIG:?set CONFIG (the stage config) in the template or with --export}"
    : "${RUN_DIR:?set RUN_DIR (the run directory) in the template or with --export}"
    mkdir -p "$RUN_DIR"
    _unimoe_log "restart count ${SLURM_RESTART_COUNT:-0}; config $CONFIG; run dir $RUN_DIR"
    local train_args overrides
    # word lists, split on blanks without glob expansion (overrides may hold [a,b])
    read -r -a train_args <<< "${TRAIN_ARGS:-}"
    read -r -a overrides <<< "${OVERRIDES:-}"
    # the config states the job it is sized for (cluster.gpus): one warning line when this job is another size
    python -m training.cluster.slurm "$CONFIG" "${SLURM_NTASKS:-1}" "${overrides[@]}" || true
    unimoe_stage unimoe train --config "$CONFIG" --out "$RUN_DIR" --resume auto "${train_args[@]}" "${overrides[@]}"
}

# srun "$@" (a command that resumes from $RUN_DIR's newest checkpoint), then: requeue after a preemption
# (exit 75), requeue after a failure (not a config error, exit 2) while at most UNIMOE_RETRIES failures were
# counted, else its exit code.
# Not after TERM: then SLURM is ending the job (scancel, time limit) and decides about it.
unimoe_stage() {
    : "${RUN_DIR:?set RUN_DIR (the run directory)}"
    local rc failures retries=${UNIMOE_RETRIES:-1}
    local count_file="$RUN_DIR/slurm-${SLURM_JOB_ID:-0}.failures"
    unimoe_srun "$@"
    rc=$?
    _unimoe_log "training exited with $rc"
    if [ "$rc" = "$CONFIG_EXIT_CODE" ]; then
        _unimoe_log "config error (exit $rc): not retried, it would fail the same way; fix the config or" \
            "arguments (the message is above) and resubmit"
        return "$rc"
    fi
    if [ "$rc" != 0 ] && [ "$rc" != "$PREEMPTED_EXIT_CODE" ] && [ -z "$_unimoe_term" ]; then
        failures=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 ))
        echo "$failures" > "$count_file"
        if [ "$failures" -le "$retries" ]; then
            _unimoe_log "stage failed (exit $rc): retry $failures of $retries, requeueing job $SLURM_JOB_ID to" \
                "resume from the newest complete checkpoint"
            scontrol requeue "$SLURM_JOB_ID" && return 0  # SLURM ends this run right after
            _unimoe_log "error: scontrol requeue failed (was the job submitted with --requeue?)"
        else
            _unimoe_log "stage failed (exit $rc), failure $failures with UNIMOE_RETRIES=$retries: giving up"
        fi
        return "$rc"
    fi
    if [ "$rc" = "$PREEMPTED_EXIT_CODE" ]; then
        # USR1 (the warning before the time limit) always requeues, even when the limit's TERM followed
        if [ -n "$_unimoe_term" ] && [ -z "$_unimoe_usr1" ]; then
            _unimoe_log "checkpoint saved; SLURM is ending this job (TERM), so no requeue from here"
        else
            _unimoe_log "checkpoint saved; requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID" && return 0  # SLURM ends this run right after
            _unimoe_log "error: scontrol requeue failed (was the job submitted with --requeue?)"
        fi
    fi
    return "$rc"
}
