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
6. eval of every model: validation loss per task, routing report, and the audio scores of what it
   generates for the first validation items (DNSMOS, WER, music caption score; `eval --audio-metrics`),
   with the codec ceiling (the references through the codec); two sample WAVs of the curriculum model and
   two reference reconstructions in OUT/samples; the table at the end (OUT/results.md, OUT/results.json).

Each training stage is a `unimoe train` subprocess with the tiny configs; step counts are a fixed
function of `--minutes` (training/demo/budget.py: the idle 2-core time of each step, measured once),
so a busy machine runs the same models, only slower. Re-running into the same --out replaces the
previous demo's runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from training.config import REPO_ROOT
from training.demo.budget import StageRun, make_stages, plan_steps, predicted_seconds, stage_timeout
from training.demo.results import results_json, results_table

AUDIO_ITEMS = 8  # validation items per task that each model generates for the audio scores


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
    A stage still running after `timeout_s`, or an interrupted demo, stops its processes."""
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
    """Poll until every process ended: progress lines; stop them all after `deadline`."""
    reported = {st.key: 0 for st, _, _, _ in procs}
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
            due = step >= reported[st.key] + max(1, st.steps // 4)
            if due or (step == st.steps and reported[st.key] < step):
                reported[st.key] = step
                _say(f"  {st.key}: step {step}/{st.steps} loss {m.get('loss', float('nan')):.3f}")
    for st, _, _, t0 in procs:
        st.wall_s = time.time() - t0


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


def _reference_wavs(eval_dir: str, wav_dir: str) -> list[str]:
    """Copy the first validation reference of each task, decoded by the codec, beside the samples."""
    detail = os.path.join(eval_dir, "audio_metrics.json")
    if not os.path.exists(detail):
        return []
    with open(detail) as f:
        items = json.load(f)["items"].get("reference", [])
    out = []
    for task in ("speech", "music"):
        first = next((it for it in items if it["task"] == task), None)
        if first:
            out.append(os.path.join(wav_dir, f"reference_{task}.wav"))
            shutil.copyfile(os.path.join(eval_dir, "audio", "reference", f"{first['id']}.wav"), out[-1])
            with open(os.path.splitext(out[-1])[0] + ".txt", "w") as f:
                f.write(first["text"] + "\n")
    return out


def _valid_mix(data: dict) -> str:
    for key in ("valid", "valid_balanced", "balanced_valid"):
        if key in data:
            return str(data[key])
    raise KeyError(f"the demo corpus has no validation mixture (keys: {sorted(data)})")


def _run(args) -> int:
    import warnings

    from data_prep.demo import ensure_demo_data
    from training.checkpoint.inference import load_everything
    from training.eval.evaluate import AudioMetricsOptions, evaluate, summary_lines
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
    plan_steps(budget, stages)
    _say(f"plan (fixed for --minutes {args.minutes:g}: {predicted_seconds(stages):.0f} s on an idle 2-core "
         f"machine, longer on a busy one): " + ", ".join(f"{k} {st.steps} steps" for k, st in stages.items()))
    t_train = time.time()
    _say("stage 1: the speech and music specialists, side by side")
    run_stages([stages["speech"], stages["music"]], root, args.seed, stage_timeout(stages["speech"]))
    _say("stage 2: upcycle both specialists into the MoE model; experts frozen (2 processes, EP=2)")
    stages["stage2"].overrides = [f"stage.init_from=[{stages['speech'].out_dir(root)},"
                                  f"{stages['music'].out_dir(root)}]"]
    run_stages([stages["stage2"]], root, args.seed, stage_timeout(stages["stage2"]))
    _say("stage 3: everything trainable on the balanced mixture (2 processes, EP=2)")
    stages["stage3"].overrides = [f"stage.init_from=[{stages['stage2'].out_dir(root)}]"]
    run_stages([stages["stage3"]], root, args.seed, stage_timeout(stages["stage3"]))
    _say("baseline: the same MoE model from scratch on the unbalanced mixture, same number of samples")
    run_stages([stages["joint"]], root, args.seed, stage_timeout(stages["joint"]))
    train_wall = time.time() - t_train
    with open(os.path.join(root, "demo_config.json"), "w") as f:  # what this demo ran (each run: config.yaml)
        json.dump({"minutes": args.minutes, "seed": args.seed, "training_wall_s": round(train_wall, 1),
                   "stages": {k: {"config": st.config, "steps": st.steps, "global_batch": st.batch,
                                  "lr": st.lr, "overrides": st.overrides, "wall_s": round(st.wall_s, 1)}
                              for k, st in stages.items()}}, f, indent=2)

    evals = {}
    shutil.rmtree(os.path.join(root, "eval"), ignore_errors=True)
    metrics = all(importlib.util.find_spec(m) is not None for m in ("speechmos", "librosa", "pocketsphinx"))
    if not metrics:
        _say("NOTE: the metrics extra is not installed (pip install '.[metrics]'): no audio scores")
    for key, st in stages.items():
        audio = None
        if metrics:  # the codec ceiling once, with the curriculum model; a specialist on its own task only
            audio = AudioMetricsOptions(AUDIO_ITEMS, args.seed, references=key == "stage3",
                                        tasks={"speech": ("speech",), "music": ("music",)}.get(key))
        evals[key] = evaluate(st.out_dir(root), valid, out_dir=os.path.join(root, "eval", key),
                              routing=st.moe, audio=audio)
        for line in summary_lines(evals[key]):
            _say(f"eval {key}: {line}")
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
    wavs += _reference_wavs(os.path.join(root, "eval", "stage3"), wav_dir)
    _audio_to_tensorboard(wavs, os.path.join(root, "eval", "stage3", "tb"))

    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results_json(stages, evals), f, indent=2)
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
