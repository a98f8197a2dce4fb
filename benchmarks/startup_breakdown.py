"""Start-up as the user sees it: from the command's start to the first training step of the last
of N trials, phase by phase.

    python benchmarks/startup_breakdown.py [--runs 2] [--stop-early] [-- EXTRA CLI FLAGS]

Runs the real command, `python experiments/all_backbones.py`, with the quick settings
(`--epochs 1 --min-size 64 --max-size 96 --num-workers 0 --synthetic-images 16 --no-evaluate`,
five backbones) in a temporary --log-dir, and times it from outside, so it measures what any
user pays and works on any commit of the project:

* the command's start: the time just before the process is started;
* the driver's phases: the millisecond timestamps of its own log lines (imports and flags
  until the first line; the dataset preflight; Ray's start and the plan; the disk check; the
  run directory, run_config.json, the run-control actor and the Tuner until `Tuner.fit()`);
* each trial: its worker process's start (from /proc, matched by the pid in the trial's
  training_info.json), the trainable entered (`trainable_started_at`), `fit` entered, the
  first epoch about to start (data sets, model and optimizer built), and the first training
  step done (the first `logs/progress.json`, written at the end of the first batch);
* the CPU seconds spent by the whole process tree (driver, Ray's daemons, every worker) until
  the last trial's first step, sampled from /proc every 0.1 s. On this shared 2-core machine
  the wall figures swing with the other sessions' load; the CPU seconds move much less, and
  CPU seconds / cores is the wall time the start-up would take with the cores to itself.

With --stop-early the run is stopped (Ctrl-C twice) once every trial has made its first step,
so only start-up is paid for. Prints a table per run and writes
benchmarks/results/startup_breakdown.json (every run's events, the load average before and
after each run). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--epochs", "1", "--min-size", "64", "--max-size", "96", "--num-workers", "0",
         "--synthetic-images", "16", "--no-evaluate"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ ([\w.]+): (.*)$")
# The driver's log lines that close each phase, in order: (phase name, logger, message start).
DRIVER_MARKS = [
    ("driver: imports, flags", "crossdet_ray.tune.launcher", ""),
    ("driver: dataset preflight", "crossdet_ray.tune.launcher", "dataset "),
    ("driver: Ray start, cluster shape, plan", "crossdet_ray.tune.launcher", "Plan for"),
    ("driver: disk check", "crossdet_ray.tune.launcher", "this run will write"),
    ("driver: run dir, run-control actor, Tuner", "crossdet_ray.tune.launcher", "TensorBoard:"),
]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def boot_time() -> float:
    return time.time() - float(Path("/proc/uptime").read_text().split()[0])


def read_stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, CPU seconds, start tick) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    ppid, utime, stime, start = int(fields[1]), int(fields[11]), int(fields[12]), int(fields[19])
    return ppid, (utime + stime) / CLOCK_TICKS, start


def process_name(cmdline: bytes) -> str:
    """`ray::RunControl` for a Ray worker (its title, less the method), else the program and
    its script's file name (`python dashboard.py`, `raylet`)."""
    argv = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    if not argv:
        return ""
    if argv[0].startswith("ray::"):
        return argv[0].split(".")[0].split(" ")[0]
    words = [os.path.basename(argv[0].split(" ")[0])]
    script = next((a for a in argv[1:] if not a.startswith("-")), None)
    if script and words[0].startswith("python"):
        words.append(os.path.basename(script))
    return " ".join(words)[:60]


class TreeSampler(threading.Thread):
    """Samples every process under `root` (pid): start time, CPU seconds, name over time."""

    def __init__(self, root: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.boot = boot_time()
        self.processes: dict[int, dict[str, Any]] = {}
        self.samples: list[tuple[float, float]] = []  # (time, CPU seconds of the whole tree)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        now = time.time()
        stats = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                stat = read_stat(int(entry.name))
                if stat:
                    stats[int(entry.name)] = stat
        tree, grew = {self.root} | set(self.processes), True
        while grew:  # descendants of the root (processes already seen stay, reparented or not)
            new = {pid for pid, (ppid, _, _) in stats.items() if ppid in tree and pid not in tree}
            tree |= new
            grew = bool(new)
        for pid in tree:
            if pid not in stats:
                continue
            _, cpu, start = stats[pid]
            record = self.processes.setdefault(pid, {
                "started_at": self.boot + start / CLOCK_TICKS, "names": [], "series": []})
            if record["started_at"] != self.boot + start / CLOCK_TICKS:
                continue  # the pid was reused
            if not record.get("series") or record["series"][-1][1] != cpu:
                record["series"].append((now, cpu))
            record["cpu_sec"] = cpu
            try:
                name = process_name(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                name = ""
            if name and (not record["names"] or record["names"][-1] != name):
                record["names"].append(name)
        self.samples.append((now, sum(p.get("cpu_sec", 0.0) for p in self.processes.values())))

    def cpu_until(self, moment: float) -> float:
        before = [cpu for at, cpu in self.samples if at <= moment]
        return before[-1] if before else 0.0

    def process_cpu_at(self, pid: int | None, moment: float | None) -> float | None:
        """A process's CPU seconds at `moment` (its last sample before it)."""
        record = self.processes.get(pid)
        if record is None or moment is None:
            return None
        before = [cpu for at, cpu in record["series"] if at <= moment]
        return round(before[-1], 2) if before else 0.0


def first_steps(run_dir: Path, seen: dict[str, dict[str, Any]]) -> None:
    """Records each trial's first logs/progress.json (written at the end of its first batch)."""
    for path in run_dir.glob("*/logs/progress.json"):
        trial = path.parent.parent.name
        if trial in seen:
            continue
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced
        seen[trial] = {**progress, "seen_at": time.time()}


def driver_marks(log_text: str) -> list[tuple[str, float]]:
    """(phase, end time) for each DRIVER_MARKS line found in the driver's log, in order."""
    lines = []
    for line in log_text.splitlines():
        match = LOG_LINE.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append((stamp, match.group(2), match.group(3)))
    marks, index = [], 0
    for phase, logger_name, prefix in DRIVER_MARKS:
        for position in range(index, len(lines)):
            stamp, name, message = lines[position]
            if name == logger_name and message.startswith(prefix):
                marks.append((phase, stamp))
                index = position + 1
                break
    return marks


def run_once(args: argparse.Namespace, extra: list[str], index: int) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="startup_breakdown_"))
    run_dir = log_dir / "run"
    command = [sys.executable, str(ROOT / "experiments" / "all_backbones.py"), *QUICK,
               "--log-dir", str(log_dir), "--name", "run", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    load_before = loadavg()
    log_path = log_dir / "driver.log"
    try:
        with open(log_path, "w") as log:
            started_at = time.time()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       cwd=ROOT)
            sampler = TreeSampler(process.pid)
            sampler.start()
            steps: dict[str, dict[str, Any]] = {}
            interrupted = False
            while process.poll() is None:
                first_steps(run_dir, steps)
                if len(steps) >= args.trials and args.stop_early and not interrupted:
                    load_at_last_step = loadavg()
                    interrupted = True
                    process.send_signal(signal.SIGINT)
                    time.sleep(1.0)
                    process.send_signal(signal.SIGINT)
                time.sleep(0.1)
            first_steps(run_dir, steps)
            sampler.stop_event.set()
            sampler.join()
        load_after = loadavg()
        if not interrupted:
            load_at_last_step = None
        log_text = log_path.read_text()
        result = analyse(sampler, started_at, log_text, run_dir, steps)
        result.update(command=" ".join(command[1:]).replace(str(ROOT) + "/", ""),
                      exit_code=process.returncode, load_before=load_before,
                      load_at_last_first_step=load_at_last_step, load_after=load_after,
                      stopped_early=interrupted, run=index)
        if process.returncode not in (0, 130) and not interrupted:
            result["log_tail"] = log_text[-3000:]
        return result
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def analyse(sampler: TreeSampler, started_at: float, log_text: str, run_dir: Path,
            steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def since(moment: float | None) -> float | None:
        return None if moment is None else round(moment - started_at, 2)

    marks = driver_marks(log_text)
    phases, previous = [], started_at
    for phase, stamp in marks:
        phases.append({"phase": phase, "sec": round(stamp - previous, 2), "ends_at": since(stamp)})
        previous = stamp
    fit_called_at = marks[-1][1] if len(marks) == len(DRIVER_MARKS) else None

    trials = []
    for trial, step in sorted(steps.items()):
        info_path = run_dir / trial / "logs" / "training_info.json"
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            info = {}
        process = sampler.processes.get(info.get("pid"), {})
        cpu_at = {name: sampler.process_cpu_at(info.get("pid"), moment) for name, moment in (
            ("trainable_entered", info.get("trainable_started_at")),
            ("fit_entered", info.get("fit_started_at")),
            ("first_epoch_starts", info.get("train_started_at")),
            ("first_step_done", step["time"]))}
        trials.append({
            "trial": trial, "pid": info.get("pid"),
            "process_started": since(process.get("started_at")),
            "trainable_entered": since(info.get("trainable_started_at")),
            "fit_entered": since(info.get("fit_started_at")),
            "first_epoch_starts": since(info.get("train_started_at")),
            "first_step_done": since(step["time"]),
            "cpu_sec_at": cpu_at,
        })
    last_step = max((started_at + t["first_step_done"] for t in trials), default=None)
    last_start = max((t["first_epoch_starts"] for t in trials
                      if t["first_epoch_starts"] is not None), default=None)
    processes = sorted(sampler.processes.values(), key=lambda p: p["started_at"])
    cpu = sampler.cpu_until(last_step) if last_step else None
    # The start-up's work, robust to the other trials training on meanwhile: each trial's own
    # CPU seconds until its first step is done, plus every other process's until the last one.
    trial_pids = {t["pid"] for t in trials}
    startup_cpu = None
    if last_step and trials:
        startup_cpu = round(sum(t["cpu_sec_at"]["first_step_done"] or 0.0 for t in trials) + sum(
            sampler.process_cpu_at(pid, last_step) or 0.0
            for pid in sampler.processes if pid not in trial_pids), 1)
    return {
        "started_at": started_at, "driver_phases": phases, "tuner_fit_called": since(fit_called_at),
        "trials": trials, "last_first_step": since(last_step),
        "last_first_epoch_start": last_start,
        "cpu_sec_until_last_first_step": None if cpu is None else round(cpu, 1),
        "startup_cpu_sec": startup_cpu,
        "driver_cpu_sec_at_tuner_fit": sampler.process_cpu_at(sampler.root, fit_called_at),
        "processes": [{"name": " > ".join(p["names"]) or "?",
                       "started": since(p["started_at"]),
                       "cpu_sec": round(p.get("cpu_sec", 0.0), 2)} for p in processes],
    }


def print_run(result: dict[str, Any], trials: int) -> None:
    print(f"\nrun {result['run']}: {result['command']}")
    print(f"load average before / at the last first step / after: {result['load_before']} / "
          f"{result['load_at_last_first_step']} / {result['load_after']}")
    rows = [(p["phase"], p["sec"], p["ends_at"]) for p in result["driver_phases"]]
    print(tabulate(rows, headers=("driver phase", "s", "ends at s"), tablefmt="github"))
    columns = ("process_started", "trainable_entered", "fit_entered", "first_epoch_starts",
               "first_step_done")
    rows = [(t["trial"], *(t[c] for c in columns)) for t in result["trials"]]
    print(tabulate(rows, headers=("trial (s after the command)", "process", "trainable",
                                  "fit", "epoch 1", "step 1 done"), tablefmt="github"))
    if result["trials"]:
        spans = []
        for t in result["trials"]:
            spans.append({
                "worker process start -> trainable entered":
                    _diff(t["trainable_entered"], t["process_started"]),
                "trainable -> fit (training stack imports since the lazy trainable)":
                    _diff(t["fit_entered"], t["trainable_entered"]),
                "data sets + model + optimizer": _diff(t["first_epoch_starts"], t["fit_entered"]),
                "first step": _diff(t["first_step_done"], t["first_epoch_starts"])})
        rows = [(name, statistics.median(s[name] for s in spans if s[name] is not None),
                 max(s[name] for s in spans if s[name] is not None)) for name in spans[0]
                if any(s[name] is not None for s in spans)]
        print(tabulate(rows, headers=("per trial", "median s", "max s"), tablefmt="github"))
        rows = []
        for t in result["trials"]:
            at = t["cpu_sec_at"]
            rows.append((t["trial"], at["trainable_entered"],
                         _diff(at["fit_entered"], at["trainable_entered"]),
                         _diff(at["first_epoch_starts"], at["fit_entered"]),
                         _diff(at["first_step_done"], at["first_epoch_starts"]),
                         at["first_step_done"]))
        print(tabulate(rows, headers=("trial CPU s", "until trainable", "trainable -> fit",
                                      "data + model + optimizer", "first step", "total"),
                       tablefmt="github"))
        print(f"Tuner.fit() called at {result['tuner_fit_called']} s; first trial process at "
              f"{min((t['process_started'] for t in result['trials'] if t['process_started'] is not None), default=None)} s")
    done = len(result["trials"])
    print(f"last of {done}/{trials} trials to start training (epoch 1 begins): "
          f"{result['last_first_epoch_start']} s after the command")
    print(f"last of {done}/{trials} trials' first step done at {result['last_first_step']} s "
          f"after the command; CPU seconds of the whole tree until then: "
          f"{result['cpu_sec_until_last_first_step']}; start-up CPU seconds (each trial until "
          f"its own first step, the rest until the last): {result['startup_cpu_sec']}; the "
          f"driver's until Tuner.fit(): {result['driver_cpu_sec_at_tuner_fit']}")
    heavy = sorted(result["processes"], key=lambda p: -p["cpu_sec"])[:12]
    print(tabulate([(p["name"], p["started"], p["cpu_sec"]) for p in heavy],
                   headers=("process (first > later names)", "started at s", "CPU s (at end)"),
                   tablefmt="github"))


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--trials", type=int, default=5, help="trials the command starts")
    parser.add_argument("--stop-early", action="store_true",
                        help="Ctrl-C twice once every trial has made its first step")
    parser.add_argument("--label", default="", help="recorded in the JSON (e.g. before/after)")
    parser.add_argument("--output", default="benchmarks/results/startup_breakdown.json")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    results = []
    for index in range(1, args.runs + 1):
        result = run_once(args, extra, index)
        print_run(result, args.trials)
        results.append(result)
    totals = [r["last_first_step"] for r in results if r["last_first_step"] is not None]
    starts = [r["last_first_epoch_start"] for r in results
              if r["last_first_epoch_start"] is not None]
    cpus = [r["startup_cpu_sec"] for r in results if r["startup_cpu_sec"] is not None]
    if starts:
        print(f"\ncommand start -> last trial starts training: "
              f"{', '.join(f'{t:.1f}' for t in starts)} s (median {statistics.median(starts):.1f})")
    if totals:
        print(f"command start -> last trial's first step done: {', '.join(f'{t:.1f}' for t in totals)} s "
              f"(median {statistics.median(totals):.1f}); start-up CPU seconds: "
              f"{', '.join(f'{c:.0f}' for c in cpus)} (/ {os.cpu_count()} cores = "
              f"{statistics.median(cpus) / os.cpu_count():.1f} s)")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "label": args.label, "extra_flags": extra, "cores": os.cpu_count(),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                     text=True, cwd=ROOT).stdout.strip(),
        "runs": results}, indent=2))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
