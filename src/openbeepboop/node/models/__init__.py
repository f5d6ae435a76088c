"""The model cache: `pull_model` fetches a GGUF (an `hf:` spec, a URL or a local path)
into a directory shared by every node on the machine; `ModelCache` lists and removes.

    from openbeepboop.node.models import ModelCache, default_models_dir, pull_model

    cache = ModelCache(default_models_dir())
    model = pull_model("hf:org/repo/file.gguf", cache, progress=lambda done, total: ...)
    model.path  # the verified file

The functions are synchronous (the HTTP client, hashing and file locks block): async
callers run them with `asyncio.to_thread`.
"""

from openbeepboop.node.models.cache import CachedModel, ModelCache, default_models_dir
from openbeepboop.node.models.errors import PullError
from openbeepboop.node.models.pull import Progress, pull_model
from openbeepboop.node.models.specs import ModelSpec, parse_spec

__all__ = [
    "CachedModel",
    "ModelCache",
    "ModelSpec",
    "Progress",
    "PullError",
    "default_models_dir",
    "parse_spec",
    "pull_model",
]
