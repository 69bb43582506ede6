"""LoHa and LoKr (the LyCORIS family) against HF peft 0.21.2 on the same base: the same tensors
give the same outputs under the same saved names, files go both ways, the counts agree, the
init is peft's own draw; and what is special to each: LoKr's factorization and shapes, the
rank an update reaches from few parameters (the lesson), cohorts, seeded dropout.
The contract every method keeps (tests/test_contract.py) is not restated here."""
import copy

import pytest
import torch

import peftcore
from peftcore import PeftModel, get_peft_model, hf_code
from peftcore.cohort import Cohort, cohort_key
from peftcore.methods import LoHaConfig, LoKrConfig
from peftcore.methods.lokr import factorization, kron_shapes, rank_bound
from peftcore.presets import PRESETS
from peftcore.train import Trainer, train
from phi import randomize

peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

TOL = 1e-5
ALL = ("q", "k", "v", "o", "up", "down")
CONFIGS = [
    LoHaConfig(),
    LoHaConfig(r=3, alpha=5, target_modules=ALL),
    LoKrConfig(r=2, target_modules=("q", "v", "up", "down")),  # W2 a rank-2 pair everywhere
    LoKrConfig(r=8, alpha=4, target_modules=("q", "up")),      # W2 full on q (8 >= 16 / 2), a pair on up
    LoKrConfig(r=2, decompose_both=True, target_modules=("k", "down")),  # W1 a pair too
    LoKrConfig(r=3, decompose_factor=4, target_modules=("o", "up")),     # 128 = 4 x 32, 512 = 4 x 128
]


def hf_config(config):
    fields = config.to_dict()
    fields.pop("peft_type")
    return getattr(peft, type(config).__name__)(**dict(fields, target_modules=list(config.target_modules)))


def hf_model(base, config):
    return peft.get_peft_model(copy.deepcopy(base), hf_config(config))


def phi_of(model):
    return {k: t.detach().clone() for k, t in model.adapter_state_dict().items()}


def moved(model, base, x):
    """How far the phi moves the logits from the base's: a test of equal outputs needs a phi
    that matters, or it passes whatever the formula."""
    with torch.no_grad():
        return float((model(x) - base(x)).abs().max())


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_same_tensors_same_outputs_and_saved_names_as_hf_peft(base, batch, config):
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.2, replace=True)
    theirs = hf_model(base, config).eval()
    saved = get_peft_model_state_dict(theirs)
    assert set(ours.adapter_state_dict()) == set(saved)  # our saved names are peft's saved names
    hf_state = theirs.state_dict()
    with torch.no_grad():
        for key, t in ours.adapter_state_dict().items():
            assert hf_state[key + ".default"].shape == t.shape == saved[key].shape, key
            hf_state[key + ".default"].copy_(t)
    assert moved(ours, base, batch[0]) > 0.3
    torch.testing.assert_close(ours(batch[0]), theirs(batch[0]), atol=TOL, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_counts_equal_hf_peft_and_the_closed_form(base, config):
    ours = get_peft_model(base, config)
    theirs = hf_model(base, config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == config.num_params(base.config)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_the_init_is_hf_peft_s_own_draw(base, config, seed):
    """get_peft_model(seed=s) draws what peft draws after torch.manual_seed(s): the same
    tensors in the same order, and the update starts at zero in both."""
    torch.manual_seed(seed)
    theirs = get_peft_model_state_dict(hf_model(base, config))
    ours = phi_of(get_peft_model(base, config, seed=seed))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert any(t.abs().sum() > 0 for t in ours.values())


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[3], CONFIGS[4]], ids=repr)
def test_hf_peft_loads_our_file(base, batch, tmp_path, config):
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.2, replace=True)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert type(theirs.peft_config["default"]).__name__ == type(config).__name__
    assert moved(ours, base, batch[0]) > 0.3
    torch.testing.assert_close(ours(batch[0]), theirs(batch[0]), atol=TOL, rtol=0)


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[3], CONFIGS[4]], ids=repr)
def test_we_load_hf_peft_s_file(base, batch, tmp_path, config):
    theirs = hf_model(base, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base, tmp_path)
    loaded = ours.peft_config["default"]
    assert type(loaded) is type(config) and set(loaded.target_modules) == set(config.target_modules)
    assert loaded == type(config)(**{**config.__dict__, "target_modules": loaded.target_modules})
    theirs.eval()
    assert moved(ours, base, batch[0]) > 0.3
    torch.testing.assert_close(ours(batch[0]), theirs(batch[0]), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["LOHA", "LOKR"])
def test_the_copied_hf_code_gives_the_apps_outputs(base, batch, tmp_path, name):
    """"Copy as HF peft code" on this base: peft, given the downloaded file, serves the same rows."""
    config = PRESETS[name].config
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.1)
    file = tmp_path / "my-phi.safetensors"
    file.write_bytes(peftcore.adapter_to_bytes(ours))
    namespace = {}
    exec(compile(hf_code.on_this_base(config, str(file)), "copied from the app", "exec"), namespace)  # noqa: S102
    ours.eval()
    assert moved(ours, base, batch[0]) > 0.3
    torch.testing.assert_close(namespace["model"](batch[0]), ours(batch[0]), atol=TOL, rtol=0)


# ------------------------------------------------------------------ LoKr's factorization
def test_factorization_is_hf_peft_s():
    for factor in (-1, 1, 2, 3, 4, 8, 16, 100):
        for dimension in range(1, 700):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize("r", [1, 2, 3, 4, 7, 8, 15, 16, 64])
@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("decompose_factor", [-1, 4])
def test_lokr_tensors_have_hf_peft_s_shapes_on_every_projection(base, r, decompose_both, decompose_factor):
    """Which of W1, W1a/W1b, W2, W2a/W2b an adapter has, and their shapes, on the toy's 128 x 128,
    128 -> 512 and 512 -> 128 projections: peft's rules for r, decompose_both and decompose_factor."""
    config = LoKrConfig(r=r, decompose_both=decompose_both, decompose_factor=decompose_factor, target_modules=ALL)
    ours = {k: tuple(t.shape) for k, t in get_peft_model(base, config).adapter_state_dict().items()}
    theirs = {k: tuple(t.shape) for k, t in get_peft_model_state_dict(hf_model(base, config)).items()}
    assert ours == theirs
    (a, c), (b, d), use_w1, use_w2 = kron_shapes(config, 128, 128)
    assert a * b == 128 and c * d == 128
    assert ("base_model.model.blocks.0.attn.q.lokr_w2" in ours) == use_w2 == (r >= max(b, d) / 2)


# ------------------------------------------------------------------ the lesson: rank from few numbers
def delta_of(model, projection="q"):
    layer = model.base_model.blocks[0].attn.get_submodule(projection)
    return layer.delta_weight("default").detach()


def test_loha_reaches_rank_r_squared_where_lora_of_its_size_reaches_2r(base):
    r = 4
    model = get_peft_model(base, LoHaConfig(r=r, target_modules=("q",)), seed=0)
    randomize(model, scale=0.3, replace=True)
    rank = int(torch.linalg.matrix_rank(delta_of(model)))
    per_projection = model.get_nb_trainable_parameters()[0] // base.config.n_layer
    lora_rank_of_that_size = per_projection // (2 * base.config.d_model)  # r (d_in + d_out) numbers
    assert lora_rank_of_that_size == 2 * r
    assert rank == r * r > 2 * r


@pytest.mark.parametrize("r, expected", [(2, 16), (4, 32), (8, 128)])
def test_lokr_multiplies_ranks_up_to_full_rank(base, r, expected):
    """rank(W1 kron W2) = rank W1 * rank W2: an 8 x 8 W1 and a rank-r 16 x 16 W2 reach 8 r on a
    128 x 128 projection; at r = 8 W2 is full and so is the update, from 320 numbers."""
    config = LoKrConfig(r=r, target_modules=("q",))
    model = get_peft_model(base, config, seed=0)
    randomize(model, scale=0.3, replace=True)
    rank = int(torch.linalg.matrix_rank(delta_of(model)))
    assert rank == expected == rank_bound(config, 128, 128) > 2 * r
    assert model.get_nb_trainable_parameters()[0] // base.config.n_layer < 2 * 128 * 2 * r  # < a rank-2r LoRA


# ------------------------------------------------------------------ cohorts and dropout
COHORT_RUNS = [  # config, task, seed, steps, lr: ranks, LoKr's layouts, tasks and budgets differ
    [(LoHaConfig(r=2, target_modules=("q", "v")), "times_3", 1, 6, 1e-2),
     (LoHaConfig(r=4, alpha=2, target_modules=("v", "q")), "complement", 2, 4, 3e-2)],
    [(LoKrConfig(r=2, target_modules=("q", "up")), "times_3", 1, 6, 1e-2),
     (LoKrConfig(r=8, decompose_both=True, target_modules=("q", "up")), "complement", 2, 4, 3e-2)],
]


def _phi_after(models, trainers):
    cohort = Cohort(trainers)
    while cohort.trainers:
        for _, event in cohort.step():
            assert not isinstance(event, Exception), event
    return [[p.detach().clone() for _, p in m.named_adapter_parameters()] for m in models]


@pytest.mark.parametrize("runs", COHORT_RUNS, ids=["LoHa", "LoKr"])
def test_a_run_in_a_cohort_trains_as_it_would_alone(base, runs):
    def make():
        return [get_peft_model(base, cfg, seed=seed) for cfg, _, seed, _, _ in runs]

    def trainers(models):
        return [Trainer(m, task, steps, lr=lr, seed=seed, batch_size=16, eval_every=1000)
                for m, (_, task, seed, steps, lr) in zip(models, runs)]
    models = make()
    assert len({cohort_key(m, 16) for m in models}) == 1 and cohort_key(models[0], 16) is not None
    together = _phi_after(models, trainers(models))
    for (cfg, task, seed, steps, lr), phi in zip(runs, together):
        alone = get_peft_model(base, cfg, seed=seed)
        list(train(alone, task, steps, lr=lr, seed=seed, batch_size=16, eval_every=1000))
        for x, y in zip(phi, [p.detach() for _, p in alone.named_adapter_parameters()]):
            torch.testing.assert_close(x, y, atol=TOL, rtol=0)
        start = [p.detach() for _, p in get_peft_model(base, cfg, seed=seed).named_adapter_parameters()]
        assert any((x - s).abs().max() > 100 * TOL for x, s in zip(phi, start))  # it trained


def test_runs_with_dropout_train_alone_and_other_layouts_ride_apart(base):
    key = lambda cfg: cohort_key(get_peft_model(base, cfg), 16)
    assert key(LoHaConfig(rank_dropout=0.1)) is None and key(LoKrConfig(module_dropout=0.1)) is None
    assert key(LoHaConfig(target_modules=("q",))) != key(LoHaConfig(target_modules=("q", "v")))
    assert key(LoHaConfig()) != key(LoKrConfig())


@pytest.mark.parametrize("config", [LoHaConfig(r=2, rank_dropout=0.3, module_dropout=0.3),
                                    LoKrConfig(r=2, rank_dropout=0.3, module_dropout=0.3, rank_dropout_scale=True)],
                         ids=["LoHa", "LoKr"])
def test_dropout_draws_from_the_run_s_seed(base, batch, config):
    """Rank and module dropout act in training only, and draw from the run's own generator:
    the same seed repeats the run exactly (torch's global RNG, which moves between the runs,
    would not), and the same run without dropout ends elsewhere (the masks act)."""
    def trained(train_seed, cfg=config):
        model = get_peft_model(base, cfg, seed=0)
        list(train(model, "times_3", 5, lr=1e-2, seed=train_seed, batch_size=16, eval_every=1000))
        return model, [p.detach().clone() for _, p in model.named_adapter_parameters()]
    model, a = trained(1)
    _, b = trained(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    _, plain = trained(1, type(config)(**{**config.__dict__, "rank_dropout": 0.0, "module_dropout": 0.0}))
    assert any(not torch.allclose(x, y) for x, y in zip(a, plain))
    model.eval()
    assert torch.equal(model(batch[0]), model(batch[0]))  # no dropout outside training
