"""peftcore.analysis: what the pages show is right (outputs, serving, merging, spectra)."""
import pytest
import torch

import peftcore
from peftcore import analysis


@pytest.fixture(scope="module")
def bank(base):
    """Three phi of different methods with non-zero weights, as if trained (seeded: the same every run)."""
    model = peftcore.PeftModel(base)
    model.add_adapter("lora", peftcore.LoraConfig(r=2, target_modules=("q", "v", "up")), seed=0)
    model.add_adapter("adapter", peftcore.AdapterConfig(bottleneck_size=4), seed=1)
    model.add_adapter("prompt", peftcore.PromptTuningConfig(num_virtual_tokens=3), seed=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for name in model.peft_config:
        model.adapter_task[name] = "times_3"
    model.set_adapter("lora")
    return model.eval()


def test_parse_digits():
    assert analysis.parse_digits("1234 5678") == [1, 2, 3, 4, 5, 6, 7, 8]
    for bad in ("1234567", "123456789", "1234567a", ""):
        with pytest.raises(ValueError, match="8 digits"):
            analysis.parse_digits(bad)


def test_greedy_outputs_of_the_base_on_a_pretraining_task(base):
    prompts, answers = analysis.make_prompts("reverse", n=16, seed=3)
    model = peftcore.PeftModel(base)  # no phi: the bare base, which learned reverse in pretraining
    assert torch.equal(analysis.generate(model, prompts), answers)
    rows = analysis.sample_predictions(model, "reverse", n=4)
    assert all(r["correct"] and r["output"] == r["target"] for r in rows)


def test_digit_accuracy_is_token_accuracy_digit_by_digit(bank, base):
    for task in ("times_3", "copy"):
        per_digit = analysis.digit_accuracy(bank, task)
        assert len(per_digit) == 8 and sum(per_digit) / 8 == pytest.approx(peftcore.evaluate(bank, task)[1])
    assert min(analysis.digit_accuracy(base, "copy")) > 0.95  # the base copies, every digit


def test_mixed_batch_equals_swapping(bank):
    names = ["lora", "adapter", "prompt", peftcore.BASE_ROW, "lora", "prompt"]
    prompts = torch.cat([analysis.make_prompts("times_3", seed=i)[0] for i in range(len(names))])
    rows_without_base = [i for i, n in enumerate(names) if n != peftcore.BASE_ROW]
    mixed = analysis.serve_mixed(bank, names, prompts)
    swapped = analysis.serve_swapping(bank, [names[i] for i in rows_without_base], prompts[rows_without_base])
    assert torch.equal(mixed[rows_without_base], swapped)
    assert bank.active_adapter == "lora"  # restored after swapping
    times = analysis.time_mixed_vs_swap(bank, names[:3], prompts[:3], repeats=1)
    assert sorted(times) == ["mixed_s", "swap_s"] and all(isinstance(t, float) for t in times.values())


def test_merged_equals_unmerged_and_is_undone(bank):
    prompts, _ = analysis.make_prompts("times_3", n=4)
    generation = bank.generation
    t = analysis.merged_vs_unmerged(bank, "lora", prompts, repeats=1)
    assert 0 < t["max_abs_diff"] < 5e-4  # float32 rounding of W x + B A x against (W + B A) x: it did merge
    assert all(layer.merged_weight is None for layer in bank._merge_layers())
    assert bank.merged_adapter is None and bank.generation == generation  # a measurement, not a change
    with pytest.raises(ValueError, match="merges"):
        analysis.merged_vs_unmerged(bank, "adapter", prompts)


def test_swap_timings_leave_the_bank_as_it_was(bank):
    before = list(bank.peft_config)
    t = analysis.swap_timings(bank, "adapter", peftcore.adapter_to_bytes(bank, "adapter"), repeats=4)
    assert sorted(t) == ["load_s", "set_adapter_s"] and all(isinstance(v, float) for v in t.values())
    assert list(bank.peft_config) == before and bank.active_adapter == "lora"


def test_spectrum_of_a_rank_one_update():
    delta = torch.outer(torch.arange(1.0, 9.0), torch.ones(5))
    sp = analysis.spectrum(delta)
    assert sp["energy"][0] == pytest.approx(1.0)
    assert sp["random_energy"][0] < 0.9 and sp["random_energy"][-1] == pytest.approx(1.0)
    assert analysis.energy_captured(torch.tensor([3.0, 4.0]), 1) == pytest.approx(9 / 25)


def test_delta_weights_of_a_full_fine_tune(base):
    tuned = peftcore.get_peft_model(base, peftcore.FullFineTuneConfig())
    deltas = analysis.delta_weights(tuned, base)
    assert len(deltas) == 6 * base.config.n_layer and all(d.abs().max() == 0 for d in deltas.values())
    with torch.no_grad():
        tuned.base_model.blocks[0].attn.q.weight.add_(1.0)
    rows = analysis.spectrum_summary(analysis.delta_weights(tuned, base), r=1)
    assert rows[0]["projection"] == "blocks.0.attn.q" and rows[0]["energy"] == pytest.approx(1.0)


# ------------------------------------------------------------------ what a random base hands phi
def test_a_random_base_attends_evenly_and_the_pretrained_one_does_not(base):
    random_spread = analysis.attention_spread(peftcore.random_base(), "times_3")
    pretrained_spread = analysis.attention_spread(base, "times_3")
    assert len(random_spread) == len(pretrained_spread) == base.config.n_layer
    assert min(random_spread) > 0.99  # an average of every visible token: where a digit is, is lost
    assert max(pretrained_spread) < 0.8 and min(pretrained_spread) < 0.2  # it looks at particular places


def test_the_attention_weights_read_are_the_ones_the_forward_uses(base):
    attn = base.blocks[1].attn
    h = base.blocks[1].ln1(base.embed(peftcore.TASKS["sort"].eval_set()[0][:4]))
    p = attn.weights(h)
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[:-1])) and p.triu(1).abs().max() == 0  # causal rows
    mixed = (p @ attn._heads(attn.v(h))).transpose(1, 2).reshape(h.shape)
    assert torch.allclose(attn.o(mixed), attn(h), atol=1e-5)


def test_attention_spread_reads_through_phi_wrappers_and_changes_nothing(base):
    x = peftcore.TASKS["times_3"].eval_set()[0][:8]
    before = base(x)
    lora = peftcore.get_peft_model(base, peftcore.LoraConfig(r=1, target_modules=("q", "k")), seed=0)
    assert analysis.attention_spread(lora.base_model, "times_3") == analysis.attention_spread(base, "times_3")  # B = 0
    prefix = peftcore.get_peft_model(base, peftcore.PrefixTuningConfig(num_virtual_tokens=4), seed=0)
    assert len(analysis.attention_spread(prefix.base_model, "times_3")) == base.config.n_layer  # under PrefixAttention
    assert torch.equal(base(x), before)


def test_only_sort_answers_the_same_for_any_order_of_its_digits():
    assert [name for name, task in peftcore.TASKS.items() if not task.reads_positions] == ["sort"]
    assert all(task.reads_positions for task in peftcore.PRETRAIN_TASKS.values())
