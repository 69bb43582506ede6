"""Each method's default preset on each downstream task, over several seeds: phi %, held-out
exact match (worst / median / best seed), how many seeds solve the task, token accuracy and
wall seconds. Seed s fixes both phi's initial values (get_peft_model(..., seed=s)) and the
order of the training data (train(..., seed=s)).

    python -m bench.presets --seeds 5 --jobs 2 [--write]
    python -m bench.presets --seeds 5 --jobs 2 --random-base --tasks times_3 rotate_right_add_2 [--write]

What a longer budget buys where a live one solves nothing (recorded apart; the Train page shows it):

    python -m bench.presets --methods FULL LORA --tasks sort --seeds 5 --jobs 2 --steps 1000 --write

A variant of a preset, recorded as a row of its own ("LORA use_dora=true"; the pages read it
with robustness(..., options=)):

    python -m bench.presets --methods LORA --config use_dora=true --seeds 5 --jobs 2 --write

To try a setting before it becomes a preset:

    python -m bench.presets --methods BOTTLENECK_ADAPTER --tasks times_3 --seeds 5 --jobs 2 --lr 1e-2
    python -m bench.presets --methods PROMPT_TUNING --config num_virtual_tokens=16

What a live demo waits for (the Train page stops a run once it is solved), one run at a time:

    python -m bench.presets --tasks times_3 complement reverse_add_1 rotate_right_add_2 --stop-when-solved

Methods are named by peft_type (LORA, BOTTLENECK_ADAPTER, PROMPT_TUNING, FULL, ...).

Float rounding differs between CPUs, so a run that sits on a knife edge here may fall the
other way elsewhere. Two cheap ways to perturb the rounding on one machine:
`--threads 2` (other reduction orders) and `ATEN_CPU_CAPABILITY=avx2` in the environment
(torch's AVX2 kernels instead of AVX-512, as on most AMD and older Intel CPUs).
"""
import argparse
import json
import multiprocessing as mp
import statistics
import time
from dataclasses import replace

import torch

import peftcore
from peftcore.presets import PRESETS, SOLVES_AT, TABLE_PATH, budget_key, preset_record, variant_key

from .common import machine

_BASES = {}
TRAIN_OVERRIDES = {"lr": float, "steps": int, "batch_size": int, "clip": float, "weight_decay": float}


def _base(random_base):
    if random_base not in _BASES:
        _BASES[random_base] = peftcore.random_base() if random_base else peftcore.load_base()
    return _BASES[random_base]


def _init_worker(threads):
    torch.set_num_threads(threads)


def one_run(job):
    """Train one preset with one seed; the held-out scores at the end, the best held-out
    exact match on the way (a collapse shows as peak >> exact), and the wall seconds."""
    method, task, seed, random_base, config_over, train_over = job
    base = _base(random_base)
    preset = PRESETS[method]
    config = replace(preset.config, **config_over) if config_over else preset.config
    kwargs = dict(preset.train, **train_over)
    model = peftcore.get_peft_model(base, config, seed=seed)
    t0 = time.perf_counter()
    peak = drop = 0.0  # drop: the largest fall of held-out exact match below its best so far
    event = None
    for event in peftcore.train(model, task, device="cpu", seed=seed, **kwargs):
        if event.eval_exact is not None:
            peak = max(peak, event.eval_exact)
            drop = max(drop, peak - event.eval_exact)
    secs = time.perf_counter() - t0
    n_base = sum(p.numel() for p in base.parameters())
    return dict(exact=event.eval_exact, token=event.eval_token, peak=peak, drop=drop, seconds=secs,
                phi_percent=100 * model.get_nb_trainable_parameters()[0] / n_base)


def summarize(runs):
    exact = [r["exact"] for r in runs]
    return dict(min=min(exact), median=statistics.median(exact), max=max(exact),
                solved=sum(e >= SOLVES_AT for e in exact), seeds=len(runs),
                token_median=statistics.median(r["token"] for r in runs), token_min=min(r["token"] for r in runs),
                token_max=max(r["token"] for r in runs), token=[r["token"] for r in runs],
                seconds_median=statistics.median(r["seconds"] for r in runs),
                exact=exact, peak=[r["peak"] for r in runs], drop=[r["drop"] for r in runs])


def parse_value(text):
    """A --config value: JSON where it parses (a list becomes a tuple), else the text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-base", action="store_true", help="PEFT on a randomly initialised frozen base")
    ap.add_argument("--tasks", nargs="*", default=list(peftcore.TASKS))
    ap.add_argument("--methods", nargs="*", default=list(PRESETS))
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="runs in this many processes, one torch thread each")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    ap.add_argument("--write", action="store_true", help=f"record the table in {TABLE_PATH.name}")
    for name, kind in TRAIN_OVERRIDES.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, help="override the presets' training argument (trials only)")
    ap.add_argument("--stop-when-solved", action="store_true",
                    help="end each run once solved, as the Train page does: the seconds are then time to solved")
    ap.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override a field of the presets' configs (trials only)")
    args = ap.parse_args()
    train_over = {k: getattr(args, k) for k in TRAIN_OVERRIDES if getattr(args, k) is not None}
    if args.stop_when_solved:
        train_over["stop_when_solved"] = True
    config_over = {k: parse_value(v) for k, v in (c.split("=", 1) for c in args.config)}
    if args.write and (set(train_over) - {"steps"} or args.first_seed):
        ap.error("--write records the presets as they are (or with more --steps, or a --config variant): drop "
                 "the other overrides and --first-seed")
    methods = [m for m in args.methods if not (args.random_base and not peftcore.METHODS[m].shares_base)]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows = [(m, t) for m in methods for t in args.tasks]
    jobs = [(m, t, s, args.random_base, config_over, train_over) for m, t in rows for s in seeds]

    torch.set_num_threads(args.threads)
    where = machine()
    print(f"machine: {where}; base {'random' if args.random_base else 'pretrained'}; "
          f"seeds {seeds.start}..{seeds.stop - 1}; {args.jobs} job(s)")
    if train_over or config_over:
        print(f"overrides: {train_over} {config_over}")
    print(f"| method | phi % | task | exact min | median | max | solved (>= {SOLVES_AT}) | token acc median "
          f"| seconds median |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    if args.jobs > 1:
        pool = mp.get_context("spawn").Pool(args.jobs, _init_worker, (args.threads,))
        results = pool.imap(one_run, jobs)  # in order: rows finish roughly one after another
    else:
        pool, results = None, map(one_run, jobs)
    table, notes = {}, []
    t0 = time.perf_counter()
    for method, task in rows:
        runs = [next(results) for _ in seeds]
        s = summarize(runs)
        table.setdefault(variant_key(method, config_over), {})[task] = dict(
            s, machine=where, preset=preset_record(method, config_over))
        print(f"| {method} | {runs[0]['phi_percent']:.2f} | {task} | {s['min']:.3f} | {s['median']:.3f} | "
              f"{s['max']:.3f} | {s['solved']} of {s['seeds']} | {s['token_median']:.3f} | "
              f"{s['seconds_median']:.1f} |", flush=True)
        if s["max"] - s["min"] > 0.1 or max(s["drop"]) > 0.1:
            notes.append(f"- {method} {task}: exact per seed {' '.join(f'{e:.3f}' for e in s['exact'])}; "
                         f"largest fall below the best so far {' '.join(f'{d:.3f}' for d in s['drop'])}")
    if pool:
        pool.close()
    if notes:
        print("\nRows that differ between seeds, or whose held-out exact match fell on the way (a knife edge):")
        print("\n".join(notes))
    print(f"\n{len(jobs)} runs in {time.perf_counter() - t0:.0f} s wall")
    if args.write:
        recorded = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {}
        key = "random base" if args.random_base else "pretrained"
        if "steps" in train_over:  # a longer budget: a table of its own (presets.longer_budget)
            key = budget_key(key, train_over["steps"])
        for method, tasks in table.items():
            recorded.setdefault(key, {}).setdefault(method, {}).update(tasks)
        TABLE_PATH.write_text(json.dumps(recorded, indent=1) + "\n")
        print(f"recorded in {TABLE_PATH}")


if __name__ == "__main__":
    main()
