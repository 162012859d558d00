"""align-env: Gymnasium environments and benchmarks for aligning language models from AI feedback."""

from align_env.env import AlignEnv, AlignVectorEnv
from align_env.errors import AlignEnvError
from align_env.feedback import make_annotator, parse_spec
from align_env.registration import ENV_IDS, register_all
from align_env.tracks import get_track

__version__ = "0.1.0"
__all__ = ["AlignEnv", "AlignVectorEnv", "AlignEnvError", "ENV_IDS", "get_track", "make_annotator", "parse_spec"]

register_all()
