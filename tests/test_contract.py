"""The contract every registered method keeps, checked for each method the registry holds: a
method added later is checked by being registered. Its fresh phi changes no output, or it says
it does (starts_as_base); training moves its phi and nothing else, the shared base least of all;
a saved file gives it back exactly; in a mixed batch each row equals that row alone; it merges
exactly where it says it does. What is special to one method stays in its own test file."""
import copy

import pytest
import torch

import peftcore
from mixed import assert_rows_equal_alone
from phi import randomize
from peftcore import BASE_ROW, PeftModel, fingerprint, get_peft_model
from peftcore.methods import registry
from peftcore.methods.config import PhiLayer

METHODS = list(registry.METHODS.values())
BANKABLE = [m for m in METHODS if m.shares_base]


def each(methods):
    return pytest.mark.parametrize("method", methods, ids=[m.peft_type for m in methods])


def fresh(base, method, name="default", seed=0):
    return get_peft_model(base, copy.deepcopy(method.preset.config), adapter_name=name, seed=seed)


@each(METHODS)
def test_fresh_phi_changes_no_output_unless_the_method_says_so(base, batch, method):
    same = torch.equal(fresh(base, method)(batch[0]), base(batch[0]))
    assert same == method.starts_as_base


@each(METHODS)
def test_training_moves_phi_and_nothing_else(base, base_fp, method):
    model = fresh(base, method)
    phi = {id(p) for p in model.trainable_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peftcore.run(model, "times_3", steps=2, lr=1e-2, device="cpu", eval_every=10_000)
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert moved and all(id(dict(model.named_parameters())[n]) in phi for n in moved), moved
    assert all(p.grad is None for p in model.parameters() if id(p) not in phi)
    assert fingerprint(base) == base_fp


@each(METHODS)
def test_a_saved_file_gives_the_phi_back_exactly(base, batch, tmp_path, method):
    model = fresh(base, method)
    randomize(model, "default", seed=1, scale=0.05)
    model.save_pretrained(tmp_path)
    assert torch.equal(PeftModel.from_pretrained(base, tmp_path)(batch[0]), model(batch[0]))


@each(BANKABLE)
def test_each_row_of_a_mixed_batch_equals_that_row_alone(base, batch, method):
    model = fresh(base, method, name="a")
    model.add_adapter("b", copy.deepcopy(method.preset.config), seed=1)
    randomize(model, "a", seed=1, scale=0.05)
    randomize(model, "b", seed=2, scale=0.05)
    assert_rows_equal_alone(model, batch[0][:4], ["a", "b", BASE_ROW, "a"])


@each(BANKABLE)
def test_it_merges_exactly_where_it_says_it_does(base, base_fp, batch, method):
    model = fresh(base, method)
    randomize(model, "default", seed=3, scale=0.05)
    x, out = batch[0], model(batch[0])
    if not method.mergeable:
        with pytest.raises(ValueError):
            model.merge_adapter()
        return
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, PhiLayer) for m in plain.modules())
    assert fingerprint(base) == base_fp
