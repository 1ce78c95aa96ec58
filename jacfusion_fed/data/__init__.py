"""Built-in datasets (TwoMoon, AV-Digits), user-data adapters and the generated-data cache.

Every built-in input is scaled into [0, 1] (the attack layer's convention).
"""

from .adapters import from_arrays, from_torch_datasets, minmax_scale
from .avdigits import (
    DIGIT_WORDS,
    VOICE_VARIANTS,
    AVDigitsConfig,
    avdigits_cache_path,
    generate_avdigits,
)
from .builtin import BUILTIN_DATASETS, SPLITS, load_builtin
from .cache import CacheCorruptError, default_cache_dir
from .dataset import MultimodalDataset
from .speech import SpeechSynthesisError, SpeechUnavailableError, get_synthesizer

__all__ = [
    "BUILTIN_DATASETS",
    "DIGIT_WORDS",
    "SPLITS",
    "VOICE_VARIANTS",
    "AVDigitsConfig",
    "CacheCorruptError",
    "MultimodalDataset",
    "SpeechSynthesisError",
    "SpeechUnavailableError",
    "avdigits_cache_path",
    "default_cache_dir",
    "from_arrays",
    "from_torch_datasets",
    "generate_avdigits",
    "get_synthesizer",
    "load_builtin",
    "minmax_scale",
]
