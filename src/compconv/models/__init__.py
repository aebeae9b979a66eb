"""The model zoo: builders registered by name (``list_models()``), one file per family."""

from compconv.models import cifar_resnet, cifar_vgg, imagenet  # noqa: F401  (register the families)
from compconv.models import compconv_zoo  # noqa: F401  (after the bases it converts)
from compconv.models import hetconv_hosts  # noqa: F401  (HetConv paper hosts)
from compconv.models import mobilenet, sc_resnet  # noqa: F401  (XSepConv / SlimConv hosts)
from compconv.models.registry import get_model, get_model_builder, list_models, register_model

__all__ = ["get_model", "get_model_builder", "list_models", "register_model"]
