"""The SLURM templates on a real (local, single-node) SLURM: CPU, 2 tasks, tiny configs.

    bash scripts/test.sh tests/test_slurm_local.py        # starts the local SLURM first
    .venv/bin/pytest tests/test_slurm_local.py             # starts it here when SLURM_CONF is not set

Skipped, with the reason, only when SLURM cannot start (packages missing, not root, daemons fail).
The node has 2 CPUs, so one 2-task job runs at a time; the chain runs in about 2 minutes.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

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
    proc = _run([SCRIPT, "start"], env=env)
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


def job_info(job_id: str) -> dict:
    out = _run(["scontrol", "show", "job", "-o", job_id]).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def sbatch(args: list[str], env: dict | None = None) -> str:
    proc = _run(["sbatch", "--parsable", *args], cwd=REPO_ROOT, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    SUBMITTED.append(proc.stdout.strip().split(";")[0])
    return SUBMITTED[-1]


def _logs(paths) -> str:
    text = []
    for p in paths:
        if os.path.exists(p):
            with open(p, errors="replace") as f:
                text.append(f"--- {p}\n" + f.read()[-3000:])
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


def test_launch_sh_maps_srun_tasks_to_torch_ranks(slurm, tmp_path):
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    (tmp_path / "probe.py").write_text(f"import json, os\nenv = {{k: os.environ.get(k) for k in {keys}}}\n"
                                       f"json.dump(env, open('{tmp_path}/rank' + env['RANK'], 'w'))\n")
    (tmp_path / "job.sh").write_text(
        f"#!/bin/bash\nsource {REPO_ROOT}/slurm/launch.sh && unimoe_env && unimoe_master || exit 1\n"
        f"unimoe_srun python {tmp_path}/probe.py\n")
    job = sbatch([*CPU_JOB, f"--output={tmp_path}/out", str(tmp_path / "job.sh")])
    info = wait_jobs([job], 60, [tmp_path / "out"])[job]
    assert info["JobState"] == "COMPLETED", _logs([tmp_path / "out"])
    ranks = [json.load(open(tmp_path / f"rank{r}")) for r in range(2)]
    port = str(20000 + int(job) % 20000)
    for r, env in enumerate(ranks):
        assert env == {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": socket.gethostname().split(".")[0], "MASTER_PORT": port}


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


def test_preempted_stage_requeues_and_resumes_to_the_same_loss(curriculum, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@T sends before the time limit): launch.sh forwards
    it to the srun tasks, training saves and exits 75, the job requeues itself and resumes."""
    run_dir = str(tmp_path / "stage1_speech")
    os.makedirs(run_dir)
    out = os.path.join(run_dir, "slurm-%j.out")
    job = sbatch([*CPU_JOB, f"--output={out}", "--export=ALL", "slurm/stage1.sbatch"],
                 env={"UNIMOE_ROOT": REPO_ROOT, "SPECIALIST": "speech", "RUN_DIR": run_dir,
                      "CONFIG": "training/configs/tiny/stage1_speech.yaml"})
    log = out.replace("%j", job)
    # RUN/config.yaml is written once the process group is up, when the signal handlers are installed
    # and step 1 is seconds away: the signal lands inside the training loop
    started = os.path.join(run_dir, "config.yaml")
    end = time.time() + 300
    while not os.path.exists(started):
        if time.time() > end or job_info(job).get("JobState") in DONE:
            _run(["scancel", job])
            pytest.fail(f"the training never started\n{_logs([log])}")
        time.sleep(0.2)
    assert _run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
    info = wait_jobs([job], 400, [log])[job]
    text = _logs([log])
    assert info["JobState"] == "COMPLETED", text
    assert int(info["Restarts"]) == 1, f"the job was not requeued (did it finish before the signal?)\n{text}"
    assert "requeueing job" in text and re.search(r"resumed .* at step [1-5]\b", text), text
    assert final_loss(run_dir) == final_loss(os.path.join(curriculum["runs"], "stage1_speech"))


def test_prep_array_with_2_tasks_equals_single_process_prep(slurm, tmp_path):
    from data_prep.fixtures import write_corpus
    from data_prep.text import train_tokenizer

    manifest = write_corpus(str(tmp_path / "corpus"), speech=3, music=3, seconds=0.4)
    with open(manifest) as f:
        texts = [json.loads(line)["text"] for line in f]
    spm = str(tmp_path / "spm.model")
    train_tokenizer(texts + ["a slow calm piano melody in A minor"], spm, vocab_size=64, log=lambda m: None)
    settings = {"MANIFEST": manifest, "TOKENIZER": spm, "CODEC": "random", "SHARD_SIZE": "2", "WORKERS": "0",
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
