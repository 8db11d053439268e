"""Any torchvision classification model (`model=tv model.name=...`) or timm model
(`model=timm model.name=...`, needs the `timm` extra) by name, built for this dataset's channels
and classes."""

from __future__ import annotations

import difflib
import logging

from torch import nn

from cnntrain.errors import UserError
from cnntrain.models.transfer import (
    adapt_first_conv,
    download_state_dict,
    load_matching,
    replace_head,
    torchvision_weights,
)

# Inception-style nets return aux outputs in train mode unless told not to; our loop wants logits.
TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def _unknown(kind: str, name: str, names: list[str]) -> UserError:
    close = difflib.get_close_matches(name, names, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"unknown {kind} model {name!r}{hint}")


def torchvision_model(
    name: str, *, in_channels: int, num_classes: int, weights=None, **kwargs
) -> nn.Module:
    from torchvision import models

    names = models.list_models(module=models)
    if name not in names:
        raise _unknown("torchvision", name, names)
    kwargs = {**TORCHVISION_KWARGS.get(name, {}), **kwargs}
    if weights:
        member = torchvision_weights(name, weights)
        model = models.get_model(
            name, weights=None, num_classes=len(member.meta["categories"]), **kwargs
        )
        load_matching(model, download_state_dict(member), str(member))
        replace_head(model, num_classes)
    else:
        model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    adapt_first_conv(model, in_channels)
    return model


def timm_model(
    name: str, *, in_channels: int, num_classes: int, pretrained: bool = False, **kwargs
) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError("model=timm needs the timm package: pip install 'cnntrain[timm]'") from None
    names = timm.list_models()
    if name not in names:
        raise _unknown("timm", name, names)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its per-retry warnings would bury the one error line below
    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except (OSError, RuntimeError) as e:  # no network / no cached weights
        raise UserError(
            f"could not create timm model {name} with pretrained weights "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); set model.pretrained=null "
            "or a local state_dict path"
        ) from None
    finally:
        hub_log.setLevel(level)
