"""Built-in datasets (TwoMoon, AV-Digits), user-data adapters and the generated-data cache.

Every built-in input is scaled into [0, 1] (the attack layer's convention).
"""

from .adapters import from_arrays, from_torch_datasets, minmax_scale
from .avdigits import AVDigitsConfig, avdigits_cache_path, generate_avdigits
from .builtin import BUILTIN_DATASETS, SPLITS, load_builtin
from .cache import CacheCorruptError, default_cache_dir
from .dataset import MultimodalDataset
from .speech import SpeechUnavailableError

__all__ = [
    "BUILTIN_DATASETS",
    "SPLITS",
    "AVDigitsConfig",
    "CacheCorruptError",
    "MultimodalDataset",
    "SpeechUnavailableError",
    "avdigits_cache_path",
    "default_cache_dir",
    "from_arrays",
    "from_torch_datasets",
    "generate_avdigits",
    "load_builtin",
    "minmax_scale",
]
