"""A method is one file: a toy sixth method, registered here in the test itself, runs end
to end without a line of it anywhere else: it trains, saves and loads, rides in a mixed
batch beside the shipped methods, enters the store, is listed with the library's methods
and appears on the Train page (under its peft_type: it has no view). An unknown config is
an error, never a full fine-tune."""
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import peftcore
from apptest import ROOT, app
from mixed import assert_rows_equal_alone
from peftcore import library
from peftcore.methods import registry
from peftcore.methods.config import PeftConfig, PhiLayer
from peftcore.service.store import Store, new_token


@dataclass
class ShiftConfig(PeftConfig):
    """A learned vector added to the final LayerNorm's output (the toy: a few lines of phi)."""
    peft_type = "TOY_SHIFT"

    def num_params(self, base_config):
        return base_config.d_model


class ShiftLayer(PhiLayer):
    containers, wraps = ("shifts",), "base_layer"

    def __init__(self, base_layer, route):
        super().__init__()
        self.base_layer, self.route = base_layer, route
        self.shifts = nn.ParameterDict()

    def add(self, name, cfg, generator=None):
        w = self.base_layer.weight
        self.shifts[name] = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))

    def forward(self, x):
        out = self.base_layer(x)
        if self.route.rows is not None:  # a mixed batch: slot 0 adds nothing
            stack = torch.stack([torch.zeros_like(out[0, 0])] + list(self.shifts.values()))
            return out + stack[self.route.slots(list(self.shifts), x.device)][:, None]
        name = self.route.active
        return out + self.shifts[name] if name in self.shifts else out


def plug(model, name, cfg, generator):
    """Wrap the final LayerNorm (once: no other method touches it) and give it a shift."""
    view = model.base_model
    if not isinstance(view.ln_f, ShiftLayer):
        view.ln_f = ShiftLayer(view.ln_f, model.route)
    view.ln_f.add(name, cfg, generator)


@pytest.fixture
def toy():
    method = registry.register(registry.Method(
        ShiftConfig, plug=plug, layers=(ShiftLayer,), slug="shift",
        preset=registry.Preset(ShiftConfig(), dict(steps=10, lr=1e-2, batch_size=16))))
    yield method
    registry.unregister(method.peft_type)


def test_a_toy_method_runs_end_to_end(base, toy, tmp_path):
    model = peftcore.get_peft_model(base, ShiftConfig(), seed=0)
    assert model.get_nb_trainable_parameters()[0] == ShiftConfig().num_params(base.config)
    before = peftcore.fingerprint(base)
    for event in peftcore.train(model, "times_3", steps=5, lr=1e-1, batch_size=16, eval_every=5):
        pass
    assert event.step == 5 and peftcore.fingerprint(base) == before
    assert any(p.abs().sum() > 0 for _, p in model.named_adapter_parameters("default"))  # it trained

    data = peftcore.adapter_to_bytes(model, "default")  # its file, then a bank beside a library LoRA
    bank, _ = library.load_library(base)
    peftcore.load_adapter(bank, "shift", data)
    x = peftcore.TASKS["times_3"].batch(4, torch.Generator().manual_seed(0))[0]
    assert_rows_equal_alone(bank, x, ["shift", "lora-times_3", "__base__", "shift"])

    store = Store(tmp_path / "s.sqlite3", base=base)
    rec = store.save_phi(new_token(), "my-shift", data)
    assert rec.method == "TOY_SHIFT" and store.load_bytes(rec.id) == data
    assert library.method_slugs()["TOY_SHIFT"] == "shift"

    bank.delete_adapter("shift")  # the wrappers go with it
    assert not any(isinstance(m, ShiftLayer) for m in bank.modules())


def test_the_train_page_lists_a_method_without_a_view(toy):
    at = app()
    at.run()
    at.switch_page("app_pages/train.py").run()
    assert "TOY_SHIFT" in at.selectbox(key="method").options and not at.exception


def test_an_unknown_config_is_an_error_never_a_full_fine_tune(base):
    @dataclass
    class Stray(PeftConfig):
        peft_type = "STRAY"
    with pytest.raises(registry.UnknownMethod, match="no method is registered"):
        peftcore.get_peft_model(base, Stray())
    with pytest.raises(registry.UnknownMethod):  # a subclass of a registered config is not that method
        peftcore.get_peft_model(base, type("MyLora", (peftcore.LoraConfig,), {})())


GENERIC = ("peftcore", "ui", "views", "app_pages", ".")  # every folder of code, searched below it too


def generic_files():
    """The code outside each method's own two files (peftcore/methods/<slug>.py, views/<slug>.py)."""
    own = {f"{m.slug}.py" for m in registry.METHODS.values()}
    for path in sorted({p for folder in GENERIC for p in (ROOT / folder).rglob("*.py")}):
        inside = path.relative_to(ROOT).parts
        if inside[0] in ("tests", "bench", "harness", ".git") or path.name in own or path.name == "__init__.py":
            continue  # __init__: the imports that register the methods
        yield path


def test_generic_code_names_no_method():
    """Outside each method's own two files, no code tests for a method's class or spells a
    method's name, nor reads a method's layer by its attributes (lora_A, ia3_l, sublayer...):
    in a string, an f-string, or as `.attribute`."""
    import views
    names = [m.config_cls.__name__ for m in registry.METHODS.values()] + list(registry.METHODS) + [
        v.name for v in views.all_views()]
    attributes = [*registry.containers(), *registry.wrapper_attributes(),
                  *(a for cls in registry.layer_types() for a in cls.per_adapter)]
    not_methods = ("PASSIVE",)  # SQLite's checkpoint modes include "FULL"
    hits, files = [], list(generic_files())
    assert any(p.parts[-2] == "service" for p in files) and any(p.parts[-2] == "ui" for p in files)
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(word in code for word in not_methods):
                continue
            hits += [f"{path.relative_to(ROOT)}:{n}: {name}" for name in names
                     if f'"{name}"' in code or f"'{name}'" in code or "isinstance(" in code and name in code]
            hits += [f"{path.relative_to(ROOT)}:{n}: {a}" for a in attributes
                     if re.search(rf"\.{a}\b|[\"'{{]{a}[\"'}}.]", code)]
    assert not hits, hits


def test_the_registry_refuses_a_layer_that_is_not_a_phi_layer_and_a_taken_slug_or_attribute(toy):
    class Loose(nn.Module):  # duck typing is not enough: the generic code reads PhiLayer's names
        pass

    class Clash(ShiftLayer):
        containers = ("shifts",)
    for layers, slug, error in (((Loose,), "loose", TypeError), ((ShiftLayer,), "shift2", ValueError),
                                ((Clash,), "clash", ValueError), ((), "shift", ValueError)):
        config = type(f"Cfg{slug}", (ShiftConfig,), {"peft_type": f"T_{slug.upper()}"})
        with pytest.raises(error):
            registry.register(registry.Method(config, plug=plug, layers=layers, slug=slug,
                                              preset=registry.Preset(config())))
        assert config.peft_type not in registry.METHODS
