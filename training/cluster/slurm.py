"""`unimoe slurm submit --curriculum CONFIG [--dry-run]`: the curriculum as a chain of SLURM jobs.

The curriculum file lists the stages (name, template, stage config, run dir, job shape, env) and which
stages each one waits for (`after`); every stage is one `sbatch` of its template, started with
`--dependency=afterok:<ids of its `after` stages>`, so stage 2 starts when both specialists COMPLETED
and stage 3 when stage 2 did. A failed stage cancels the stages that wait for it
(--kill-on-invalid-dep). `--dry-run` prints the chain as a shell script instead of submitting it.

    runs: /scratch/me/unimoe/runs      # base of the run dirs: "{runs}" in the stage fields ($VARS expanded)
    defaults:                          # any stage field, for every stage
      cpus_per_task: 8
      retries: 1                       # a failed (not preempted) job requeues itself this often
      env: {NCCL_DEBUG: WARN}
    stages:
      - name: stage1_speech
        template: slurm/stage1.sbatch
        config: training/configs/stage1_speech.yaml
        run_dir: "{runs}/stage1_speech"
      - name: stage2
        after: [stage1_speech, stage1_music]
        overrides: ["stage.init_from=[{runs}/stage1_speech,{runs}/stage1_music]"]
        ...

A stage's job size is its config's target, `cluster.gpus` (nodes = gpus / cluster.gpus_per_node, one task
per GPU): the config states it once, and a curriculum that states another nodes/tasks_per_node/gpus_per_node
is refused. Only configs without a target (the tiny CPU ones) take nodes, tasks_per_node and gpus_per_node
(0 = CPU; required where the cluster has GPUs) from the curriculum.
Paths are relative to the repository root (sbatch runs there). The runs root is `--runs DIR`, else the
file's `runs:`, else $SCRATCH/unimoe/runs where the cluster sets $SCRATCH (run dirs off the checkout's
file system), else runs/ in the checkout. A stage that leaves `gpus_per_node` out is an error on a
cluster whose partition has GPUs (sinfo's GRES): say 0 to train on CPU there. The stage variables
(CONFIG, RUN_DIR, TRAIN_ARGS, OVERRIDES, UNIMOE_RETRIES, env) reach the job through the environment of
sbatch (--export=ALL), where values may hold commas, which `--export=NAME=value` lists cannot.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import yaml

from training.config import REPO_ROOT


class CurriculumError(ValueError):
    """A bad curriculum file; the message names the file, the stage and the field."""


@dataclass
class Stage:
    name: str
    template: str  # sbatch template, e.g. slurm/stage2.sbatch
    config: str  # stage config for `unimoe train --config`
    run_dir: str  # `unimoe train --out`; "{runs}" is the curriculum's runs dir
    after: list[str] = field(default_factory=list)  # stages that must COMPLETE first (afterok)
    nodes: int = 1
    tasks_per_node: int = 1  # one task (rank) per GPU
    gpus_per_node: int | None = None  # 0 = CPU only; None (left out): 0 unless the cluster has GPUs (error)
    cpus_per_task: int = 1
    time: str | None = None  # e.g. "48:00:00"; None = the template's
    partition: str | None = None
    account: str | None = None
    extra_args: list[str] = field(default_factory=list)  # more sbatch flags, e.g. ["--qos=high"]
    env: dict = field(default_factory=dict)  # exported to the job
    train_args: list[str] = field(default_factory=list)  # more `unimoe train` flags: ["--max-steps", "4"]
    overrides: list[str] = field(default_factory=list)  # config overrides key=value
    retries: int = 1  # a failed (not preempted) job requeues itself this often, from its newest checkpoint

    def __post_init__(self):
        where = f"stage {self.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(self.name)):
            raise CurriculumError(f"{where}: name must be letters, digits, _ . - (it names the job)")
        for key in ("nodes", "tasks_per_node", "cpus_per_task"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise CurriculumError(f"{where}: {key} must be an integer >= 1, got {getattr(self, key)!r}")
        gpus = self.gpus_per_node
        if gpus is not None and (not isinstance(gpus, int) or gpus < 0):
            raise CurriculumError(f"{where}: gpus_per_node must be an integer >= 0, "
                                  f"got {self.gpus_per_node!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise CurriculumError(f"{where}: retries must be an integer >= 0, got {self.retries!r}")
        if self.gpus_per_node and self.gpus_per_node != self.tasks_per_node:
            raise CurriculumError(f"{where}: one task per GPU: tasks_per_node ({self.tasks_per_node}) "
                                  f"must equal gpus_per_node ({self.gpus_per_node}); "
                                  "gpus_per_node: 0 for CPU-only jobs")
        if isinstance(self.after, str):
            self.after = [self.after]
        for key in ("extra_args", "train_args", "overrides"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = shlex.split(value)
            setattr(self, key, [str(v) for v in value])
        if not isinstance(self.env, dict):
            raise CurriculumError(f"{where}: env must be a mapping NAME: value")
        self.env = {str(k): "" if v is None else str(v) for k, v in self.env.items()}

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def job_var(self) -> str:
        return re.sub(r"\W", "_", self.name).upper() + "_JOB"


_FIELDS = {f.name for f in dataclasses.fields(Stage)}
_REQUIRED = {"name", "template", "config", "run_dir"}


def runs_root(file_value, path: str) -> str:
    """The file's `runs:` ($VARS and ~ expanded), else $SCRATCH/unimoe/runs, else runs/ in the checkout."""
    if file_value:
        value = os.path.expanduser(str(file_value))
        missing = [v for v in re.findall(r"\$\{?(\w+)", value) if v not in os.environ]
        if missing:
            raise CurriculumError(f"{path}: runs: {file_value!r} uses ${missing[0]}, which is not set here; "
                                  "set it or pass --runs DIR")
        return os.path.expandvars(value)
    if os.environ.get("SCRATCH"):
        return os.path.join(os.environ["SCRATCH"], "unimoe", "runs")
    return "runs"


def load_curriculum(path: str, runs: str | None = None) -> list[Stage]:
    """Stages in submission order; `runs` (--runs) replaces the file's runs root (see runs_root)."""
    if not os.path.exists(path):
        raise CurriculumError(f"curriculum file {path} does not exist (see training/configs/curriculum.yaml)")
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list) or not doc["stages"]:
        raise CurriculumError(f"{path}: expected a mapping with a non-empty `stages:` list")
    unknown = set(doc) - {"runs", "defaults", "stages"}
    if unknown:
        raise CurriculumError(f"{path}: unknown top-level keys {sorted(unknown)}; "
                              "known: runs, defaults, stages")
    runs = runs or runs_root(doc.get("runs"), path)
    defaults = doc.get("defaults") or {}
    bad = set(defaults) - (_FIELDS - _REQUIRED - {"after"})
    if bad:
        raise CurriculumError(f"{path}: `defaults` has unknown or per-stage-only keys {sorted(bad)}")
    stages: list[Stage] = []
    for i, raw in enumerate(doc["stages"]):
        if not isinstance(raw, dict):
            raise CurriculumError(f"{path}: stages[{i}] must be a mapping")
        name = raw.get("name", f"stages[{i}]")
        bad = set(raw) - _FIELDS
        if bad:
            raise CurriculumError(f"{path}: stage {name!r} has unknown keys {sorted(bad)}; "
                                  f"known: {sorted(_FIELDS)}")
        merged = {**defaults, **raw, "env": {**(defaults.get("env") or {}), **(raw.get("env") or {})}}
        missing = _REQUIRED - set(merged)
        if missing:
            raise CurriculumError(f"{path}: stage {name!r} needs {sorted(missing)}")
        merged = _with_target(_substitute(merged, runs, path, name), path, name)
        try:
            stage = Stage(**merged)
        except CurriculumError as e:
            raise CurriculumError(f"{path}: {e}") from None
        earlier = {s.name for s in stages}
        if stage.name in earlier:
            raise CurriculumError(f"{path}: two stages are named {stage.name!r}")
        for dep in stage.after:
            if dep not in earlier:
                raise CurriculumError(f"{path}: stage {stage.name!r} is after {dep!r}, which is not a stage "
                                      f"listed before it (stages so far: {sorted(earlier)})")
        stages.append(stage)
    return stages


def _config_target(fields: dict):
    """The stage config's `cluster` section (with the stage's overrides); None when the config does not load
    here (check_stage names why)."""
    from training.config import ConfigError, load_config
    try:
        cfg = load_config(_abs(str(fields.get("config", "")), REPO_ROOT), fields.get("overrides") or [])
        return cfg.cluster
    except (ConfigError, OSError, TypeError):
        return None


def _with_target(fields: dict, path: str, name: str) -> dict:
    """The job shape from the stage config's target (`cluster.gpus` = nodes x GPUs per node, one task per
    GPU): the config is the one place that states it. Shape keys the curriculum states too must agree;
    configs without a target (the tiny CPU ones) keep the curriculum's shape."""
    cluster = _config_target(fields)
    if cluster is None or not cluster.gpus:
        return fields
    per_node = min(cluster.gpus, cluster.gpus_per_node)
    shape = {"nodes": -(-cluster.gpus // per_node), "tasks_per_node": per_node, "gpus_per_node": per_node}
    clash = [f"{k}: {fields[k]}" for k in shape if k in fields and fields[k] != shape[k]]
    if clash:
        raise CurriculumError(f"{path}: stage {name!r} states {', '.join(clash)}, but its config "
                              f"{fields['config']} targets cluster.gpus: {cluster.gpus} ({shape['nodes']} "
                              f"node(s) x {shape['tasks_per_node']} GPUs); the config states the job's size: "
                              "drop those keys here, or retarget the config (its cluster section, or "
                              "overrides: [cluster.gpus=N] with a layout that fits there: unimoe plan)")
    return {**fields, **shape}


def _substitute(value, runs: str, path: str, name: str):
    if isinstance(value, str):
        try:
            return value.format(runs=runs)
        except (KeyError, IndexError, ValueError) as e:
            raise CurriculumError(f"{path}: stage {name!r}: {value!r}: only {{runs}} may be used "
                                  f"({e})") from None
    if isinstance(value, list):
        return [_substitute(v, runs, path, name) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, runs, path, name) for k, v in value.items()}
    return value


def sbatch_command(stage: Stage, dependency_ids: list[str]) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--job-name=unimoe-{stage.name}", f"--nodes={stage.nodes}",
           f"--ntasks-per-node={stage.tasks_per_node}", f"--gpus-per-node={stage.gpus_per_node or 0}",
           f"--cpus-per-task={stage.cpus_per_task}"]
    if stage.time:
        cmd.append(f"--time={stage.time}")
    if stage.partition:
        cmd.append(f"--partition={stage.partition}")
    if stage.account:
        cmd.append(f"--account={stage.account}")
    cmd.append(f"--output={os.path.join(stage.run_dir, 'slurm-%j.out')}")
    if dependency_ids:
        cmd += [f"--dependency=afterok:{':'.join(dependency_ids)}", "--kill-on-invalid-dep=yes"]
    cmd += stage.extra_args + ["--export=ALL", stage.template]
    return cmd


def job_env(stage: Stage, root: str) -> dict[str, str]:
    """The variables the template and slurm/launch.sh read (order kept for printing)."""
    return {"UNIMOE_ROOT": root, "CONFIG": stage.config, "RUN_DIR": stage.run_dir,
            "TRAIN_ARGS": " ".join(stage.train_args), "OVERRIDES": " ".join(stage.overrides),
            "UNIMOE_RETRIES": str(stage.retries), **stage.env}


def cluster_gpus(partition: str | None = None) -> str | None:
    """The GPU GRES sinfo reports for the partition (e.g. "gpu:h100:8"), "" when it has none, None when
    sinfo cannot tell (no SLURM here)."""
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    gres = [g for line in out.stdout.split() for g in line.split(",") if g.startswith("gpu")]
    return gres[0] if gres else ""


def resolve_gpus(stages: list[Stage], gpus_of=cluster_gpus) -> list[str]:
    """Stages that left gpus_per_node out get 0, unless their partition has GPUs: then a CurriculumError
    (training on CPU next to idle GPUs is never what was meant). Returns warnings for stages that could
    not be checked (no sinfo)."""
    warnings = []
    for stage in stages:
        if stage.gpus_per_node is not None:
            continue
        gres = gpus_of(stage.partition)
        if gres:
            raise CurriculumError(f"stage {stage.name!r}: gpus_per_node is not set and partition "
                                  f"{stage.partition or '(default)'} has GPUs ({gres}); set gpus_per_node: "
                                  "N (= tasks_per_node, one task per GPU), or 0 to train on CPU")
        if gres is None:
            warnings.append(f"stage {stage.name!r}: gpus_per_node is not set and sinfo cannot tell whether "
                            "the cluster has GPUs; submitted as CPU-only (gpus_per_node: 0)")
        stage.gpus_per_node = 0
    return warnings


def _abs(path: str, root: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def check_stage(stage: Stage, root: str) -> None:
    """Template and config exist; the config's layout fits its target (`unimoe plan`) and is valid for the
    job's world size."""
    for key in ("template", "config"):
        if not os.path.exists(_abs(getattr(stage, key), root)):
            raise CurriculumError(f"stage {stage.name!r}: {key} {getattr(stage, key)} does not exist")
    from training.config import ConfigError, load_config

    try:
        cfg = load_config(_abs(stage.config, root), stage.overrides)
        if cfg.cluster.gpus:  # its layout fits its target by `unimoe plan`
            from training.cluster.plan_fit import target_memory
            need, have = target_memory(cfg)
            if need > have:
                raise ConfigError(f"its layout tp={cfg.parallel.tp} ep={cfg.parallel.ep} needs {need:.1f} "
                                  f"GiB per GPU on its target ({cfg.cluster.gpus} x {cfg.cluster.gpu}, "
                                  f"{have:.1f} GiB) by `unimoe plan`; `unimoe plan --config {stage.config}` "
                                  "says what fits")
        cfg.validate(world_size=stage.world_size)
    except ConfigError as e:
        raise CurriculumError(f"stage {stage.name!r} ({stage.nodes} node(s) x {stage.tasks_per_node} tasks): "
                              f"{e}") from None


def dry_run_script(stages: list[Stage], root: str, curriculum: str) -> str:
    lines = [f"# unimoe slurm submit --curriculum {curriculum}: {len(stages)} jobs, chained with afterok",
             f"cd {shlex.quote(root)}",
             "mkdir -p " + " ".join(shlex.quote(s.run_dir) for s in stages)]
    by_name = {s.name: s for s in stages}
    for stage in stages:
        deps = ["$" + by_name[d].job_var for d in stage.after]
        env = job_env(stage, "$PWD")
        assigns = " ".join(f"{k}={v if v == '$PWD' else shlex.quote(v)}" for k, v in env.items())
        cmd = " ".join(shlex.quote(a) if not a.startswith("--dependency=") else a
                       for a in sbatch_command(stage, deps))
        lines.append(f"# {stage.name}: {stage.nodes} node(s) x {stage.tasks_per_node} tasks "
                     f"({stage.gpus_per_node or 0} GPU(s) per node), after: {', '.join(stage.after) or '-'}")
        lines.append(f"{stage.job_var}=$({assigns} \\\n    {cmd})")
        lines.append(f'echo "{stage.name}: job ${stage.job_var}"')
    return "\n".join(lines) + "\n"


def submit(stages: list[Stage], root: str) -> dict[str, str]:
    """Submits in order; returns {stage name: job id}. On a failed sbatch, names what was submitted."""
    ids: dict[str, str] = {}
    for stage in stages:
        os.makedirs(_abs(stage.run_dir, root), exist_ok=True)
        cmd = sbatch_command(stage, [ids[d] for d in stage.after])
        env = {**os.environ, **job_env(stage, root)}
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            done = ", ".join(f"{k}={v}" for k, v in ids.items()) or "none"
            cancel = f" (scancel {' '.join(ids.values())})" if ids else ""
            raise CurriculumError(f"sbatch for stage {stage.name!r} failed ({proc.returncode}): "
                                  f"{proc.stderr.strip()}\n  command: {shlex.join(cmd)}\n"
                                  f"  already submitted: {done}{cancel}")
        ids[stage.name] = proc.stdout.strip().split(";")[0]
        after = " after " + ",".join(f"{d}({ids[d]})" for d in stage.after) if stage.after else ""
        print(f"{stage.name}: job {ids[stage.name]} ({stage.nodes}x{stage.tasks_per_node} tasks, "
              f"run dir {stage.run_dir}){after}", flush=True)
    return ids


def job_size_note(config: str, overrides: list[str], ntasks: int) -> str | None:
    """The line slurm/launch.sh logs when a job (sbatch of a template with other --nodes, say) is not the size
    its config is sized for (cluster.gpus); None when it is, or the config states no target."""
    from training.config import ConfigError, load_config
    try:
        cluster = load_config(config, overrides).cluster
    except ConfigError:
        return None  # `unimoe train` names the problem
    if not cluster.gpus or cluster.gpus == ntasks:
        return None
    return (f"warning: {config} is sized for cluster.gpus={cluster.gpus} x {cluster.gpu}, this job has "
            f"{ntasks} task(s): its layout was planned for {cluster.gpus} (check: unimoe plan --config "
            f"{config} --gpus {ntasks})")


def run_cli(args) -> int:
    root = REPO_ROOT
    try:
        stages = load_curriculum(args.curriculum, runs=getattr(args, "runs", None))
        for warning in resolve_gpus(stages):
            print(f"# warning: {warning}", file=sys.stderr)
        for stage in stages:
            try:
                check_stage(stage, root)
            except CurriculumError as e:
                if not args.dry_run:
                    raise
                print(f"# warning: {e}", file=sys.stderr)
        if args.dry_run:
            print(dry_run_script(stages, root, args.curriculum), end="")
            return 0
        ids = submit(stages, root)
    except CurriculumError as e:
        print(f"unimoe slurm submit: error: {e}", file=sys.stderr)
        return 2
    print("job ids: " + " ".join(ids.values()))
    return 0


if __name__ == "__main__":  # slurm/launch.sh: python -m training.cluster.slurm CONFIG NTASKS [OVERRIDE ...]
    _note = job_size_note(sys.argv[1], sys.argv[3:], int(sys.argv[2]))
    if _note:
        print(_note, file=sys.stderr)
