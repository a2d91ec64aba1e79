"""Drop-in optimizers: one fused multi-tensor step per parameter group.

``fastattn.optim.SGD``, ``Adam`` and ``AdamW`` take torch's constructor arguments and keep torch's
``param_groups`` and ``state`` layout, so a ``state_dict()`` moves between ``torch.optim`` and
``fastattn.optim`` in both directions. Each also takes ``backend=`` (``None`` = the process-wide
default; see :mod:`fastattn.backend`) and works with ``torch.amp.GradScaler`` (unscaling and the
inf/NaN skip happen inside the kernel, as with torch's ``fused=True``).
"""
from fastattn.optim.adam import Adam, AdamW
from fastattn.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
