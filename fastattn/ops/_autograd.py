"""Shared autograd guard: our backward ops have no derivative of their own."""
import torch


def refuse_double_backward(what: str, *tensors) -> None:
    """Raise inside a backward when autograd is recording it (``create_graph=True``).

    Without this, torch would differentiate the backward op as if it were constant and hand back
    wrong second-order gradients with only a warning.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise NotImplementedError(f"fastattn {what}: double backward (create_graph=True) is not supported; "
                                  "use backend='reference' for higher-order gradients")
