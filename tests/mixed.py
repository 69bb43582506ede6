"""The property every method keeps in a mixed batch (HF peft's tests state it too): each row of
`model(x, adapter_names=names)` equals that row run alone through its own phi."""
import torch

from peftcore import BASE_ROW


def assert_rows_equal_alone(model, x, names, atol=1e-5, rtol=1.3e-6):
    """rtol: float32's own (torch's default), since the trained logits reach about 11."""
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == BASE_ROW:
            alone = model._base[0](x[i:i + 1])
        else:
            model.set_adapter(name)
            alone = model(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=atol, rtol=rtol, msg=f"row {i} ({name})")
