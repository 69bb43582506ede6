"""Many phi become one: PeftModel.add_weighted_adapter against HF peft 0.21.2's, on LoRA phi
trained here (the shipped library's) and on random ones where a variant needs them (rsLoRA,
DoRA), each copied into peft's model of the same base.

What is compared is what serves: the merged update Delta W = scaling * B @ A of each layer (the
product, never A and B alone: peft's own tests compared A and B and missed its wrong negative
weights, peft PR #2918), and the logits. Where peft 0.21.2 is wrong, the test says so, names
peft's issue, and pins peft's error by its measured size or its exact form."""
import copy
import math

import pytest
import torch

import peftcore
from mixed import assert_rows_equal_alone
from phi import randomize
from peftcore import BASE_ROW, IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftcore.library import LIBRARY_DIR
from peftcore.methods.lora import LoraLinear

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402

TASKS = ("times_3", "complement", "sort")  # three trained LoRA phi: r=1, lora_alpha=4 (scaling 4) on q, k, v, o
WEIGHTS = [0.7, 0.5, -0.4]  # a negative weight in every parity test


# ------------------------------------------------------------------ helpers
def hf_config(config):
    if isinstance(config, IA3Config):
        return peft.IA3Config(target_modules=list(config.target_modules),
                              feedforward_modules=list(config.feedforward_modules))
    return peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
                           use_rslora=config.use_rslora, use_dora=config.use_dora)


def twin(base, ours):
    """HF peft's model over a copy of the base holding every phi of `ours`, by the same names."""
    names = list(ours.peft_config)
    theirs = peft.get_peft_model(copy.deepcopy(base), hf_config(ours.peft_config[names[0]]), adapter_name=names[0])
    for name in names:
        if name != names[0]:
            theirs.add_adapter(name, hf_config(ours.peft_config[name]))
        peft.set_peft_model_state_dict(theirs, ours.adapter_state_dict(name), adapter_name=name)
    return theirs.eval()


def library(base, method="lora", tasks=TASKS):
    """Ours with the shipped, trained phi of `tasks`, and peft's twin."""
    ours = PeftModel(base)
    for task in tasks:
        ours.load_adapter(LIBRARY_DIR / method / task, task)
    return ours, twin(base, ours)


def random_pair(base, **options):
    """Ours with two random rank-4 phi "a" and "b" on q and v, and peft's twin."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=("q", "v"), **options)
    ours = get_peft_model(base, config, adapter_name="a", seed=0)
    ours.inject_adapter("b", copy.deepcopy(config), seed=1)
    randomize(ours, "a", seed=1, scale=0.05)
    randomize(ours, "b", seed=2, scale=0.05)
    return ours, twin(base, ours)


def deltas(model, name):
    """{projection path: Delta W = scaling B A} of phi `name`, in ours or in peft's model."""
    if isinstance(model, PeftModel):
        return {path.removeprefix("base_model."): layer.delta_weight(name).detach()
                for path, layer in model.named_modules() if isinstance(layer, LoraLinear) and layer.has_phi(name)}
    return {path.removeprefix("base_model.model."): layer.get_delta_weight(name).detach()
            for path, layer in model.named_modules() if isinstance(layer, LoraLayer) and name in layer.lora_A}


def weighted_sum(model, adapters, weights):
    """The exact combination: sum_i w_i Delta W_i per projection (a phi absent there adds nothing)."""
    out = {}
    for adapter, w in zip(adapters, weights):
        for path, delta in deltas(model, adapter).items():
            out[path] = out.get(path, 0) + w * delta
    return out


def gap(a, b):
    """The largest entry of a - b over every projection; the projections must be the same."""
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def same_logits(ours, theirs, name, x):
    """The two libraries' logits with phi `name`: equal up to the roundings of their different
    forwards (ours adds B A x in one fused addmm). With the same factors, measured: 0 for cat and
    the factor-level forms, up to 5.1e-5 for the svd forms (their B = U S reaches 2.2 where the
    sources' factors stay below 0.4), on logits that reach 9. A wrong product is off by 0.1 or more."""
    torch.testing.assert_close(logits(ours, name, x), logits(theirs, name, x), atol=1e-4, rtol=1e-5)


def logits(model, name, x):
    model.set_adapter(name)
    with torch.no_grad():
        return model(x)


def merge_both(ours, theirs, adapters, weights, name, seed=0, **options):
    """The same merge in both libraries, torch's global RNG seeded alike before each (dare_*)."""
    for model in (ours, theirs):
        torch.manual_seed(seed)
        model.add_weighted_adapter(adapters, weights, name, **options)


# ------------------------------------------------------------------ parity: the updates
@pytest.mark.parametrize("combination_type, options", [
    ("cat", {}),
    ("svd", {}),                                    # rank max(r) = 1: truncated
    ("svd", dict(svd_rank=3)),                      # rank 3 = the sum's: exact
    ("svd", dict(svd_rank=2, svd_clamp=0.9, svd_full_matrices=False)),
    ("ties_svd", dict(density=0.5, svd_rank=2)),
    ("ties_svd", dict(density=0.3, majority_sign_method="frequency")),
    ("magnitude_prune_svd", dict(density=0.5, svd_rank=2)),
    ("dare_linear_svd", dict(density=0.5, svd_rank=2)),
    ("dare_ties_svd", dict(density=0.5, svd_rank=3)),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_cat_and_the_svd_forms_give_peft_s_update(base, batch, combination_type, options):
    """The merged Delta W per projection equals peft's to 1e-5 (SVD factors may differ in
    sign, their product may not), so do the logits, and cat and a full-rank svd equal the exact
    weighted sum of the sources' updates. With lora_alpha 4 and r 1 each source's scaling is 4:
    peft's svd path applied it twice until PR #3111 (2026-03); 0.21.2 applies it once, and so
    do we, which this test would see (a factor of 4)."""
    ours, theirs = library(base)
    merge_both(ours, theirs, list(TASKS), WEIGHTS, "merged", combination_type=combination_type, **options)
    config, their_config = ours.peft_config["merged"], theirs.peft_config["merged"]
    assert (config.r, config.lora_alpha, config.scaling) == (their_config.r, their_config.lora_alpha, 1.0)
    assert config.r == {"cat": 3}.get(combination_type, options.get("svd_rank", 1))
    mine = deltas(ours, "merged")
    assert gap(mine, deltas(theirs, "merged")) < 1e-5
    same_logits(ours, theirs, "merged", batch[0])
    if combination_type == "cat" or options.get("svd_rank") == 3 and combination_type == "svd":
        assert gap(mine, weighted_sum(ours, TASKS, WEIGHTS)) < 1e-6
    else:  # truncated or pruned: a real change (the comparison above is not of two exact sums)
        assert gap(mine, weighted_sum(ours, TASKS, WEIGHTS)) > 1e-3


@pytest.mark.parametrize("combination_type, options", [
    ("linear", {}), ("ties", dict(density=0.5)), ("ties", dict(density=0.7, majority_sign_method="frequency")),
    ("magnitude_prune", dict(density=0.5)), ("dare_linear", dict(density=0.5)), ("dare_ties", dict(density=0.6)),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_the_factor_level_forms_equal_peft_s_exactly(base, batch, combination_type, options):
    """linear, ties and magnitude_prune combine A and B entry by entry, and give peft's factors
    and updates to the bit; dare_* too, under the same global RNG state (peft draws from it, in
    this order: the new phi's init, then per projection A's masks and B's)."""
    ours, theirs = library(base)
    merge_both(ours, theirs, list(TASKS), WEIGHTS, "merged", combination_type=combination_type, **options)
    mine, their_state = ours.adapter_state_dict("merged"), peft.get_peft_model_state_dict(theirs, adapter_name="merged")
    assert set(mine) == set(their_state) and all(torch.equal(mine[k], their_state[k]) for k in mine)
    assert gap(deltas(ours, "merged"), deltas(theirs, "merged")) == 0
    same_logits(ours, theirs, "merged", batch[0])


def test_linear_is_not_the_weighted_sum_of_updates_it_has_the_cross_terms(base):
    """peft's linear sums A's and B's: B A = sum_ij sqrt(w_i s_i w_j s_j) B_i A_j, not
    sum_i w_i s_i B_i A_i. The cross terms i != j are exactly the difference."""
    ours, _ = library(base)
    ours.add_weighted_adapter(list(TASKS), WEIGHTS, "linear", combination_type="linear")
    layers = [m for m in ours.modules() if isinstance(m, LoraLinear) and m.has_phi("linear")]
    for layer in layers:
        f = [math.copysign(math.sqrt(abs(w * layer.scaling[t])), w) for t, w in zip(TASKS, WEIGHTS)]
        g = [math.sqrt(abs(w * layer.scaling[t])) for t, w in zip(TASKS, WEIGHTS)]
        cross = sum(g[i] * f[j] * layer.lora_B[TASKS[i]].weight @ layer.lora_A[TASKS[j]].weight
                    for i in range(3) for j in range(3) if i != j)
        exact = sum(w * layer.delta_weight(t) for t, w in zip(TASKS, WEIGHTS))
        torch.testing.assert_close(layer.delta_weight("linear"), exact + cross, atol=1e-6, rtol=0)
        assert cross.abs().max() > 1e-2  # not a rounding: a different update


def test_dare_repeats_with_a_seed_and_is_unbiased(base):
    """seed= draws dare's masks from a private generator: the same seed, the same merge; another
    seed, another. Over many seeds the mean of dare_linear's updates (each kept entry / density)
    approaches linear's (the same factor-level sum without drops)."""
    ours, _ = library(base, tasks=TASKS[:2])
    kw = dict(combination_type="dare_linear", density=0.5)
    ours.add_weighted_adapter(list(TASKS[:2]), [0.6, 0.4], "s1", seed=1, **kw)
    ours.add_weighted_adapter(list(TASKS[:2]), [0.6, 0.4], "s1again", seed=1, **kw)
    ours.add_weighted_adapter(list(TASKS[:2]), [0.6, 0.4], "s2", seed=2, **kw)
    state = {n: ours.adapter_state_dict(n) for n in ("s1", "s1again", "s2")}
    assert all(torch.equal(state["s1"][k], state["s1again"][k]) for k in state["s1"])
    assert not all(torch.equal(state["s1"][k], state["s2"][k]) for k in state["s1"])
    ours.add_weighted_adapter(list(TASKS[:2]), [0.6, 0.4], "lin", combination_type="linear")
    target = ours.adapter_state_dict("lin")
    draws = []
    for seed in range(200):
        ours.add_weighted_adapter(list(TASKS[:2]), [0.6, 0.4], "draw", seed=seed, **kw)
        draws.append(ours.adapter_state_dict("draw"))
        ours.delete_adapter("draw")
    for k, t in target.items():  # the mean of 200 draws: within 4 standard errors of the expectation
        mean = torch.stack([d[k] for d in draws]).mean(0)
        sd = (t.abs() * math.sqrt((1 - 0.5) / 0.5) / math.sqrt(200)).max()
        assert (mean - t).abs().max() < 4 * sd + 1e-6, k


def test_ia3_is_peft_s_weighted_sum_of_vectors(base, batch):
    ours, theirs = library(base, "ia3", TASKS[:2])
    merge_both(ours, theirs, list(TASKS[:2]), [0.8, -0.3], "merged")
    mine, their_state = ours.adapter_state_dict("merged"), peft.get_peft_model_state_dict(theirs, adapter_name="merged")
    assert set(mine) == set(their_state) and all(torch.equal(mine[k], their_state[k]) for k in mine)
    for k, v in mine.items():  # and what that is, by hand
        a, b = (ours.adapter_state_dict(t)[k] for t in TASKS[:2])
        assert torch.equal(v, torch.zeros_like(a) + a * 0.8 + b * -0.3)
    same_logits(ours, theirs, "merged", batch[0])
    assert ours.peft_config["merged"] == ours.peft_config[TASKS[0]]


def test_different_ranks_and_targets_merge_as_peft_merges_them(base, batch):
    """cat and svd take phi of different ranks on different projections: the merged phi
    targets every projection any source targets, and a source absent from one adds nothing
    there (as peft)."""
    ours = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v")), adapter_name="qv", seed=0)
    ours.inject_adapter("kvup", LoraConfig(r=3, lora_alpha=3, target_modules=("k", "v", "up")), seed=1)
    randomize(ours, seed=3, scale=0.05)
    theirs = twin(base, ours)
    for kind in ("cat", "svd"):
        merge_both(ours, theirs, ["qv", "kvup"], [0.9, -0.6], kind, combination_type=kind, svd_rank=5)
        assert ours.peft_config[kind].target_modules == ("q", "k", "v", "up")
        exact = weighted_sum(ours, ["qv", "kvup"], [0.9, -0.6])
        assert gap(deltas(ours, kind), exact) < 1e-6 and gap(deltas(ours, kind), deltas(theirs, kind)) < 1e-5
        same_logits(ours, theirs, kind, batch[0])


# ------------------------------------------------------------------ negative weights: the product
def test_negative_weights_subtract_the_update_not_only_flip_a_factor(base, batch):
    """A phi merged with itself at +1 and -1 is no change at all (the model is the base), and a
    phi at weight -1 is its update negated, whatever the combination (peft PR #2918: its sign
    went on A and B both, so -1 gave +1 back, and tests that compared A and B missed it)."""
    ours, _ = library(base, tasks=TASKS[:1])
    t = TASKS[0]
    for kind in ("cat", "svd", "linear"):
        ours.add_weighted_adapter([t, t], [1.0, -1.0], f"zero_{kind}", combination_type=kind, svd_rank=2)
        assert max(d.abs().max().item() for d in deltas(ours, f"zero_{kind}").values()) < 1e-6
        torch.testing.assert_close(logits(ours, f"zero_{kind}", batch[0]), base(batch[0]), atol=1e-5, rtol=0)
    ours.add_weighted_adapter([t], [-1.0], "minus")
    exact = {k: -d for k, d in deltas(ours, t).items()}
    assert gap(deltas(ours, "minus"), exact) < 1e-6


def test_the_comparison_sees_a_wrong_product_with_right_looking_factors(base):
    """A check that cannot fail is no check: the sign put on both factors (peft's old bug)
    leaves every |A| and |B| as they were, and the update comparison above sees it."""
    ours, _ = library(base, tasks=TASKS[:1])
    ours.add_weighted_adapter([TASKS[0]], [-1.0], "minus")
    right = deltas(ours, "minus")
    with torch.no_grad():
        for layer in [m for m in ours.modules() if isinstance(m, LoraLinear) and m.has_phi("minus")]:
            layer.lora_B["minus"].weight.neg_()
    assert gap(deltas(ours, "minus"), right) > 1e-2


# ------------------------------------------------------------------ where peft 0.21.2 is wrong
@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_rslora_merges_right_where_peft_is_sqrt_r_off(base, batch, combination_type):
    """HF peft issue #3761 (and PR #3449): the merged config keeps the first source's
    use_rslora with lora_alpha = r, so its scaling is r / sqrt(r) = sqrt(r), not 1. Here cat and
    svd give the exact weighted sum of the updates; peft's is exactly sqrt(new r) times it
    (cat of two r=4: sqrt 8; linear and svd at rank 8 the same factor on their own sum). In
    the logits, peft's merged phi is off by the sizes pinned below (the largest logit moved)."""
    ours, theirs = random_pair(base, use_rslora=True)
    merge_both(ours, theirs, ["a", "b"], [0.7, -0.3], "m", combination_type=combination_type, svd_rank=8)
    assert ours.peft_config["m"].scaling == 1.0 and not ours.peft_config["m"].use_rslora
    mine, theirs_d = deltas(ours, "m"), deltas(theirs, "m")
    new_r = theirs.peft_config["m"].r
    assert gap(theirs_d, {k: math.sqrt(new_r) * d for k, d in mine.items()}) < 1e-5  # peft's error, exactly
    if combination_type != "linear":
        assert gap(mine, weighted_sum(ours, ["a", "b"], [0.7, -0.3])) < 1e-6
    peft_error = (logits(theirs, "m", batch[0]) - logits(ours, "m", batch[0])).abs().max().item()
    assert peft_error == pytest.approx({"cat": 2.942, "svd": 2.942, "linear": 2.631}[combination_type], rel=0.01)


@pytest.mark.parametrize("variant", [dict(use_rslora=True), dict(use_dora=True), dict(use_dora=True, use_rslora=True)],
                         ids=repr)
def test_one_phi_at_weight_one_comes_back_where_peft_s_does_not(base, batch, variant):
    """HF peft issue #3761: merging a single rsLoRA or DoRA phi with weight 1 must give it back.
    Here it does, to float rounding (peft turns one adapter into `linear`, whose factors carry
    sqrt(scaling)). peft 0.21.2 gives back rsLoRA's update times sqrt(r) = 2, and DoRA's
    direction with the base's row norms for magnitude: the magnitude it learned is lost."""
    ours, theirs = random_pair(base, **variant)
    merge_both(ours, theirs, ["a"], [1.0], "same")
    x = batch[0]
    torch.testing.assert_close(logits(ours, "same", x), logits(ours, "a", x), atol=1e-5, rtol=1e-5)
    peft_error = (logits(theirs, "same", x) - logits(theirs, "a", x)).abs().max().item()  # the largest logit moved
    measured = {(True, False): 2.640, (False, True): 1.283, (True, True): 3.844}
    assert peft_error == pytest.approx(measured[variant.get("use_rslora", False), variant.get("use_dora", False)],
                                       rel=0.01)
    if variant.get("use_rslora"):
        assert gap(deltas(theirs, "same"), {k: 2 * d for k, d in deltas(ours, "a").items()}) < 1e-5
    if variant.get("use_dora"):
        for path, layer in theirs.named_modules():
            if isinstance(layer, LoraLayer) and "same" in layer.lora_A:
                norms = torch.linalg.norm(layer.get_base_layer().weight, dim=1)
                torch.testing.assert_close(layer.lora_magnitude_vector["same"].weight.detach(), norms)


def test_dora_merges_directions_as_updates_and_magnitudes_as_offsets_from_the_base(base, batch):
    """What a DoRA merge is here (peft 0.21.2 keeps the direction sum and drops every learned
    magnitude; the fix proposed upstream for #3761 refuses DoRA). A DoRA phi is a direction
    update V and a magnitude m per row; its weight m (W + V) / |W + V| is not W plus a low-rank
    update, so no merge of DoRA phi is a sum of weight updates. Here the directions combine as
    LoRA updates do, and the magnitudes as offsets from where a fresh DoRA magnitude starts
    (the base's row norms |W|): m = |W| + sum_i w_i (m_i - |W|), the same task arithmetic on
    DoRA's own parameters. One phi at weight 1 comes back (above); several: the same rule."""
    ours, theirs = random_pair(base, use_dora=True)
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.3], "m", combination_type="cat")
    for layer in [m for m in ours.modules() if isinstance(m, LoraLinear) and m.has_phi("m")]:
        norms = torch.linalg.norm(layer.get_base_layer().weight, dim=1)
        want = norms + 0.7 * (layer.lora_magnitude_vector["a"] - norms) - 0.3 * (layer.lora_magnitude_vector["b"] - norms)
        torch.testing.assert_close(layer.lora_magnitude_vector["m"], want)
    assert gap(deltas(ours, "m"), weighted_sum(ours, ["a", "b"], [0.7, -0.3])) < 1e-6
    plain = get_peft_model(base, LoraConfig(r=4, target_modules=("q", "v")), adapter_name="plain")
    plain.inject_adapter("dora", LoraConfig(r=4, target_modules=("q", "v"), use_dora=True))
    with pytest.raises(ValueError, match="DoRA and plain LoRA"):
        plain.add_weighted_adapter(["plain", "dora"], [0.5, 0.5], "m")
    assert "m" not in plain.peft_config


# ------------------------------------------------------------------ the new phi in the bank
def test_the_merged_phi_is_in_the_bank_inactive_without_a_task_and_serves_beside_its_sources(base, batch):
    ours, _ = library(base)
    ours.set_adapter(TASKS[0])
    ours.adapter_task[TASKS[0]] = TASKS[0]
    before = ours.generation
    ours.add_weighted_adapter(list(TASKS), [1 / 3] * 3, "class", combination_type="cat")
    assert ours.active_adapter == TASKS[0] and "class" not in ours.adapter_task and ours.generation > before
    assert not any(p.requires_grad for _, p in ours.named_adapter_parameters("class"))
    assert ours.adapter_num_params("class") == 3 * ours.adapter_num_params(TASKS[0])  # cat: ranks add up
    assert_rows_equal_alone(ours, batch[0][:5], ["class", TASKS[0], BASE_ROW, TASKS[2], "class"])


def test_a_merge_in_the_whole_library_bank_equals_one_in_a_bank_of_its_sources(base):
    """In a bank where other methods already wrap the projections, a phi added later gets a
    wrapper of its own, on top: the merge finds its sources in the stack below it."""
    from peftcore.library import load_library
    bank, errors = load_library(base)
    assert not errors
    for method, kind in (("lora", "linear"), ("lora", "cat"), ("ia3", "linear")):
        sources = [f"{method}-{t}" for t in TASKS[:2]]
        bank.add_weighted_adapter(sources, [0.6, -0.4], f"merged-{method}-{kind}", combination_type=kind)
        alone, _ = library(base, method, TASKS[:2])
        alone.add_weighted_adapter(list(TASKS[:2]), [0.6, -0.4], "merged", combination_type=kind)
        mine, want = bank.adapter_state_dict(f"merged-{method}-{kind}"), alone.adapter_state_dict("merged")
        assert set(mine) == set(want) and all(torch.equal(mine[k], want[k]) for k in mine)


def test_peft_loads_the_merged_phi_file(base, batch, tmp_path):
    ours, _ = library(base, tasks=TASKS[:2])
    ours.add_weighted_adapter(list(TASKS[:2]), [0.5, 0.5], "merged", combination_type="svd", svd_rank=2)
    ours.save_pretrained(tmp_path, "merged")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(theirs(batch[0]), logits(ours, "merged", batch[0]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ refusals
def refused(model, match, *args, **kwargs):
    """The merge is refused with a ValueError matching `match`, and the model is as it was."""
    names, modules = dict(model.peft_config), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(*args, **kwargs)
    assert model.peft_config == names and [type(m) for m in model.modules()] == modules


def test_refusals_say_why_and_leave_the_bank_as_it_was(base):
    ours, _ = library(base, tasks=TASKS[:2])
    a, b = TASKS[:2]
    ours.inject_adapter("r2", LoraConfig(r=2, lora_alpha=4, target_modules=("q", "k", "v", "o")))
    refused(ours, "already exists", [a, b], [0.5, 0.5], a)  # peft returns silently
    refused(ours, "one weight per adapter", [a, b], [1.0], "m")
    refused(ours, "finite", [a, b], [1.0, float("nan")], "m")
    refused(ours, "combination_type must be one of", [a, b], [1, 1], "m", combination_type="average")
    refused(ours, "give it a density", [a, b], [1, 1], "m", combination_type="ties")
    refused(ours, "density", [a, b], [1, 1], "m", combination_type="dare_linear", density=0)
    refused(ours, "majority_sign_method", [a, b], [1, 1], "m", combination_type="ties", density=0.5,
            majority_sign_method="mean")
    refused(ours, "same r", [a, "r2"], [0.5, 0.5], "m", combination_type="linear")
    refused(ours, "svd_rank 200 is above", [a, b], [1, 1], "m", svd_rank=200)  # refused inside: taken out again
    refused(ours, "cuSOLVER", [a, b], [1, 1], "m", svd_driver="gesvdj")  # on phi held on the CPU, likewise
    for big in ("big1", "big2"):
        ours.inject_adapter(big, LoraConfig(r=200, target_modules=("q",)))
    refused(ours, "the merged phi would have r = 400", ["big1", "big2"], [1, 1], "m", combination_type="cat")
    refused(ours, "at least one adapter", [], [], "m")
    with pytest.raises(KeyError, match="no adapter named"):
        ours.add_weighted_adapter([a, "nope"], [0.5, 0.5], "m")

    ours.inject_adapter("ia3", IA3Config(target_modules=("k", "v"), feedforward_modules=()))
    ours.inject_adapter("ia3_other", IA3Config(target_modules=("k", "v", "down"), feedforward_modules=("down",)))
    ours.inject_adapter("prompt", PromptTuningConfig())
    refused(ours, "different methods", [a, "ia3"], [0.5, 0.5], "m")
    refused(ours, r"PROMPT_TUNING phi cannot be combined; add_weighted_adapter combines LORA, IA3 phi",
            ["prompt"], [1.0], "m")
    refused(ours, "same projections", ["ia3", "ia3_other"], [0.5, 0.5], "m")
    refused(ours, "low-rank merges", ["ia3"], [1.0], "m", combination_type="ties", density=0.5)
    ours.add_weighted_adapter(["ia3"], [1.0], "ia3_linear", combination_type="linear")  # its one way, by name


@pytest.mark.parametrize("method", [m for m in peftcore.METHODS.values() if m.shares_base and m.combine is None],
                         ids=lambda m: m.peft_type)
def test_every_other_method_is_refused_by_name(base, method):
    model = get_peft_model(base, copy.deepcopy(method.preset.config), adapter_name="a", seed=0)
    combinable = [t for t, m in peftcore.METHODS.items() if m.combine is not None]
    assert combinable == ["LORA", "IA3"]
    refused(model, f"{method.peft_type} phi cannot be combined; add_weighted_adapter combines LORA, IA3", ["a"], [1.0], "m")


# ------------------------------------------------------------------ what a merged phi's file says of it
def test_the_merged_file_records_how_it_was_made_and_refuses_a_record_that_lies(base):
    import json
    from safetensors.torch import load as st_load, save as st_save
    ours, _ = library(base, tasks=TASKS[:2])
    for task in TASKS[:2]:
        ours.adapter_task[task] = task
    ours.add_weighted_adapter(list(TASKS[:2]), [0.7, -0.3], "merged", combination_type="ties", density=0.5)
    data = peftcore.adapter_to_bytes(ours, "merged")
    loaded = PeftModel(base)
    peftcore.load_adapter(loaded, "again", data)
    assert loaded.adapter_merged_from["again"] == dict(combination_type="ties", sources=list(TASKS[:2]),
                                                       weights=[0.7, -0.3], tasks=list(TASKS[:2]))
    assert "again" not in loaded.adapter_task  # two tasks: none of its own
    loaded.delete_adapter("again")
    assert loaded.adapter_merged_from == {}

    tensors = st_load(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    config = json.loads(header["adapter_config"])
    for bad, says in [({"combination_type": "average"}, "combination_type"),
                      ({"sources": ["../etc/passwd"] * 2}, "plain name"),
                      ({"weights": [float("nan"), 1.0]}, "finite weight"),
                      ({"tasks": [7, None]}, "task name"),
                      ({"sources": ["a"] * 201, "weights": [1.0] * 201, "tasks": [None] * 201}, "1-200 sources"),
                      ({"weights": [1.0]}, "one weight and one task")]:
        record = {**config["peftcore"]["merged_from"], **bad}
        forged = st_save(tensors, metadata={"adapter_config": json.dumps(
            {**config, "peftcore": {**config["peftcore"], "merged_from": record}})})
        with pytest.raises(peftcore.AdapterLoadError, match=says):
            peftcore.load_adapter(PeftModel(base), "forged", forged)
