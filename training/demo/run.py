"""`unimoe demo`: the whole pipeline on the built-in corpus, on CPU, in minutes.

    unimoe demo [--out runs/demo] [--minutes 12]

1. data: the built-in corpus (espeak-ng speech, rendered music), prepared with the codec and mixed
   (data_prep.demo.ensure_demo_data, cached);
2. stage 1: the dense speech and music specialists (two runs, side by side, one process each);
3. stage 2: upcycle both into the MoE model, experts frozen, gates + shared experts trained on the
   balanced seed set (2 gloo processes, EP=2);
4. stage 3: everything unfrozen on the balanced mixture (2 processes, EP=2);
5. the naive joint baseline: the same MoE model from scratch on the unbalanced mixture, with the
   same number of training samples as the whole curriculum;
6. eval (validation loss per task, routing report) and generation (WAVs) of the curriculum model;
   a markdown table at the end (also written to OUT/results.md).

Each training stage is a `unimoe train` subprocess with the tiny configs; step counts are scaled
to `--minutes` (the wall-clock budget of the training stages) from per-step and per-launch
estimates that are re-measured after stage 1 and stage 2. Re-running into the same --out replaces
the previous demo's runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from training.config import REPO_ROOT
from training.demo.budget import Estimates, StageRun, make_stages, plan_steps, remeasure, stage_timeout


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _train_cmd(st: StageRun, root: str, seed: int) -> list[str]:
    warmup = max(1, st.steps // 10)
    return [sys.executable, "-m", "training.cli", "train", "--config", st.config, "--out", st.out_dir(root),
            "--nproc", str(st.nproc), "--max-steps", str(st.steps), "--save-every", "0",
            f"max_steps={st.steps}", f"seed={seed}", f"optim.warmup_steps={warmup}",
            f"optim.schedule_steps={st.steps}",
            f"logging.eval_every={max(1, st.steps // 4)}",  # validation loss 4 times per stage
            *st.overrides]


def _last_metrics(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    last = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        last = json.loads(line)
                    except json.JSONDecodeError:
                        pass  # a line being written
    return last


def _stop(proc: subprocess.Popen) -> None:
    """End a `unimoe train` launcher and its ranks (their own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stages(group: list[StageRun], root: str, seed: int, timeout_s: float = 3600.0) -> None:
    """Run one or more `unimoe train` subprocesses side by side; progress from their metrics.jsonl.

    Also measures each stage's time per step (from when its metrics lines appear) and its fixed cost
    (process start, imports, deepspeed.initialize, final save) = wall - steps * time per step.
    A stage still running after `timeout_s`, or an interrupted demo, stops its processes.
    """
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    procs = []
    t_start = time.time()
    try:
        for st in group:
            if os.path.exists(st.out_dir(root)):  # an earlier demo in the same --out: start clean
                shutil.rmtree(st.out_dir(root))
            os.makedirs(st.out_dir(root))
            log = open(os.path.join(st.out_dir(root), "train.log"), "w")
            _say(f"{st.title}: {st.steps} steps x {st.batch} samples, {st.nproc} process(es) "
                 f"-> {st.out_dir(root)}")
            proc = subprocess.Popen(_train_cmd(st, root, seed), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO_ROOT, start_new_session=True)
            procs.append((st, proc, log, time.time()))
        _watch(procs, root, t_start + timeout_s)
    finally:
        for _, proc, log, _ in procs:
            _stop(proc)
            log.close()
    failed = [st for st, p, _, _ in procs if p.returncode != 0]
    for st in failed:
        with open(os.path.join(st.out_dir(root), "train.log")) as f:
            tail = f.readlines()[-40:]
        print("".join(tail), file=sys.stderr)
    if failed:
        raise RuntimeError(f"training failed: {', '.join(s.key for s in failed)} (logs: "
                           f"{', '.join(os.path.join(s.out_dir(root), 'train.log') for s in failed)})")
    for st in group:
        _say(f"{st.title}: done in {st.wall_s:.0f} s, final loss "
             f"{_last_metrics(st.out_dir(root)).get('loss', float('nan')):.3f}")


def _watch(procs: list, root: str, deadline: float) -> None:
    """Poll until every process ended: progress lines, step timing; stop them all after `deadline`."""
    reported = {st.key: 0 for st, _, _, _ in procs}
    seen = {st.key: [] for st, _, _, _ in procs}  # (time, step) when a new step first appeared
    while any(p.poll() is None for _, p, _, _ in procs):
        time.sleep(1.0)
        if time.time() > deadline:
            _say("a stage ran far past its time budget: stopping it")
            for _, p, _, _ in procs:
                _stop(p)
            break
        for st, _, _, _ in procs:
            m = _last_metrics(st.out_dir(root))
            step = int(m.get("step", 0))
            if step and (not seen[st.key] or seen[st.key][-1][1] != step):
                seen[st.key].append((time.time(), step))
            due = step >= reported[st.key] + max(1, st.steps // 4)
            if due or (step == st.steps and reported[st.key] < step):
                reported[st.key] = step
                _say(f"  {st.key}: step {step}/{st.steps} loss {m.get('loss', float('nan')):.3f}")
    for st, _, _, t0 in procs:
        st.wall_s = time.time() - t0
        pts = seen[st.key]
        if len(pts) >= 2 and pts[-1][1] > pts[0][1]:
            st.step_s = (pts[-1][0] - pts[0][0]) / (pts[-1][1] - pts[0][1])
            st.overhead_s = max(0.0, st.wall_s - st.steps * st.step_s)


def results_table(stages: dict[str, StageRun], evals: dict[str, dict]) -> str:
    """The markdown table: validation loss per task (lower is better) for each model."""
    def fmt(key, task, own=None):
        if own is not None and task != own:
            return "—"
        loss = evals.get(key, {}).get("loss_per_task", {}).get(task)
        return f"{loss:.3f}" if loss is not None else "n/a"

    rows = [("speech", "speech"), ("music", "music"), ("stage2", None), ("stage3", None), ("joint", None)]
    lines = ["| model | speech val loss | music val loss | steps | train samples | peak lr | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for key, own in rows:
        st = stages[key]
        lines.append(f"| {st.title} | {fmt(key, 'speech', own)} | {fmt(key, 'music', own)} | {st.steps} | "
                     f"{st.steps * st.batch} | {st.lr:g} | {st.wall_s:.0f} |")
    curriculum = sum(stages[k].steps * stages[k].batch for k in ("speech", "music", "stage2", "stage3"))
    lines.append("")
    n_valid = evals.get("stage3", {}).get("samples", "?")
    lines.append(f"Validation loss = cross-entropy summed over the codebooks, on {n_valid} samples of the "
                 f"balanced validation mixture (lower is better; a specialist only on its own task). "
                 f"Training samples: curriculum {curriculum} in total, joint baseline "
                 f"{stages['joint'].steps * stages['joint'].batch}.")
    for key in ("stage3", "joint"):
        routing = evals.get(key, {}).get("routing", {}).get("summary")
        if routing:
            ept, null = routing["experts_per_token"], routing["null_share"]
            lines.append(f"Routing, {stages[key].title}: experts/token speech {ept['speech']:.2f} "
                         f"music {ept['music']:.2f}; null share speech {null['speech']:.2f} "
                         f"music {null['music']:.2f}; speech/music divergence "
                         f"{routing['task_divergence']:.2f}")
    return "\n".join(lines)


def _codec_of(mix_json: str) -> dict:
    with open(mix_json) as f:
        return json.load(f).get("codec", {})


def _audio_to_tensorboard(wavs: list[str], logdir: str) -> None:
    import soundfile as sf
    import torch
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    for path in wavs:
        audio, sr = sf.read(path, dtype="float32")
        name = os.path.splitext(os.path.basename(path))[0]
        writer.add_audio(f"samples/{name}", torch.from_numpy(audio)[None], 0, sample_rate=sr)
    writer.close()


def _valid_mix(data: dict) -> str:
    for key in ("valid", "valid_balanced", "balanced_valid"):
        if key in data:
            return str(data[key])
    raise KeyError(f"the demo corpus has no validation mixture (keys: {sorted(data)})")


def _run(args) -> int:
    import warnings

    from data_prep.demo import ensure_demo_data
    from training.checkpoint.inference import load_everything
    from training.eval.evaluate import evaluate
    from training.eval.generate_cli import generate_to_files

    warnings.filterwarnings("ignore", category=FutureWarning)  # encodec's weight_norm deprecation
    t_start = time.time()
    root = os.path.abspath(args.out)
    os.makedirs(root, exist_ok=True)
    budget = args.minutes * 60.0
    _say(f"output in {root}; training budget {args.minutes:g} min")

    _say("data: built-in demo corpus (espeak-ng speech + rendered music; made once, then cached)")
    t0 = time.time()
    data = ensure_demo_data()
    valid = _valid_mix(data)
    codec = _codec_of(valid)
    _say(f"data ready in {time.time() - t0:.0f} s; codec {codec.get('name')} "
         f"({codec.get('num_codebooks')} codebooks at {codec.get('frame_rate')} Hz)")
    untrained = codec.get("trained") is False
    if untrained:
        _say("NOTE: the codec is randomly initialised (no pretrained EnCodec weights on this machine): "
             "losses and routing are real, generated audio is noise-like")

    stages = make_stages()
    est = Estimates()
    plan_steps(budget, est, stages)
    _say("plan: " + ", ".join(f"{k} {st.steps} steps" for k, st in stages.items()))
    t_train = time.time()
    _say("stage 1: the speech and music specialists, side by side")
    run_stages([stages["speech"], stages["music"]], root, args.seed, stage_timeout(est, stages["speech"]))
    remeasure(est, max(stages["speech"], stages["music"], key=lambda s: s.wall_s))
    plan_steps(budget - (time.time() - t_train), est, stages, done=("speech", "music"))
    _say("re-planned: " + ", ".join(f"{k} {stages[k].steps} steps" for k in ("stage2", "stage3", "joint")))
    _say("stage 2: upcycle both specialists into the MoE model; experts frozen (2 processes, EP=2)")
    stages["stage2"].overrides = [f"stage.init_from=[{stages['speech'].out_dir(root)},"
                                  f"{stages['music'].out_dir(root)}]"]
    run_stages([stages["stage2"]], root, args.seed, stage_timeout(est, stages["stage2"]))
    remeasure(est, stages["stage2"], steps=False)
    plan_steps(budget - (time.time() - t_train), est, stages, done=("speech", "music", "stage2"))
    _say("re-planned: " + ", ".join(f"{k} {stages[k].steps} steps" for k in ("stage3", "joint")))
    _say("stage 3: everything trainable on the balanced mixture (2 processes, EP=2)")
    stages["stage3"].overrides = [f"stage.init_from=[{stages['stage2'].out_dir(root)}]"]
    run_stages([stages["stage3"]], root, args.seed, stage_timeout(est, stages["stage3"]))
    _say("baseline: the same MoE model from scratch on the unbalanced mixture, same number of samples")
    run_stages([stages["joint"]], root, args.seed, stage_timeout(est, stages["joint"]))
    train_wall = time.time() - t_train
    with open(os.path.join(root, "demo_config.json"), "w") as f:  # what this demo ran (each run: config.yaml)
        json.dump({"minutes": args.minutes, "seed": args.seed, "training_wall_s": round(train_wall, 1),
                   "stages": {k: {"config": st.config, "steps": st.steps, "global_batch": st.batch,
                                  "lr": st.lr, "overrides": st.overrides, "wall_s": round(st.wall_s, 1)}
                              for k, st in stages.items()}}, f, indent=2)

    evals = {}
    shutil.rmtree(os.path.join(root, "eval"), ignore_errors=True)
    for key, st in stages.items():
        evals[key] = evaluate(st.out_dir(root), valid, out_dir=os.path.join(root, "eval", key),
                              routing=st.moe)
        losses = ", ".join(f"{t} {v:.3f}" for t, v in evals[key]["loss_per_task"].items())
        _say(f"eval {key}: validation loss {losses}")
    _say("generate: one speech and one music clip from the curriculum model")
    wav_dir = os.path.join(root, "samples")
    loaded = load_everything(stages["stage3"].out_dir(root))
    quiet = lambda *a: None  # noqa: E731
    wavs = generate_to_files("", "speech", "The quick brown fox jumps over the lazy dog.",
                             os.path.join(wav_dir, "speech.wav"), seed=args.seed, max_seconds=3.0,
                             loaded=loaded, log=quiet, progress=False)
    wavs += generate_to_files("", "music", "a calm piano melody in A minor",
                              os.path.join(wav_dir, "music.wav"), seed=args.seed, max_seconds=3.0,
                              loaded=loaded, log=quiet, progress=False)

    _audio_to_tensorboard(wavs, os.path.join(root, "eval", "stage3", "tb"))

    lines = ["# unimoe demo results", "", results_table(stages, evals), ""]
    if untrained:
        lines.append("NOTE: the codec is randomly initialised (no pretrained EnCodec weights here): losses "
                     "and routing are real, the WAVs are noise-like.")
    lines += ["", f"- WAVs: {', '.join(wavs)}",
              f"- routing report: {os.path.join(root, 'eval', 'stage3', 'routing.json')} and "
              f"routing_load.png beside it (joint baseline: {os.path.join(root, 'eval', 'joint')})",
              f"- tensorboard: tensorboard --logdir {root}",
              f"- wall time: training {train_wall:.0f} s, total {time.time() - t_start:.0f} s"]
    text = "\n".join(lines)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text, flush=True)
    return 0


def run_cli(args) -> int:
    # SIGTERM (and Ctrl-C) unwind through run_stages, which stops the training processes it started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args)
    except RuntimeError as e:  # a failed stage: its log tail was printed above
        print(f"unimoe demo: {e}", file=sys.stderr)
        return 1
