"""deeploc: deepfake localization on frozen SAM2 features."""

# conf/ uses deeploc's OmegaConf resolvers; registering them on import lets any composition (CLI, Hydra's
# compose API in notebooks or tests) resolve the configs.
from deeploc.training.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"
