"""The model zoo: builders registered by name (``list_models()``), one file per family."""

# Importing a family registers its builders (compconv_zoo's variants look their bases up at build time).
from compconv.models import (  # noqa: F401
    cifar_resnet,
    cifar_vgg,
    compconv_zoo,
    hetconv_hosts,
    imagenet,
    mobilenet,
    sc_resnet,
)
from compconv.models.registry import get_model, get_model_builder, list_models, register_model

__all__ = ["get_model", "get_model_builder", "list_models", "register_model"]
