"""The evidence run on CPU: plain SFT vs DVR, each decoded plainly and with PVC, on ``late_lookup``.

``python -m tvc_lightning.analyze.evidence [--variant uniform|survey|...]`` (``make evidence``, or
``make evidence VARIANT=survey``) does, under ``outputs/evidence/``:

1. a small random checkpoint (``model/``, ``MODEL_SIZES`` of :mod:`.evidence_variants`; Qwen2-VL
   unless the variant names another family) and ``synth --task late_lookup`` shards
   (``data/train``, ``data/val``, the variant's sizes in ``VARIANTS``), each only if absent;
2. the two fits, ``recipes/evidence/plain.yaml`` and ``recipes/evidence/dvr.yaml`` (same data,
   steps and seeds; only ``data.dvr.p`` differs), side by side, one CPU thread each;
3. ``evaluate --benchmark shards --compare_plain true`` of both checkpoints on ``data/val``, and
   a second PVC evaluation with ``reset none`` (the original image kept after a calibration);
4. ``analyze forgetting`` and ``analyze removal`` of both;
5. for a variant with ``lengths``: held-out splits whose detour is 2x and 4x as long (same items
   otherwise), read teacher-forced by both arms with and without DVR's copy, and decoded after
   the chain cut at its reflection (:mod:`.evidence_lengths`, :mod:`tvc_lightning.analyze.forced`):
   free decoding cannot reach those lengths, the models write the chain lengths they were
   trained on;
6. bootstrap intervals and the variant's document (``docs/evidence.md`` for ``uniform``,
   ``docs/evidence_VARIANT.md`` for the others; figures copied to ``docs/evidence/VARIANT_*.png``).

The variants differ in the task's detour (same recipes, steps and seeds), in the order they were
tried: ``arithmetic`` computes the cell (its models never learned the arithmetic), ``copy`` copies
a word list out before the lookup (never learned the long-range copy), ``repeat`` restates the
target sentence by sentence so that the image is the only long-range dependency (the image was
then not read), ``survey`` reads all nine cells before the target's (reads barely above chance),
``uniform`` (the default) is ``repeat`` on a one-colour grid, whose read needs no position in the
image, and ``survey_qwen3vl`` is ``survey`` on a tiny Qwen3-VL, whose tower and M-RoPE can
represent a cell's position. Every step whose output exists is skipped, so a stopped run
continues where it stopped; outputs of another variant are refused. The reading between the
markers of an existing document is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tvc_lightning.analyze.evidence_lengths import forced_jobs, lengths_section
from tvc_lightning.analyze.evidence_report import (
    ARMS,
    MODES,
    Interval,
    bootstrap_ci,
    cell_reads_markdown,
    forgetting_summary,
    kept_reading,
    paired_diff_ci,
    paired_pooled_rate_diff_ci,
    pooled_rate_ci,
    read_flags,
    removal_summary,
    render_doc,
)
from tvc_lightning.analyze.evidence_variants import (
    FAMILY_NAMES,
    MODEL_SIZES,
    RESAMPLES,
    VARIANTS,
    family,
    generation_flags,
    max_pixels,
    subprocess_env,
    synth_split,
)

FORGETTING_LIMIT = 16
REMOVAL_LIMIT = 32
REMOVAL_GRID = "[0, 0.25, 0.5, 0.75, 1]"


def run_parallel(jobs: dict[str, list[str]], logs: Path, threads: int,
                 at_once: int | None = None) -> None:
    """Run the commands side by side (``at_once`` at a time), each logging to ``logs/NAME.log``;
    raise if one fails."""
    names = list(jobs)
    if at_once is not None and len(names) > at_once:
        for i in range(0, len(names), at_once):
            run_parallel({n: jobs[n] for n in names[i:i + at_once]}, logs, threads)
        return
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, cmd in jobs.items():
        log = (logs / f"{name}.log").open("w", encoding="utf-8")
        print(f"[evidence] {name}: {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=subprocess_env(threads))
        procs[name] = (proc, log)
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(f"{name} (exit {proc.returncode}, see {logs / (name + '.log')})")
        log.close()
    if failed:
        raise RuntimeError("failed: " + ", ".join(failed))


def check_variant(root: Path, variant: str) -> None:
    """Claim ``root`` for ``variant``; refuse a root holding another variant's outputs."""
    marker = root / "variant.txt"
    found = marker.read_text().strip() if marker.exists() else (
        "arithmetic" if (root / "data").exists() else None)  # runs from before the variants
    if found is not None and found != variant:
        raise SystemExit(f"{root} holds the {found!r} variant's outputs; move it away (or pass "
                         f"--root) to run {variant!r}")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(variant + "\n")


def build_inputs(root: Path, variant: str) -> None:
    """The random checkpoint and the shards, each only if absent."""
    from tvc_lightning.testing import save_tiny

    save_tiny(root / "model", family(variant), seed=0, **MODEL_SIZES)
    if not (root / "data" / "val").exists():
        synth_split(root / "data", variant, VARIANTS[variant]["data"]["num_train"])


def fit_jobs(root: Path, recipes: Path, variant: str) -> dict[str, list[str]]:
    """The fits still to run (an arm with ``last.ckpt`` is done)."""
    jobs = {}
    for arm in ARMS:
        ckpts = root / arm / "checkpoints"
        if (ckpts / "last.ckpt").exists():
            continue
        # A fit refuses a folder holding checkpoints; leftovers here are an interrupted fit's.
        shutil.rmtree(ckpts, ignore_errors=True)
        jobs[f"fit_{arm}"] = [sys.executable, "-m", "tvc_lightning", "fit", "--config",
                              str(recipes / f"{arm}.yaml"),
                              f"--data.max_pixels={max_pixels(variant)}"]
    return jobs


def results_path(root: Path, arm: str, mode: str) -> Path:
    """Where ``evaluate`` wrote ``arm``'s answers under decoding ``mode`` (pvc_keep: a second
    evaluation with reset none)."""
    if mode == "pvc_keep":
        return root / arm / "eval_keep" / "results_pvc.jsonl"
    return root / arm / "eval" / f"results_{mode}.jsonl"


def eval_jobs(root: Path, variant: str) -> dict[str, list[str]]:
    """Both arms under plain and PVC decoding (``eval``) and under PVC with reset none
    (``eval_keep``): the evaluations not done yet."""
    jobs = {}
    for arm in ARMS:
        for name, extra in (("eval", ["--compare_plain", "true", *generation_flags(variant)]),
                            ("eval_keep", generation_flags(variant, reset="none"))):
            out = root / arm / name
            if (out / "summary.json").exists():
                continue
            jobs[f"{name}_{arm}"] = [
                sys.executable, "-m", "tvc_lightning", "evaluate",
                "--checkpoint", str(root / arm / "checkpoints" / "last.ckpt"),
                "--base_model", str(root / "model"), "--benchmark", "shards",
                "--input", str(root / "data" / "val"), "--out", str(out), "--batch_size", "32",
                "--max_pixels", str(max_pixels(variant)),
                "--progress_bar", "false", *extra]
    return jobs


def analyze_jobs(root: Path, command: str, variant: str) -> dict[str, list[str]]:
    jobs = {}
    for arm in ARMS:
        out = root / arm / command
        if (out / f"{command}_curve.csv").exists():
            continue
        extra = (["--limit", str(FORGETTING_LIMIT), "--batch_size", str(FORGETTING_LIMIT)]
                 if command == "forgetting" else
                 ["--limit", str(REMOVAL_LIMIT), "--batch_size", str(REMOVAL_LIMIT),
                  "--grid", REMOVAL_GRID])
        jobs[f"{command}_{arm}"] = [
            sys.executable, "-m", "tvc_lightning", "analyze", command,
            "--checkpoint", str(root / arm / "checkpoints" / "last.ckpt"),
            "--base_model", str(root / "model"), "--data", str(root / "data" / "val"),
            "--out", str(out), "--max_pixels", str(max_pixels(variant)), *extra,
            *generation_flags(variant)]
    return jobs


def final_train_loss(arm_dir: Path, last: int = 5) -> float:
    """Mean of the last ``last`` logged ``train/loss`` values (CSVLogger's metrics.csv)."""
    import csv

    files = sorted((arm_dir / "logs").glob("version_*/metrics.csv"))
    if not files:
        return float("nan")
    with files[-1].open(encoding="utf-8") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    tail = losses[-last:]
    return sum(tail) / len(tail) if tail else float("nan")


def collect(root: Path) -> tuple[dict[tuple[str, str], Interval], dict[str, Interval], float]:
    """The accuracy cells (arms x decodings), the paired differences, and the held-out
    majority-answer rate."""
    flags = {(arm, mode): read_flags(results_path(root, arm, mode))
             for arm in ARMS for mode in MODES}
    ids = sorted(set.intersection(*(set(f) for f in flags.values())))
    vec = {k: [f[i] for i in ids] for k, f in flags.items()}
    cells = {k: bootstrap_ci(v, RESAMPLES) for k, v in vec.items()}
    diffs = {
        "dvr+pvc - plain+plain": paired_diff_ci(vec[("dvr", "pvc")], vec[("plain", "plain")], RESAMPLES),
        "dvr+pvc - dvr+plain": paired_diff_ci(vec[("dvr", "pvc")], vec[("dvr", "plain")], RESAMPLES),
        "dvr+plain - plain+plain": paired_diff_ci(vec[("dvr", "plain")], vec[("plain", "plain")],
                                                  RESAMPLES),
        "plain+pvc - plain+plain": paired_diff_ci(vec[("plain", "pvc")], vec[("plain", "plain")],
                                                  RESAMPLES),
        "dvr+pvc_keep - plain+plain": paired_diff_ci(vec[("dvr", "pvc_keep")],
                                                     vec[("plain", "plain")], RESAMPLES),
        "dvr+pvc_keep - dvr+pvc": paired_diff_ci(vec[("dvr", "pvc_keep")], vec[("dvr", "pvc")],
                                                 RESAMPLES),
    }
    answers = Counter()
    for line in (root / "plain" / "eval" / "results_plain.jsonl").read_text().splitlines():
        if line.strip():
            answers[json.loads(line)["answer"]] += 1
    chance = answers.most_common(1)[0][1] / sum(answers.values())
    return cells, diffs, chance


_CELL_SENTENCE = re.compile(r"The cell in row (\d+), column (\d+) is (\w+)\.")


def cell_read_counts(results: Path, variant: str) -> dict[str, tuple[int, int]]:
    """Per response id: (cell sentences whose colour is the image's, cell sentences naming a cell
    of the grid). Each item's grid is regenerated from the synth settings (seeded per item)."""
    from data_engine.synth_late import make_sample

    d = VARIANTS[variant]["data"]
    counts = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        index = int(row["id"].rsplit("-", 1)[1])
        grid = make_sample(d["seed"], "val", index, d["image_size"], d["detour_steps"],
                           d["detour"])[3]
        hits = total = 0
        for m in _CELL_SENTENCE.finditer(row["response"]):
            r, c = int(m.group(1)) - 1, int(m.group(2)) - 1
            if 0 <= r < grid.rows and 0 <= c < grid.cols:
                total += 1
                hits += grid.colours[r][c] == m.group(3)
        counts[row["id"]] = (hits, total)
    return counts


def cell_reads(root: Path, variant: str) -> list[str]:
    """The cell-reads section: how often the chains' colour reads match the image."""
    counts = {(arm, mode): cell_read_counts(results_path(root, arm, mode), variant)
              for arm in ARMS for mode in MODES}
    ids = sorted(set.intersection(*(set(c) for c in counts.values())))
    vec = {k: [c[i] for i in ids] for k, c in counts.items()}
    reads = {k: pooled_rate_ci(v, RESAMPLES) for k, v in vec.items()}
    diff = paired_pooled_rate_diff_ci(vec[("dvr", "pvc")], vec[("plain", "plain")], RESAMPLES)
    return cell_reads_markdown(reads, diff)


def sizes_text(variant: str) -> dict[str, str]:
    m, d, g = MODEL_SIZES, VARIANTS[variant]["data"], VARIANTS[variant]["generation"]
    return {
        "model": (f"random {FAMILY_NAMES[family(variant)]}, {m['num_layers']} layers, hidden "
                  f"{m['hidden_size']}, "
                  f"{m['num_heads']}/{m['num_kv_heads']} heads, intermediate "
                  f"{m['intermediate_size']}, vision tower {m['vision_depth']} x {m['vision_dim']} "
                  "(trained, not frozen), the tiny 640-token tokenizer"),
        "data": (f"`synth --task late_lookup --detour {d['detour']} --detour-steps "
                 f"{d['detour_steps']} --image-size {d['image_size']} --seed {d['seed']}`: "
                 f"{d['num_train']} train, {d['num_val']} held-out val items "
                 f"({VARIANTS[variant]['doc']['tokens']})"),
        "training": ("recipes/evidence/{plain,dvr}.yaml: 1000 steps x batch 4 (one epoch), AdamW "
                     "lr 1e-3, warm-up 10%, fp32, seed 0; DVR: 1 injection, pool kernel 2"),
        "decoding": "greedy; " + ", ".join(f"{k} {v}" for k, v in g.items())
                    + "; plain = the same with max_calibrations 0; PVC, original kept = the same "
                      "with reset none",
        "analyses": (f"forgetting: first {FORGETTING_LIMIT} val items, pvc and plain; removal: "
                     f"first {REMOVAL_LIMIT} val items, grid {REMOVAL_GRID}"),
    }


def write_doc(root: Path, docs: Path, command: str, date: str, machine: str,
              timings: dict[str, float], variant: str) -> Path:
    cells, diffs, chance = collect(root)
    figures = {}
    (docs / "evidence").mkdir(parents=True, exist_ok=True)
    for arm in ARMS:
        for kind in ("forgetting", "removal"):
            png = root / arm / kind / f"{kind}.png"
            if png.exists():
                name = f"{variant}_{arm}_{kind}.png"
                shutil.copyfile(png, docs / "evidence" / name)
                figures[f"{arm} {kind}"] = f"evidence/{name}"
    forgetting = {arm: forgetting_summary(root / arm / "forgetting" / "forgetting_curve.csv")
                  for arm in ARMS}
    removal = {arm: removal_summary(root / arm / "removal" / "removal_curve.csv") for arm in ARMS}
    doc = docs / VARIANTS[variant]["doc"]["name"]
    reading = kept_reading(doc.read_text(encoding="utf-8") if doc.exists() else None)
    doc.write_text(render_doc(
        command=command, date=date, machine=machine, sizes=sizes_text(variant), cells=cells, diffs=diffs,
        forgetting=forgetting, removal=removal, figures=figures, timings=timings,
        train_loss={arm: final_train_loss(root / arm) for arm in ARMS}, chance=chance,
        reading=reading, resamples=RESAMPLES, cell_reads=cell_reads(root, variant),
        forced_reads=lengths_section(root, variant)),
        encoding="utf-8")
    return doc


def main(argv: list[str] | None = None) -> int:
    """Run (or continue) the evidence pipeline and write ``docs/evidence.md``."""
    p = argparse.ArgumentParser(prog="python -m tvc_lightning.analyze.evidence",
                                description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("outputs/evidence"))
    p.add_argument("--recipes", type=Path, default=Path("recipes/evidence"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per subprocess")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="uniform",
                   help="the task (VARIANTS): uniform (default: restate the target, read a "
                        "one-colour grid), survey (read every cell), survey_qwen3vl (survey on a "
                        "tiny Qwen3-VL), repeat (read the target cell), copy (copy a word list "
                        "first), arithmetic (compute the cell)")
    args = p.parse_args(argv)
    check_variant(args.root, args.variant)
    timings_file = args.root / "timings.json"
    timings: dict[str, float] = (json.loads(timings_file.read_text())
                                 if timings_file.exists() else {})
    args.root.mkdir(parents=True, exist_ok=True)
    stages = (("setup", None), ("fits", lambda: fit_jobs(args.root, args.recipes, args.variant)),
              ("evaluate", lambda: eval_jobs(args.root, args.variant)),
              ("forgetting", lambda: analyze_jobs(args.root, "forgetting", args.variant)),
              ("removal", lambda: analyze_jobs(args.root, "removal", args.variant)),
              ("forced", lambda: forced_jobs(args.root, args.variant)))
    for name, jobs in stages:
        start = time.monotonic()
        if jobs is None:
            if (args.root / "model" / "tiny_qwen2vl.json").exists() and (args.root / "data" / "val").exists():
                continue  # a rerun that builds nothing adds no set-up time
            build_inputs(args.root, args.variant)
        else:
            todo = jobs()
            if not todo:
                continue
            run_parallel(todo, args.root / "logs", args.threads, at_once=2)
        # Only the time spent in this invocation is added: a resumed run reports the sum.
        timings[name] = timings.get(name, 0.0) + time.monotonic() - start
        timings_file.write_text(json.dumps(timings, indent=2))
        print(f"[evidence] {name} done in {timings[name] / 60:.1f} min", flush=True)
    command = "make evidence" + ("" if args.variant == "uniform" else f" VARIANT={args.variant}")
    doc = write_doc(args.root, args.docs, command, args.date, args.machine, timings, args.variant)
    print(f"[evidence] wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
