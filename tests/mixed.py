"""The property every method keeps in a mixed batch (HF peft's tests state it too): each row of
`model(x, adapter_names=names)` equals that row run alone through its own phi."""
import torch

from peftcore import BASE_ROW


def assert_rows_equal_alone(model, x, names, atol=1e-5, rtol=1e-5):
    """rtol: a few float32 roundings through the layers, since the trained logits reach about
    11: a shipped LoRA's row differed from its lone run by 4.1e-6 relative on an Intel Xeon
    (AVX-512), by less than 1.3e-6 on an AMD EPYC. A wrong routing differs by O(1)."""
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == BASE_ROW:
            alone = model._base[0](x[i:i + 1])
        else:
            model.set_adapter(name)
            alone = model(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=atol, rtol=rtol,
                                   msg=lambda m, i=i, name=name: f"row {i} ({name}): {m}")
