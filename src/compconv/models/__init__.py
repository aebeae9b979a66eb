"""The model zoo: builders registered by name (``list_models()``), one file per family."""

from compconv.models import (  # noqa: F401  (register the families)  # noqa: F401  (XSepConv / SlimConv hosts)
    cifar_resnet,
    cifar_vgg,
    compconv_zoo,  # noqa: F401  (after the bases it converts)
    hetconv_hosts,  # noqa: F401  (HetConv paper hosts)
    imagenet,
    mobilenet,
    sc_resnet,
)
from compconv.models.registry import get_model, get_model_builder, list_models, register_model

__all__ = ["get_model", "get_model_builder", "list_models", "register_model"]
