"""What the app shows beyond training itself: predictions, serving timings, what combining
phi keeps, and the shape of a full fine-tune's update. Torch only; never imports streamlit.

Outputs are greedy decodes (what a user would get), not teacher-forced argmaxes.
Timings are medians of several repeats, measured side by side in one call.
"""
import statistics
from contextlib import contextmanager

import torch

from .merging import MergeOptions
from .methods import registry
from .methods.config import MergeablePhiLayer, unwrapped
from .model import PROJECTIONS as TARGETABLE
from .serialization import adapter_to_bytes, load_adapter
from .timing import median_seconds, side_by_side, sync
from .tasks import ANSWER_START, EVAL_SIZE, N_DIGITS, SEP, TASKS, answer_metrics, get_task
from .train import held_out

PROMPT_LEN = ANSWER_START + 1  # task token, 8 digits, SEP


# ------------------------------------------------------------------ inputs and outputs
def parse_digits(text):
    """'12345678' (spaces and commas allowed) -> [1, ..., 8]; ValueError with a clear message."""
    digits = [c for c in str(text) if not c.isspace() and c != ","]
    if len(digits) != N_DIGITS or not all(c in "0123456789" for c in digits):
        raise ValueError(f"type exactly {N_DIGITS} digits 0-9, got {text!r}")
    return [int(c) for c in digits]


def make_prompts(task, digits=None, n=1, seed=0):
    """(prompts (n, 10), answers (n, 8)) for `task`: the given digits repeated, or n random rows."""
    task = get_task(task)
    if digits is None:
        d = torch.randint(0, 10, (n, N_DIGITS), generator=torch.Generator().manual_seed(seed))
    else:
        d = torch.tensor([digits] * n)
    prompts = torch.cat([torch.full((n, 1), task.token), d, torch.full((n, 1), SEP)], dim=1)
    return prompts, task.fn(d)


@torch.no_grad()
def generate(model, prompts, adapter_names=None):
    """Greedy decoding of the 8 answer digits: (n, 10) prompts -> (n, 8) tokens."""
    device = next(model.parameters()).device
    seq = prompts.to(device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(N_DIGITS):
            logits = model(seq) if adapter_names is None else model(seq, adapter_names=adapter_names)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        model.train(was_training)
    return seq[:, PROMPT_LEN:].cpu()


def as_text(tokens):
    """A row of digit tokens as a string; other tokens (a wrong guess of SEP or a task token) as '?'."""
    return "".join(str(t) if 0 <= t < 10 else "?" for t in tokens.tolist())


def prediction_rows(task_names, prompts, answers, outputs):
    """One dict per row: task, input, target, output and which output digits are wrong."""
    rows = []
    for task, p, a, o in zip(task_names, prompts, answers, outputs):
        wrong = (o != a).tolist()
        rows.append(dict(task=task, input=as_text(p[1:1 + N_DIGITS]), target=as_text(a),
                         output=as_text(o), wrong=wrong, correct=not any(wrong)))
    return rows


def sample_predictions(model, task, n=8, seed=0):
    """Greedy outputs of `model` (its active phi) on n random inputs of `task`."""
    prompts, answers = make_prompts(task, n=n, seed=seed)
    return prediction_rows([get_task(task).name] * n, prompts, answers, generate(model, prompts))


# ------------------------------------------------------------------ serving many phi
def digit_accuracy(model, task):
    """Held-out accuracy of each answer digit on its own (as evaluate() scores them): where a
    run goes wrong, which one exact-match number hides. A list of N_DIGITS floats, first first."""
    logits, y = held_out(model, task)
    answers = slice(ANSWER_START, ANSWER_START + N_DIGITS)  # the inputs SEP..7th answer digit predict them
    return (logits.argmax(-1)[:, answers] == y[:, answers]).float().mean(0).tolist()


def _device(model):
    return next(model.parameters()).device


@contextmanager
def keep_active(model):
    """Restore the model's active adapter after a block that switches adapters."""
    saved = model.active_adapter
    try:
        yield
    finally:
        if saved is not None:
            model.set_adapter(saved)


def serve_mixed(model, names, prompts):
    """Every row with its own phi in one batch: (n, 8) greedy outputs."""
    return generate(model, prompts, adapter_names=list(names))


def serve_swapping(model, names, prompts):
    """The naive server: one request at a time, switching phi before each."""
    outs = []
    with keep_active(model):
        for name, row in zip(names, prompts):
            model.set_adapter(name)
            outs.append(generate(model, row[None]))
    return torch.cat(outs)


def time_mixed_vs_swap(model, names, prompts, repeats=5):
    """{'mixed_s', 'swap_s'}: median seconds to answer every row, one mixed batch against
    a swap-per-request loop, measured side by side."""
    def mixed():
        serve_mixed(model, names, prompts)
        sync(_device(model))

    def swapping():
        serve_swapping(model, names, prompts)
        sync(_device(model))

    return side_by_side({"mixed_s": mixed, "swap_s": swapping}, repeats)


def serve_report(model, names, tasks, per=1, digits=None, seed=0, repeats=3):
    """What the serving page shows for `per` requests to each phi in `names` (of tasks `tasks`):
    {'rows': prediction rows of one mixed batch, 'same': whether they equal one-request-at-a-time
    outputs, 'times': time_mixed_vs_swap}. `digits`: one input for every row, or None for random."""
    batch = [make_prompts(task, digits, n=per, seed=seed + i) for i, task in enumerate(tasks)]
    row_names = [n for n in names for _ in range(per)]
    prompts, answers = torch.cat([p for p, _ in batch]), torch.cat([a for _, a in batch])
    outputs = serve_mixed(model, row_names, prompts)
    same = torch.equal(outputs, serve_swapping(model, row_names, prompts))
    labels = [f"{n} ({t})" for n, t in zip(names, tasks) for _ in range(per)]
    return dict(rows=prediction_rows(labels, prompts, answers, outputs), same=same,
                times=time_mixed_vs_swap(model, row_names, prompts, repeats))


def swap_timings(model, name, file_bytes, repeats=20):
    """{'set_adapter_s', 'load_s'}: switching to a resident phi against loading it from its
    file bytes (parse, check, copy), the two ways a server can change task. A measurement, not
    a change (probes())."""
    with keep_active(model):
        set_s = median_seconds(lambda: model.set_adapter(name), repeats)
    with probes(model) as probe:
        tmp = probe()

        def load_and_drop():
            load_adapter(model, tmp, file_bytes)
            model.delete_adapter(tmp)

        load_s = median_seconds(load_and_drop, max(3, repeats // 4))
    return {"set_adapter_s": set_s, "load_s": load_s}


@contextmanager
def probes(model):
    """Yields a maker of fresh phi names for phi added only to be measured: each is deleted at
    the end, the active adapter and the model's generation put back, so that nothing keyed on
    the generation (a page's cached timings or rows) takes the bank for a changed one."""
    generation, made = model.route.generation, []

    def probe():  # never a name the bank holds: a visitor may upload a phi of any allowed name
        i = len(made)
        while f"__probe_{i}__" in model.peft_config:
            i += 1
        made.append(f"__probe_{i}__")
        return made[-1]

    try:
        with keep_active(model):
            yield probe
    finally:
        for name in made:
            if name in model.peft_config:
                model.delete_adapter(name)
        model.route.generation = generation


def spread(values):
    """A timing's median and spread over its repeats: {'median', 'q1', 'q3', 'min', 'max', 'n'}
    (q1 to q3 holds the middle half). One number of a noisy machine can flip sign between two
    measurements; a median with its spread says whether a difference is there at all."""
    values = sorted(values)
    q1, q3 = statistics.quantiles(values, n=4, method="inclusive")[::2] if len(values) > 1 else values * 2
    return dict(median=statistics.median(values), q1=q1, q3=q3, min=values[0], max=values[-1], n=len(values))


def merged_vs_unmerged(model, name, prompts, repeats=21):
    """LoRA `name` served unmerged (W x + B A x) and merged (W' = W + B A, one matmul):
    {'unmerged_s', 'merged_s', 'max_abs_diff'} with the logits' largest difference, the two
    medians, and each repeat kept: 'unmerged_all', 'merged_all' (seconds, measured
    alternately) and 'saved_all' (unmerged minus merged, per alternating pair).
    A measurement, not a change: the model (its generation included) is left as it was."""
    model._check_mergeable(name, f"timing a merge of {name!r}")
    x = prompts.to(next(model.parameters()).device)
    with keep_active(model), torch.no_grad():
        model.set_adapter(name)
        model.eval()
        layers = model._merge_layers(name)
        merged_w = []
        for layer in layers:  # once; the timed calls below only switch W' in and out
            layer.merge(name)
            merged_w.append(layer.merged_weight)
            layer.unmerge()

        def run(merged):
            for layer, w in zip(layers, merged_w):
                layer.merged_adapter, layer.merged_weight = (name, w) if merged else (None, None)
            try:
                out = model(x)
                sync(_device(model))
                return out
            finally:
                for layer in layers:
                    layer.unmerge()

        diff = (run(True) - run(False)).abs().max().item()
        fns = {"unmerged_s": lambda: run(False), "merged_s": lambda: run(True)}
        pairs = [side_by_side(fns, repeats=1, warmup=int(i == 0)) for i in range(repeats)]  # every repeat kept
    unmerged, merged = [t["unmerged_s"] for t in pairs], [t["merged_s"] for t in pairs]
    return {"unmerged_s": statistics.median(unmerged), "merged_s": statistics.median(merged),
            "unmerged_all": unmerged, "merged_all": merged, "saved_all": [u - m for u, m in zip(unmerged, merged)],
            "max_abs_diff": diff}


# ------------------------------------------------------------------ many phi become one
CHUNK_ROWS = 4096  # rows per forward pass of a scoring batch: bounds the activations' memory


@torch.no_grad()
def scores(model, pairs, n=EVAL_SIZE):
    """{(phi name, task): held-out exact match} for each pair, in one mixed batch: each pair's
    rows are the first `n` of its task's fixed held-out set, routed through its phi."""
    device = _device(model)
    sets = {task: get_task(task).eval_set(device, n) for task in {t for _, t in pairs}}
    x = torch.cat([sets[t][0] for _, t in pairs])
    y = torch.cat([sets[t][1] for _, t in pairs])
    names = [name for name, t in pairs for _ in range(len(sets[t][0]))]
    was_training = model.training
    model.eval()
    try:
        logits = torch.cat([model(x[i:i + CHUNK_ROWS], adapter_names=names[i:i + CHUNK_ROWS])
                            for i in range(0, len(x), CHUNK_ROWS)])
    finally:
        model.train(was_training)
    out, start = {}, 0
    for name, task in pairs:
        rows = len(sets[task][0])
        out[(name, task)] = answer_metrics(logits[start:start + rows], y[start:start + rows])[0]
        start += rows
    return out


def phi_updates(model, name):
    """{projection: W' - W}: what phi `name` adds to each weight it folds into."""
    return {path: (m.folded(name) - m.get_base_layer().weight).detach() for path, m in model.named_modules()
            if isinstance(m, MergeablePhiLayer) and m.has_phi(name)}


def _norm(updates):
    """The Frobenius norm of all the updates together."""
    return sum(float((d ** 2).sum()) for d in updates.values()) ** 0.5


def combined_tasks(model, adapters):
    """The servable tasks of phi `adapters`, in the registry of tasks' order."""
    held = {model.adapter_task.get(a) for a in adapters}
    return [t for t in TASKS if t in held]


def merge_report(model, adapters, weights, tasks=None, own_scores=True, n=EVAL_SIZE, seed=0, **options):
    """What PeftModel.add_weighted_adapter(adapters, weights, ..., **options) gives, measured
    and then taken out again (probes()), every score on the first `n` rows of each held-out set:
      tasks:   the tasks scored (default: the sources' own)
      merged:  {task: held-out exact match of the merged phi}; task: its own (the sources', where
               they share one), or None
      sources: {source: exact match on its own task} (own_scores), in the same mixed batch;
               source_tasks: {source: its task}
      params, source_params, file: the merged phi's parameter count, the sources', its file's bytes
      exact_sum: for a combination over factors (linear, ties, dare_*, magnitude_prune) of a
               method that also combines exactly (cat): the exact weighted sum of the updates
               {'merged': {task: exact}, 'norm': its norm, 'gap': the norm of merged - it,
               'merged_norm'}: peft's factor-level sum adds the cross terms B_i A_j."""
    tasks = combined_tasks(model, adapters) if tasks is None else list(tasks)
    kind = options.get("combination_type", "svd")
    combinations = registry.method_of(model.peft_config[adapters[0]]).combinations
    with probes(model) as probe:
        merged = probe()
        model.add_weighted_adapter(adapters, weights, merged, seed=seed, **options)
        pairs = [(merged, t) for t in tasks]
        if own_scores:
            pairs += [(a, model.adapter_task[a]) for a in adapters if model.adapter_task.get(a) in TASKS]
        exact_sum = None
        if kind != "cat" and not MergeOptions(combination_type=kind).truncates and "cat" in combinations \
                and len(adapters) > 1:
            exact_sum = probe()
            model.add_weighted_adapter(adapters, weights, exact_sum, combination_type="cat")
            pairs += [(exact_sum, t) for t in tasks]
        got = scores(model, pairs, n)
        report = dict(tasks=tasks, combination_type=kind, merged={t: got[(merged, t)] for t in tasks},
                      task=model.adapter_task.get(merged),
                      sources={a: got[(a, t)] for a, t in pairs[len(tasks):] if a in adapters},
                      source_tasks={a: model.adapter_task.get(a) for a in adapters},
                      params=model.adapter_num_params(merged),
                      source_params={a: model.adapter_num_params(a) for a in adapters},
                      file=adapter_to_bytes(model, merged), exact_sum=None)
        if exact_sum is not None:
            want, made = phi_updates(model, exact_sum), phi_updates(model, merged)
            report["exact_sum"] = dict(merged={t: got[(exact_sum, t)] for t in tasks}, norm=_norm(want),
                                       merged_norm=_norm(made),
                                       gap=_norm({k: made[k] - want.get(k, 0) for k in made}))
    return report


def svd_curve(model, adapters, weights, max_rank=16, n=128):
    """What each svd_rank keeps of the exact weighted sum of the updates: [{'rank', 'energy'
    (the fraction of the sum's squared norm the rank keeps, over every projection), 'exact'
    ({task: held-out exact match on the first n rows})}] for ranks 1 to the sum's own rank
    (at most max_rank); every rank's phi scored in one mixed batch."""
    tasks = combined_tasks(model, adapters)
    with probes(model) as probe:
        exact_sum = probe()
        model.add_weighted_adapter(adapters, weights, exact_sum, combination_type="cat")
        spectra = [torch.linalg.svdvals(d.float()) ** 2 for d in phi_updates(model, exact_sum).values()]
        total = float(sum(s.sum() for s in spectra)) or 1.0  # a zero sum: every rank keeps all of it
        # the sum's own rank: past it a rank keeps everything (the largest count of nonzero
        # singular values over the projections), and no truncation may exceed a weight's side
        own_rank = max((int((s > 1e-12 * s.max()).sum()) for s in spectra if s.max() > 0), default=1)
        names = {}
        for rank in range(1, min(max_rank, own_rank, min(len(s) for s in spectra)) + 1):
            names[rank] = probe()
            model.add_weighted_adapter(adapters, weights, names[rank], combination_type="svd", svd_rank=rank)
        got = scores(model, [(names[r], t) for r in names for t in tasks], n)
    return [dict(rank=r, energy=float(sum(s[:r].sum() for s in spectra)) / total,
                 exact={t: got[(names[r], t)] for t in tasks}) for r in names]


# ------------------------------------------------------------------ the shape of an update
def projection_names(n_layer):
    """'blocks.{i}.attn.q', ..., 'blocks.{i}.mlp.down': every projection LoRA can target."""
    where = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "up": "mlp", "down": "mlp"}
    return [f"blocks.{i}.{where[t]}.{t}" for i in range(n_layer) for t in TARGETABLE]


def delta_weights(tuned, base):
    """{projection: Delta W = W_tuned - W_base} for every targetable projection.
    `tuned` is a full fine-tuned PeftModel (or any model with the base's parameter names)."""
    model = getattr(tuned, "base_model", tuned)
    tuned_state = model.state_dict()
    base_state = base.state_dict()
    return {name: (tuned_state[f"{name}.weight"] - base_state[f"{name}.weight"]).detach().float().cpu()
            for name in projection_names(base.config.n_layer)}


def changed_weights(tuned, base):
    """(weights that differ from the base, all weights) of a full fine-tuned model."""
    tuned_state, changed, total = getattr(tuned, "base_model", tuned).state_dict(), 0, 0
    for name, w in base.state_dict().items():
        changed += int((tuned_state[name].to(w.device) != w).sum())
        total += w.numel()
    return changed, total


def singular_values(delta):
    """Singular values of a matrix, largest first."""
    return torch.linalg.svdvals(delta.double()).float()


def energy_captured(s, k):
    """Fraction of ||Delta W||_F^2 in the top k singular directions: what rank k can hold."""
    s2 = s.double() ** 2
    total = s2.sum().item()
    return s2[:k].sum().item() / total if total > 0 else 0.0


def random_matrix_spectrum(shape, frobenius, seed=0):
    """Singular values of a Gaussian matrix of the same shape and Frobenius norm: the
    spectrum of an update with no preferred directions, for comparison."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return singular_values(g * (frobenius / g.norm()))


def cumulative_energy(s):
    """Fraction of ||Delta W||_F^2 in the top k directions, for k = 1..len(s)."""
    s2 = s.double() ** 2
    return (s2.cumsum(0) / s2.sum().clamp_min(1e-300)).float()


def spectrum(delta, seed=0):
    """What the Inside page plots for one Delta W: its singular values and cumulative energy,
    beside those of a random matrix of the same shape and norm. Lists of floats."""
    s = singular_values(delta)
    rand = random_matrix_spectrum(tuple(delta.shape), delta.norm().item(), seed)
    return dict(s=s.tolist(), energy=cumulative_energy(s).tolist(),
                random_s=rand.tolist(), random_energy=cumulative_energy(rand).tolist())


def spectrum_summary(deltas, r):
    """Per projection: its Frobenius norm and the energy its top r directions hold, beside
    a random matrix's. A list of dicts, largest update first."""
    rows = []
    for name, d in deltas.items():
        s = singular_values(d)
        norm = d.norm().item()
        rand = random_matrix_spectrum(tuple(d.shape), norm)
        rows.append(dict(projection=name, norm=norm, energy=energy_captured(s, r),
                         random_energy=energy_captured(rand, r)))
    return sorted(rows, key=lambda row: -row["norm"])


# ------------------------------------------------------------------ what a base's attention reads
def attention_spread(base, task, rows=128):
    """Per layer, how evenly the base's attention spreads over the tokens it may see, at the
    answer positions of `task`'s held-out inputs: the attention's entropy as a fraction of
    an even spread's (1.0: every visible token weighed alike). A random base's is ~1.0, so
    each position reads an average of the tokens before it: which digits are present, not
    where they are. Heads and the first `rows` inputs averaged; a list of floats, first
    layer first. Reads the base without hooks or changes: other runs may share it."""
    x = get_task(task).eval_set(_device(base), rows)[0]
    even = torch.arange(1, x.shape[1] + 1, device=x.device).double().log()  # an even spread's entropy, per query
    spread = []
    with torch.no_grad():
        h = base.embed(x)
        for block in base.blocks:
            p = unwrapped(block.attn).weights(block.ln1(h))
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).double()  # (B, heads, T)
            spread.append((entropy[..., ANSWER_START:] / even[ANSWER_START:]).mean().item())
            h = block(h)
    return spread
