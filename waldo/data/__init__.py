"""Data: safe image loading, datasets, named evaluation protocols, transform presets.

The names below load from their module on first use (PEP 562 ``__getattr__``): the transforms
import torchvision, which takes seconds, and ``waldo --help`` lists the protocols, which need
only the standard library, numpy and PIL.
"""

import importlib

_SUBMODULE_OF = {
    **dict.fromkeys(("ImageRecord", "ImageSet", "identity_vocabulary", "load_dataset", "read_image_folder",
                     "read_labels_csv", "read_products10k", "read_sop"), "datasets"),
    **dict.fromkeys(("DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageLoadError", "list_images", "load_image"),
                    "images"),
    **dict.fromkeys(("PROTOCOLS", "Protocol", "get_protocol", "protocol_names"), "protocols"),
    **dict.fromkeys(("TRANSFORMS", "TestTransform", "get_transform", "train_transform", "transform_names"),
                    "transforms"),
}


def __getattr__(name: str):
    if name in _SUBMODULE_OF:
        value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
        globals()[name] = value  # looked up once
        return value
    if name in _SUBMODULE_OF.values():  # `import waldo.data` then `waldo.data.transforms.X`, as when eager
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "PROTOCOLS",
    "TRANSFORMS",
    "ImageLoadError",
    "ImageRecord",
    "ImageSet",
    "Protocol",
    "TestTransform",
    "get_protocol",
    "get_transform",
    "identity_vocabulary",
    "list_images",
    "load_dataset",
    "load_image",
    "protocol_names",
    "read_image_folder",
    "read_labels_csv",
    "read_products10k",
    "read_sop",
    "train_transform",
    "transform_names",
]
