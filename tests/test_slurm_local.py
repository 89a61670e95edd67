"""The SLURM templates on a real local SLURM of two nodes on this host: CPU, tiny configs.

    bash scripts/test.sh tests/test_slurm_local.py        # starts the local 2-node SLURM first
    .venv/bin/pytest tests/test_slurm_local.py             # starts it here when SLURM_CONF is not set

Skipped, with the reason, only when SLURM cannot start (packages missing, not root, daemons fail).
The nodes n1, n2 (scripts/local_slurm.sh start --nodes 2) each have the host's 2 CPUs. Multi-node: a
stage on 2 nodes x 1 task (EP=2 across the nodes) preempted with USR1, requeued and resumed exactly; a
task killed on one node failing the job, which the stage's bounded retry resumes from its newest checkpoint.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from training.cluster.ports import PORT_RANGE, job_port
from training.cluster.slurm import REPO_ROOT

pytestmark = pytest.mark.slurm

SCRIPT = os.path.join(REPO_ROOT, "scripts", "local_slurm.sh")
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
SUBMITTED: list[str] = []  # cancelled at the end of the module, whatever happened
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _ping() -> bool:
    return shutil.which("scontrol") is not None and _run(["scontrol", "ping"]).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    """A running SLURM: the one scripts/test.sh started (SLURM_CONF), or one started here."""
    if os.environ.get("SLURM_CONF") and _ping():
        yield os.environ["SLURM_CONF"]
        if SUBMITTED:
            _run(["scancel", *SUBMITTED])  # no-op for finished jobs; no test leaves work running
        return
    if not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch")):
        pytest.skip("SLURM is not installed: apt-get install slurm-wlm munge (scripts/test.sh does it "
                    "as root)")
    env = {**os.environ, "UNIMOE_SLURM_OWNER": str(os.getpid())}
    proc = _run([SCRIPT, "start", "--nodes", "2"], env=env)
    if proc.returncode != 0:
        pytest.skip(f"the local SLURM could not start (scripts/local_slurm.sh start): {proc.stderr[-800:]}")
    exports = dict(re.findall(r"^export (\w+)=(.*)$", proc.stdout, re.M))
    saved = {k: os.environ.get(k) for k in exports}
    os.environ.update(exports)
    try:
        yield exports["SLURM_CONF"]
    finally:
        _run([SCRIPT, "stop"], env=os.environ)  # cancels the jobs, then stops the daemons
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def two_nodes(slurm):
    nodes = set(_run(["sinfo", "-h", "-N", "-o", "%N"]).stdout.split())
    if len(nodes) < 2:
        pytest.fail(f"the running SLURM has {len(nodes)} node(s) {sorted(nodes)}; the multi-node tests need "
                    "two: scripts/local_slurm.sh stop; scripts/local_slurm.sh start --nodes 2")
    return sorted(nodes)


def hostnames(nodelist: str) -> list[str]:
    return _run(["scontrol", "show", "hostnames", nodelist]).stdout.split()


def job_info(job_id: str) -> dict:
    out = _run(["scontrol", "show", "job", "-o", job_id]).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def sbatch(args: list[str], env: dict | None = None) -> str:
    proc = _run(["sbatch", "--parsable", *args], cwd=REPO_ROOT, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    SUBMITTED.append(proc.stdout.strip().split(";")[0])
    return SUBMITTED[-1]


def _logs(paths, tail: int | None = 3000) -> str:
    """The job logs: the last `tail` characters of each (for failure messages), or whole (tail=None)."""
    text = []
    for p in paths:
        if os.path.exists(p):
            with open(p, errors="replace") as f:
                text.append(f"--- {p}\n" + f.read()[-(tail or 0):])
    return "\n".join(text)


def wait_jobs(ids: list[str], timeout: float, logs=()) -> dict[str, dict]:
    """Waits until every job reached a final state; cancels all of them on timeout."""
    end = time.time() + timeout
    while True:
        infos = {j: job_info(j) for j in ids}
        if all(i.get("JobState") in DONE for i in infos.values()):
            return infos
        if time.time() > end:
            _run(["scancel", *ids])
            states = {j: i.get("JobState") for j, i in infos.items()}
            pytest.fail(f"jobs not finished after {timeout:.0f} s: {states}\n{_logs(logs)}")
        time.sleep(1)


def final_loss(run_dir: str) -> tuple[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    return last["step"], last["loss"]


@pytest.mark.parametrize("nodes, per_node", [(1, 2), (2, 1)])
def test_launch_sh_maps_srun_tasks_to_torch_ranks(two_nodes, tmp_path, nodes, per_node):
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "SLURM_NODEID", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
    (tmp_path / "probe.py").write_text(f"import json, os\nenv = {{k: os.environ.get(k) for k in {keys}}}\n"
                                       f"json.dump(env, open('{tmp_path}/rank' + env['RANK'], 'w'))\n")
    (tmp_path / "job.sh").write_text(
        f"#!/bin/bash\nsource {REPO_ROOT}/slurm/launch.sh && unimoe_env && unimoe_master || exit 1\n"
        f"unimoe_srun python {tmp_path}/probe.py\n")
    shape = [f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--cpus-per-task=1", "--gpus-per-node=0"]
    job = sbatch([*shape, f"--output={tmp_path}/out", str(tmp_path / "job.sh")])
    info = wait_jobs([job], 60, [tmp_path / "out"])[job]
    assert info["JobState"] == "COMPLETED", _logs([tmp_path / "out"])
    ranks = [json.load(open(tmp_path / f"rank{r}")) for r in range(2)]
    first = hostnames(info["NodeList"])[0]
    assert len(hostnames(info["NodeList"])) == nodes
    # the job's port of training.cluster.ports (15000-29999, below the ephemeral ports), or the next free one
    port = int(ranks[0]["MASTER_PORT"])
    assert job_port(job) <= port < job_port(job) + 50 and port < PORT_RANGE[1]
    for r, env in enumerate(ranks):
        local, node = (r, 0) if nodes == 1 else (0, r)
        assert env == {"RANK": str(r), "LOCAL_RANK": str(local), "WORLD_SIZE": "2",
                       "LOCAL_WORLD_SIZE": str(per_node), "MASTER_ADDR": first, "MASTER_PORT": str(port),
                       "SLURM_NODEID": str(node), "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def test_failed_stage_retries_a_bounded_number_of_times(slurm, tmp_path):
    """A stage command that keeps failing (not preempted): the job requeues itself UNIMOE_RETRIES=1 time,
    then fails with the command's exit code (so `afterok` dependents are cancelled)."""
    run_dir = tmp_path / "run"
    (tmp_path / "job.sh").write_text(
        f"#!/bin/bash\nsource {REPO_ROOT}/slurm/launch.sh && unimoe_env && unimoe_master || exit 1\n"
        f"RUN_DIR={run_dir}; mkdir -p $RUN_DIR\nunimoe_stage bash -c 'echo attempt; exit 3'\n")
    job = sbatch(["--nodes=1", "--ntasks=1", "--requeue", "--open-mode=append", f"--output={tmp_path}/out",
                  str(tmp_path / "job.sh")], env={"UNIMOE_RETRIES": "1"})
    info = wait_jobs([job], 120, [tmp_path / "out"])[job]
    text = _logs([tmp_path / "out"], tail=None)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", text
    assert int(info["Restarts"]) == 1 and text.splitlines().count("attempt") == 2, text
    assert "retry 1 of 1" in text and "giving up" in text, text
    assert (run_dir / f"slurm-{job}.failures").read_text().strip() == "2"


@pytest.fixture(scope="module")
def curriculum(slurm, tmp_path_factory):
    """The tiny curriculum submitted with `unimoe slurm submit`, run to the end."""
    runs = str(tmp_path_factory.mktemp("curriculum"))
    t0 = time.time()
    proc = _run([sys.executable, "-m", "training.cli", "slurm", "submit", "--curriculum",
                 "training/configs/tiny/curriculum.yaml", "--runs", runs], cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    ids = dict(re.findall(r"^(\w+): job (\d+)", proc.stdout, re.M))
    SUBMITTED.extend(ids.values())
    assert list(ids) == ["stage1_speech", "stage1_music", "stage2", "stage3"], proc.stdout
    logs = [os.path.join(runs, name, f"slurm-{j}.out") for name, j in ids.items()]
    infos = wait_jobs(list(ids.values()), 600, logs)
    return {"runs": runs, "ids": ids, "infos": infos, "logs": logs, "seconds": time.time() - t0}


def test_tiny_curriculum_chain_completes_with_afterok(curriculum):
    from training.checkpoint.manifest import find_checkpoint

    ids, infos, runs = curriculum["ids"], curriculum["infos"], curriculum["runs"]
    states = {name: infos[j]["JobState"] for name, j in ids.items()}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{_logs(curriculum['logs'])}"
    for name in ids:
        assert find_checkpoint(os.path.join(runs, name)) is not None, f"{name}: no complete checkpoint"
        step, loss = final_loss(os.path.join(runs, name))
        assert step == 6 and loss == loss  # the tiny configs' max_steps; finite
    # afterok: stage 2 started after both specialists ended, stage 3 after stage 2
    start = {n: infos[j]["StartTime"] for n, j in ids.items()}
    end = {n: infos[j]["EndTime"] for n, j in ids.items()}
    assert start["stage2"] >= max(end["stage1_speech"], end["stage1_music"])
    assert start["stage3"] >= end["stage2"]
    with open(curriculum["logs"][2]) as f:
        assert "stage1_speech" in f.read()  # stage 2 was upcycled from the specialists' run dirs


def stage3_on_two_nodes(curriculum, run_dir: str, overrides: str = "", env: dict | None = None):
    """The tiny stage 3 (EP=2) from the curriculum's stage-2 run, as 2 nodes x 1 task: (job id, log)."""
    os.makedirs(run_dir, exist_ok=True)
    out = os.path.join(run_dir, "slurm-%j.out")
    init = f"stage.init_from=[{os.path.join(curriculum['runs'], 'stage2')}]"
    job = sbatch(["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                  f"--output={out}", "--export=ALL", "slurm/stage3.sbatch"],
                 env={"UNIMOE_ROOT": REPO_ROOT, "RUN_DIR": run_dir,
                      "CONFIG": "training/configs/tiny/stage3.yaml",
                      "OVERRIDES": f"{init} {overrides}".strip(), **(env or {})})
    return job, out.replace("%j", job)


def wait_for(path: str, job: str, log: str, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > end or job_info(job).get("JobState") in DONE:
            _run(["scancel", job])
            pytest.fail(f"{path} never appeared\n{_logs([log])}")
        time.sleep(0.1)


def losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, f))}


def test_two_node_stage_with_ep2_preempted_requeues_and_resumes_to_the_same_loss(two_nodes, curriculum,
                                                                                 tmp_path):
    """Stage 3 (EP=2) with one rank per node. USR1 to the batch shell (what --signal=B:USR1@T sends before
    the time limit): launch.sh forwards it to the srun tasks on both nodes, training saves and exits 75, the
    job requeues itself and resumes; the losses equal the curriculum's 1-node x 2-task stage 3."""
    run_dir = str(tmp_path / "stage3")
    job, log = stage3_on_two_nodes(curriculum, run_dir)
    # RUN/config.yaml is written once the process group is up, when the signal handlers are installed
    # and step 1 is seconds away: the signal lands inside the training loop
    wait_for(os.path.join(run_dir, "config.yaml"), job, log)
    assert _run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
    info = wait_jobs([job], 400, [log])[job]
    text = _logs([log], tail=None)
    assert info["JobState"] == "COMPLETED", text
    assert hostnames(info["NodeList"]) == two_nodes and "2 tasks on 2 node(s)" in text, text
    assert "world 2 on cpu (tp 1, ep 2, dp 2" in text, text  # the experts split over the two nodes
    assert int(info["Restarts"]) == 1, f"the job was not requeued (did it finish before the signal?)\n{text}"
    assert "requeueing job" in text and re.search(r"resumed .* at step [1-5]\b", text), text
    reference = os.path.join(curriculum["runs"], "stage3")
    assert final_loss(run_dir) == final_loss(reference)
    assert losses(run_dir) == losses(reference)


def _task_pid(job: str, rank: int) -> int | None:
    """The training process of `rank` of the job (both nodes run on this host)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if (env.get(b"SLURM_JOB_ID") == job.encode() and env.get(b"SLURM_PROCID") == str(rank).encode()
                and env.get(b"SLURM_STEP_ID", b"batch") != b"batch" and b"train" in cmd):
            return int(pid)
    return None


def test_task_killed_on_one_node_fails_the_job_and_the_retry_resumes_from_a_checkpoint(two_nodes, curriculum,
                                                                                       tmp_path):
    """SIGKILL to rank 1 (on n2) after the first complete checkpoint: rank 0 fails too, srun exits non-zero,
    launch.sh counts one failure and requeues the job (retries: 1), which resumes from the newest complete
    checkpoint and finishes. Steps 1-6 follow the same LR schedule as the curriculum's stage 3 (schedule_steps
    6), so their losses must equal it, the redone ones included."""
    run_dir = str(tmp_path / "stage3_killed")
    job, log = stage3_on_two_nodes(curriculum, run_dir, "max_steps=12 optim.schedule_steps=6",
                                   env={"UNIMOE_RETRIES": "1", "SRUN_WAIT": "30"})
    wait_for(os.path.join(run_dir, "checkpoints", "step_00000003", "COMPLETE"), job, log)
    pid = _task_pid(job, 1)
    assert pid is not None, f"no rank-1 training process of job {job}\n{_logs([log])}"
    os.kill(pid, signal.SIGKILL)
    info = wait_jobs([job], 400, [log])[job]
    text = _logs([log], tail=None)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text
    assert re.search(r"stage failed \(exit \d+\): retry 1 of 1", text), text
    resumed = re.search(r"resumed .* at step (\d+)", text)
    assert resumed and int(resumed.group(1)) in (3, 6, 9), text
    got, reference = losses(run_dir), losses(os.path.join(curriculum["runs"], "stage3"))
    assert sorted(got) == list(range(1, 13))
    assert {s: got[s] for s in range(1, 7)} == reference


def test_prep_array_with_2_tasks_equals_single_process_prep(slurm, tmp_path):
    from data_prep.fixtures import write_corpus
    from data_prep.text import train_tokenizer

    manifest = write_corpus(str(tmp_path / "corpus"), speech=3, music=3, seconds=0.4)
    with open(manifest) as f:
        texts = [json.loads(line)["text"] for line in f]
    spm = str(tmp_path / "spm.model")
    train_tokenizer(texts + ["a slow calm piano melody in A minor"], spm, vocab_size=64, log=lambda m: None)
    settings = {"MANIFEST": manifest, "TOKENIZER": spm, "CODEC": "random", "SHARD_SIZE": "2", "WORKERS": "0",
                "NUM_SLICES": "2",
                "UNIMOE_ROOT": REPO_ROOT}
    out = str(tmp_path / "array-%A_%a.out")
    job = sbatch(["--array=0-1", "--ntasks=1", "--cpus-per-task=1", f"--output={out}", "--export=ALL",
                  "slurm/prep_array.sbatch"], env={**settings, "OUT": str(tmp_path / "array")})
    single = _run([sys.executable, "-m", "training.cli", "data", "prep", "--manifest", manifest, "--out",
                   str(tmp_path / "single"), "--tokenizer", spm, "--codec", "random", "--workers", "0",
                   "--shard-size", "2"], cwd=REPO_ROOT)
    assert single.returncode == 0, single.stderr
    logs = [out.replace("%A", job).replace("%a", str(i)) for i in range(2)]
    infos = wait_jobs([f"{job}_0", f"{job}_1"], 300, logs)
    assert {i["JobState"] for i in infos.values()} == {"COMPLETED"}, _logs(logs)

    def listing(name):
        with open(tmp_path / name / "shards.json") as f:
            return json.load(f)

    a, s = listing("array"), listing("single")
    assert len(s["shards"]) == 3 and len(a["merged_from"]) == 2  # merged from the 2 slice lists
    assert a["shards"] == s["shards"]  # same items per shard, same sha256 of every shard file
    assert (a["codec"], a["tokenizer"], a["config"]) == (s["codec"], s["tokenizer"], s["config"])
    for entry in s["shards"]:
        for name in entry["files"]:
            assert (tmp_path / "array" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()


def test_dry_run_output_is_a_runnable_script(slurm, tmp_path):
    """The --dry-run script, run by bash, submits the same chain (held here: SBATCH_HOLD, then cancelled)."""
    runs = str(tmp_path / "runs")
    dry = _run([sys.executable, "-m", "training.cli", "slurm", "submit", "--curriculum",
                "training/configs/tiny/curriculum.yaml", "--runs", runs, "--dry-run"], cwd=REPO_ROOT)
    assert dry.returncode == 0, dry.stderr
    proc = _run(["bash", "-e"], input=dry.stdout, cwd=REPO_ROOT, env={**os.environ, "SBATCH_HOLD": "1"})
    ids = dict(re.findall(r"^(\w+): job (\d+)", proc.stdout, re.M))
    SUBMITTED.extend(ids.values())
    try:
        assert proc.returncode == 0 and len(ids) == 4, proc.stderr
        infos = {name: job_info(j) for name, j in ids.items()}
        assert infos["stage2"]["Dependency"] == (f"afterok:{ids['stage1_speech']}(unfulfilled),"
                                                 f"afterok:{ids['stage1_music']}(unfulfilled)")
        assert infos["stage3"]["Dependency"] == f"afterok:{ids['stage2']}(unfulfilled)"
        for name, info in infos.items():
            assert info["Command"].endswith(f"slurm/stage{name[5]}.sbatch")
            assert info["StdOut"] == os.path.join(runs, name, f"slurm-{ids[name]}.out")
            assert (info["NumTasks"], info["MinCPUsNode"]) == ("2", "2")
    finally:
        _run(["scancel", *ids.values()])
