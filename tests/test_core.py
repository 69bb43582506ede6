"""The properties every method must keep (after HF peft's test_custom_models.py)."""
import json
import threading

import pytest
import torch

import peftcore
from peftcore import (AdapterConfig, FullFineTuneConfig, LoraConfig, PromptTuningConfig,
                      fingerprint, get_peft_model)
from peftcore.base import BASE_META_PATH, BASE_PATH
from peftcore.peft_model import shared_view
from peftcore.pretrain import first_loss, mixture_batch, pretrain
from peftcore.train import NonFiniteLossError

PEFT_CONFIGS = [LoraConfig(), LoraConfig(r=2, lora_alpha=4, target_modules=("q", "k", "v", "o", "up", "down")),
                AdapterConfig(), AdapterConfig(bottleneck_size=3, target_sublayers=("mlp",)), PromptTuningConfig(), PromptTuningConfig(num_virtual_tokens=3)]


def phi_snapshot(model):
    return [p.detach().clone() for p in model.trainable_parameters()]


# ------------------------------------------------------------------ the base
def test_shipped_base_matches_its_fingerprint(base):
    meta = json.loads(BASE_META_PATH.read_text())
    assert fingerprint(base) == meta["fingerprint"]
    assert 500_000 <= sum(p.numel() for p in base.parameters()) <= 1_000_000
    assert BASE_PATH.stat().st_size < 5 * 2**20


def test_shipped_base_solves_its_pretraining_tasks(base):
    for task in peftcore.PRETRAIN_TASKS.values():
        assert peftcore.evaluate(base, task)[0] > 0.95, task.name


def test_pretraining_script_runs(tmp_path):
    model = pretrain(steps=3, log_every=0)
    from peftcore.base import load_base, save_base
    save_base(model, tmp_path / "b.safetensors", tmp_path / "b.json")
    again = load_base(tmp_path / "b.safetensors", tmp_path / "b.json")
    assert fingerprint(again) == json.loads((tmp_path / "b.json").read_text())["fingerprint"]


def test_a_mixture_row_trains_toward_the_same_mix_of_answers():
    tasks = list(peftcore.PRETRAIN_TASKS.values())
    inputs, weights, soft = mixture_batch(512, torch.Generator().manual_seed(1), p_pair=0.3, p_all=0.2)
    assert torch.allclose(weights.sum(1), torch.ones(512))
    named = (weights > 0).sum(1)
    assert {1, 2, len(tasks)} == set(named.tolist())  # one task, a pair, or all of them
    answers = torch.stack([t.fn(inputs[:, 1:9]) for t in tasks], 1)  # (B, n, 8)
    for row in range(512):
        mix = sum(w * torch.nn.functional.one_hot(answers[row, i], soft.shape[-1]) for i, w in enumerate(weights[row]) if w)
        assert torch.allclose(soft[row], mix.float(), atol=1e-6)
        fed = inputs[row, 10:]  # the answer digits given to the model: one named task's, whole
        assert any(w and torch.equal(fed, answers[row, i, :7]) for i, w in enumerate(weights[row]))


def test_every_downstream_task_is_new_to_the_base(base):
    """Held out of pretraining, its answers differ from every pretraining task's, and its
    token starts at the mean of the pretraining rows: the base meets it unsure (ln 10 = 2.3
    nats a digit is a guess), not confidently wrong (the older base's 9.5-14 nats)."""
    x, _ = peftcore.TASKS["times_3"].eval_set()
    digits = x[:, 1:9]
    for task in peftcore.TASKS.values():
        for known in peftcore.PRETRAIN_TASKS.values():
            assert (task.fn(digits) == known.fn(digits)).all(1).float().mean() < 0.01, (task.name, known.name)
    rows = base.embed.tok.weight
    known_rows = rows[[t.token for t in peftcore.PRETRAIN_TASKS.values()]]
    for task in peftcore.TASKS.values():
        assert torch.allclose(rows[task.token], known_rows.mean(0), atol=1e-6), task.name
    for name, loss in first_loss(base).items():
        assert 2.0 < loss < 6.0, (name, loss)


def test_fingerprint_sees_every_byte(base):
    state = {k: v.clone() for k, v in base.state_dict().items()}
    fp = fingerprint(state)
    assert fp == fingerprint(base)
    state["ln_f.bias"][0] += 1e-6
    assert fingerprint(state) != fp


# ------------------------------------------------------------------ methods
@pytest.mark.parametrize("config", PEFT_CONFIGS[:4], ids=repr)
def test_no_op_at_init(base, batch, config):
    model = get_peft_model(base, config)
    assert torch.equal(model(batch[0]), base(batch[0]))


@pytest.mark.parametrize("config", PEFT_CONFIGS[4:], ids=repr)
def test_prompt_reads_real_positions(base, batch, config):
    """Output t is read at real token t: it sees real tokens 0..t (and the prompt), never
    t+1. Reading the wrong slice (the prompt's positions) breaks one of the two checks."""
    model = get_peft_model(base, config).eval()
    x = batch[0]
    out = model(x)
    assert out.shape == base(x).shape
    first, last = x.clone(), x.clone()
    first[:, 0] = (x[:, 0] + 1) % 10  # another first token (the task token becomes a digit)
    last[:, -1] = (x[:, -1] + 1) % 10
    assert not torch.allclose(model(first)[:, 0], out[:, 0])  # output 0 sees real token 0
    changed = model(last)
    torch.testing.assert_close(changed[:, :-1], out[:, :-1], atol=1e-5, rtol=0)  # causal
    assert not torch.allclose(changed[:, -1], out[:, -1])  # the last output sees the last token
    with model.disable_adapter():
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("config", PEFT_CONFIGS, ids=repr)
def test_param_count_is_the_closed_form(base, config):
    model = get_peft_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    n_base = sum(p.numel() for p in base.parameters())
    assert trainable == config.num_params(base.config)
    assert total == n_base + trainable


def test_closed_forms_by_hand(base):
    c = base.config  # d=128, mlp 512, 4 layers
    assert LoraConfig(r=4, target_modules=("q", "v")).num_params(c) == 4 * (128 + 128) * 2 * 4
    assert LoraConfig(r=2, target_modules=("up",)).num_params(c) == 2 * (128 + 512) * 4
    assert AdapterConfig(bottleneck_size=8).num_params(c) == (2 * 128 * 8 + 8 + 128) * 8
    assert AdapterConfig(bottleneck_size=8, target_sublayers=("mlp",)).num_params(c) == (2 * 128 * 8 + 8 + 128) * 4
    assert PromptTuningConfig(num_virtual_tokens=5).num_params(c) == 5 * 128


def test_print_trainable_parameters(base, capsys):
    """HF peft's line, with figures worked out by hand: the base has 798,720 parameters;
    LoRA r=4 on q, v is 4*(128+128)*2*4 = 8,192; an adapter of 8 is (2*128*8+8+128)*8 = 17,472."""
    assert sum(p.numel() for p in base.parameters()) == 798_720
    model = get_peft_model(base, LoraConfig())
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 8,192 || all params: 806,912 || trainable%: 1.0152\n"
    model.add_adapter("second", AdapterConfig())  # now only it trains; all counts both phi
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 17,472 || all params: 824,384 || trainable%: 2.1194\n"


def test_full_fine_tune_is_a_trainable_copy(base, base_fp):
    model = get_peft_model(base, FullFineTuneConfig())
    t, a = model.get_nb_trainable_parameters()
    assert t == a == sum(p.numel() for p in base.parameters())
    peftcore.run(model, "times_3", steps=3, device="cpu")
    assert fingerprint(base) == base_fp


def test_get_peft_model_does_not_touch_the_base_object(base, base_fp):
    modules_before = [id(m) for m in base.modules()]
    params_before = [id(p) for p in base.parameters()]
    model = get_peft_model(base, LoraConfig(target_modules=("q", "k", "v", "o", "up", "down")))
    model.add_adapter("ad", AdapterConfig())
    assert [id(m) for m in base.modules()] == modules_before
    assert [id(p) for p in base.parameters()] == params_before
    assert not any(p.requires_grad for p in base.parameters())
    # the view shares storage with the base: nothing frozen was copied
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    view_ptrs = {p.data_ptr() for p in model.base_model.parameters() if not p.requires_grad}
    assert base_ptrs <= view_ptrs
    assert fingerprint(base) == base_fp


@pytest.mark.parametrize("config", [LoraConfig(), AdapterConfig(), PromptTuningConfig()], ids=repr)
def test_training_changes_only_phi(base, base_fp, config):
    model = get_peft_model(base, config)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = phi_snapshot(model)
    peftcore.run(model, "times_3", steps=5, device="cpu", lr=1e-2)
    after = phi_snapshot(model)
    assert all(p.grad is None for p in frozen)
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    assert fingerprint(base) == base_fp


def test_views_share_no_module_state(base, batch):
    """Two views of one base: a hook on one fires on neither the base nor the other view,
    and train() on a view leaves the base in eval mode."""
    a, b = shared_view(base), shared_view(base)
    calls = []
    a.blocks[0].attn.q.register_forward_hook(lambda m, i, o: calls.append("hook"))
    a.blocks[1].register_forward_pre_hook(lambda m, i: calls.append("pre-hook"))
    base(batch[0]), b(batch[0])
    assert calls == []
    a(batch[0])
    assert sorted(calls) == ["hook", "pre-hook"]
    for mine, theirs in zip(a.modules(), base.modules()):  # every hook dict, of every kind
        for key, value in vars(theirs).items():
            if isinstance(value, (dict, set, list)):
                assert vars(mine)[key] is not value, key
    a.train()
    assert not any(m.training for m in base.modules()) and not any(m.training for m in b.modules())


def _train_alone(base, seed, steps=8):
    model = get_peft_model(base, LoraConfig(), seed=seed)
    peftcore.run(model, "times_3", steps=steps, seed=seed, device="cpu")
    return model


def test_two_models_one_base_in_sequence_and_in_threads(base, base_fp, batch):
    a, b = _train_alone(base, 1), _train_alone(base, 2)
    assert not torch.allclose(a(batch[0]), b(batch[0]))
    a2, b2 = get_peft_model(base, LoraConfig(), seed=1), get_peft_model(base, LoraConfig(), seed=2)
    errors = []

    def work(m, seed):
        try:
            peftcore.run(m, "times_3", steps=8, seed=seed, device="cpu")
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m, s)) for m, s in ((a2, 1), (b2, 2))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    torch.testing.assert_close(a2(batch[0]), a(batch[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b2(batch[0]), b(batch[0]), atol=1e-5, rtol=0)
    assert fingerprint(base) == base_fp


# ------------------------------------------------------------------ training loop
def test_same_seed_same_curve(base):
    curves = []
    for _ in range(2):
        model = get_peft_model(base, LoraConfig(), seed=3)
        curves.append([e.loss for e in peftcore.train(model, "reverse_add_1", steps=6, seed=3, device="cpu")])
    assert curves[0] == curves[1]


def test_dropout_draws_from_the_run_not_the_process(base):
    """A run with LoRA dropout repeats from its seed while other code (another run in another
    thread of the server) draws from torch's global generator between its steps."""
    def phi_after_training(dropout, disturb=False):
        model = get_peft_model(base, LoraConfig(lora_dropout=dropout), seed=5)
        for _ in peftcore.train(model, "times_3", steps=4, seed=5, device="cpu"):
            if disturb:
                torch.rand(1000)  # what a neighbour's nn.Dropout would draw
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    alone = phi_after_training(0.3)
    assert all(torch.equal(a, b) for a, b in zip(alone, phi_after_training(0.3, disturb=True)))
    assert not all(torch.equal(a, b) for a, b in zip(alone, phi_after_training(0.0)))  # dropout drops


def test_events_carry_progress(base):
    model = get_peft_model(base, AdapterConfig())
    events = list(peftcore.train(model, "times_3", steps=4, eval_every=2, device="cpu"))
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert events[-1].done and events[1].eval_exact is not None and events[0].eval_exact is None
    elapsed = [e.elapsed for e in events]
    assert elapsed == sorted(elapsed)  # a clock since the start, not per-step times
    for e in events:  # throughput is the examples seen so far over that clock (batch 64)
        assert e.examples_per_s == pytest.approx(e.step * 64 / e.elapsed)


def test_an_evaluation_scores_the_first_eval_size_held_out_examples(base):
    model = get_peft_model(base, LoraConfig())
    last = list(peftcore.train(model, "times_3", steps=6, eval_every=3, eval_size=40, device="cpu"))[-1]
    assert (last.eval_exact, last.eval_token) == peftcore.evaluate(model, "times_3", size=40)
    assert (last.eval_exact * 40).is_integer() and (last.eval_token * 40 * 8).is_integer()
    for bad in (0, 513):
        with pytest.raises(ValueError, match="eval_size must be 1 to 512"):
            peftcore.train(model, "times_3", eval_size=bad).__next__()


def test_seconds_budget_ends_the_run(base):
    model = get_peft_model(base, LoraConfig())
    events = list(peftcore.train(model, "times_3", steps=10_000, max_seconds=0.5, device="cpu"))
    assert events[-1].done and events[-1].step < 10_000


class NanAfter(torch.nn.Module):
    """Wraps a model and returns NaN logits from call `n` on."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x):
        self.calls += 1
        out = self.model(x)
        return out * float("nan") if self.calls >= self.n else out


def test_non_finite_loss_stops_and_keeps_last_finite_phi(base):
    model = get_peft_model(base, LoraConfig())
    wrapped = NanAfter(model, 4)
    snapshots = []
    with pytest.raises(NonFiniteLossError, match="step 4"):
        for _ in peftcore.train(wrapped, "times_3", steps=10, eval_every=100, device="cpu"):
            snapshots.append(phi_snapshot(model))
    assert len(snapshots) == 3
    for a, b in zip(snapshots[-1], phi_snapshot(model)):
        assert torch.equal(a, b) and torch.isfinite(b).all()


def test_bad_configs_name_the_field(base):
    for config, field in [(LoraConfig(r=0), "r"), (LoraConfig(target_modules=("wq",)), "target_modules"),
                          (AdapterConfig(bottleneck_size=-1), "bottleneck_size"),
                          (AdapterConfig(target_sublayers=("ffn",)), "target_sublayers"),
                          (AdapterConfig(target_sublayers=()), "target_sublayers"),
                          (PromptTuningConfig(num_virtual_tokens=1000), "num_virtual_tokens")]:
        with pytest.raises(ValueError, match=field):
            get_peft_model(base, config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_path(base_fp):
    base = peftcore.load_base(device="cuda")
    for config in (LoraConfig(), AdapterConfig(), PromptTuningConfig()):
        model = get_peft_model(base, config)
        event = peftcore.run(model, "times_3", steps=20, device="auto")
        assert event.done and next(model.trainable_parameters().__iter__()).is_cuda
    assert fingerprint(base) == base_fp


def test_only_the_eight_answer_digits_are_scored():
    x, y = peftcore.TASKS["times_3"].batch(4, torch.Generator().manual_seed(0))
    assert ((y != -100).sum(1) == 8).all()  # not the SEP, which the input gives away
    assert (y[:, -8:] == x[:, 1:9] * 3 % 10).all()


def test_a_run_that_has_stopped_improving_stops_with_patience(base):
    """Prompt tuning on a new digit map sits at 0% held-out exact match from its first
    evaluation: with patience 2 it ends at its third evaluation; without, it trains its budget."""
    from peftcore.presets import PRESETS
    from peftcore.train import stuck
    preset = PRESETS["PROMPT_TUNING"]
    kw = dict(preset.train, steps=30, eval_every=5, eval_size=64, device="cpu")  # 0 of 512 is 0 of its first 64
    events = list(peftcore.train(get_peft_model(base, preset.config), "times_3", patience=2, **kw))
    assert [e.eval_exact for e in events if e.eval_exact is not None] == [0.0, 0.0, 0.0]
    assert events[-1].step == 15 and events[-1].done
    assert list(peftcore.train(get_peft_model(base, preset.config), "times_3", **kw))[-1].step == 30
    assert not stuck(5, None) and not stuck(1, 2) and stuck(2, 2)
